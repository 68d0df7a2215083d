"""Object storage: one root on any fsspec backend, with tenacity for bounded retries.

Generic on purpose: it knows no job file names (those belong to `jobs.layout`). Local writes go
through a temporary file and a rename, so a reader never sees half a file; object stores give that
per object already. `ADARUN_CHAOS_WRITE_FAILURE_RATE` (0..1) makes that share of
writes fail before they reach the store: a fault drill for the retry path, used by the tests.
This module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import os
import random
import uuid

import fsspec
from fsspec.core import url_to_fs
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

STORAGE_ATTEMPTS = 6


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a retry may cure: OS-level I/O and timeouts, plus botocore's and aiohttp's connection errors
    (which are not OSErrors). Access and missing-bucket errors are not here: retrying cannot fix them."""
    errs: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as bc

        errs += [
            bc.EndpointConnectionError,
            bc.ConnectionClosedError,
            bc.ConnectTimeoutError,
            bc.ReadTimeoutError,
            bc.HTTPClientError,
        ]
    except ImportError:
        pass
    try:
        import aiohttp

        errs.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(errs)


class StorageError(RuntimeError):
    """A store that cannot be used; `code` is 2 when the manifest is at fault (path, credentials), else 1."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


_FAULT_OF_MANIFEST = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "InvalidClientTokenId",
    "PermissionError",
    "FileNotFoundError",
    "InvalidBucketName",
    "NotADirectoryError",
    "IsADirectoryError",
    "ValueError",
)


def describe_storage_error(e: BaseException, url: str, field: str = "output.path") -> StorageError:
    """One line naming the store, the field and the cause; exit 2 when retrying cannot help."""
    names = {c.__name__ for c in type(e).__mro__} | {str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))}
    text = " ".join(str(e).split())[:200] or type(e).__name__
    if names & set(_FAULT_OF_MANIFEST) or any(n in text for n in _FAULT_OF_MANIFEST):
        return StorageError(f"{field}: {url} is not usable ({type(e).__name__}: {text})", 2)
    return StorageError(f"{field}: {url} is unreachable ({type(e).__name__}: {text})", 1)


class ChaosError(OSError):
    """An injected storage fault."""


class Store:
    """One output (or input) root on any fsspec filesystem, with retried reads and writes."""

    def __init__(
        self, root: str, storage_options: dict | None = None, backoff_s: float = 0.5, attempts: int = STORAGE_ATTEMPTS
    ):
        self.url = root
        self.fs, self.root = url_to_fs(root, **(storage_options or {}))
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.chaos = float(os.environ.get("ADARUN_CHAOS_WRITE_FAILURE_RATE", "0") or 0)
        self.retry = retry(
            reraise=True,
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(multiplier=backoff_s, max=max(backoff_s * 16, 0.001), jitter=backoff_s),
            retry=retry_if_exception_type(_transient_errors()),
        )

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ---- raw operations (each retried)
    def write_bytes(self, rel: str, data: bytes) -> None:
        self.retry(self._write)(self.path(rel), data)

    def _write(self, p: str, data: bytes) -> None:
        if self.chaos and random.random() < self.chaos:
            raise ChaosError(f"injected write failure: {p}")
        parent = p.rsplit("/", 1)[0]
        if self.local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, p)
        else:
            with self.fs.open(p, "wb") as f:
                f.write(data)

    def create(self, rel: str, data: bytes) -> bool:
        """Write only if absent, atomically where the store allows it; False when it already exists.
        Local disks: link(2) of a complete temporary file. S3: a conditional PUT (If-None-Match), where
        the store supports it; elsewhere a check-then-write (a race window of one round trip)."""
        p = self.path(rel)
        if self.local:
            parent = p.rsplit("/", 1)[0]
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, p)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.retry(self.fs.exists)(p):
            return False
        try:
            self.retry(self.fs.pipe_file)(p, data, mode="create")
        except TypeError:  # a backend without exclusive create
            self.retry(self.fs.pipe_file)(p, data)
        except Exception as e:  # PreconditionFailed: someone else created it first
            if "PreconditionFailed" in f"{type(e).__name__} {e}" or "412" in str(e):
                return False
            raise
        return True

    def read_bytes(self, rel: str) -> bytes:
        return self.retry(self.fs.cat_file)(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.retry(self.fs.exists)(self.path(rel))

    def list(self, rel: str) -> list[str]:
        """Names (not paths) under a folder; [] when it does not exist."""

        def ls():
            p = self.path(rel)
            if not self.fs.exists(p):
                return []
            return sorted(x.rsplit("/", 1)[-1] for x in self.fs.ls(p, detail=False))

        self.fs.invalidate_cache()
        return self.retry(ls)()

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.retry(self.fs.exists)(p):
            self.retry(self.fs.rm)(p, recursive=True)

    # ---- JSON helpers
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))
