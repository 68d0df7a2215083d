"""One writer per output: a lease file that a running controller holds and refreshes.

`Lease.acquire()` creates OUT/_lease.json (owner id, host, pid, start, heartbeat) only if absent
(`Store.create`: atomic on local disks and on S3 with conditional writes). While held, a thread
rewrites the heartbeat every `heartbeat_s`. A second controller finds a fresh lease and stops with
exit 2 naming its holder; a lease whose heartbeat is older than `ttl_s` (its holder died without
releasing it) is taken over. `--force` takes it over regardless. The run record and job.json are only
written by the lease holder, so their read-modify-writes cannot interleave.

Torch-free; knows the store and the lease file's name from `jobs.layout`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from .layout import LEASE_FILE
from .storage import Store

log = logging.getLogger("adarun.lease")


class LeaseHeld(ValueError):
    """Another live controller writes to this output (exit 2)."""


class Lease:
    def __init__(self, store: Store, ttl_s: float = 60.0, heartbeat_s: float = 10.0):
        self.store, self.ttl_s, self.heartbeat_s = store, ttl_s, heartbeat_s
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": self.started,
                "heartbeat_at": time.time(),
            }
        ).encode()

    def holder(self) -> dict | None:
        if not self.store.exists(LEASE_FILE):
            return None
        try:
            return self.store.read_json(LEASE_FILE)
        except (ValueError, FileNotFoundError):  # half-visible on a store without atomic writes: treat as held
            return {"owner": "?", "host": "?", "pid": "?", "started_at": time.time(), "heartbeat_at": time.time()}

    def acquire(self, force: bool = False) -> Lease:
        for _ in range(3):
            if self.store.create(LEASE_FILE, self._record()):
                break
            held = self.holder()
            if held is None:
                continue  # released meanwhile
            age = time.time() - float(held.get("heartbeat_at", 0))
            if age < self.ttl_s and not force and _alive(held):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started_at", 0))))
                raise LeaseHeld(
                    f"output.path: {self.store.url} is being written by another adarun (host "
                    f"{held.get('host')}, pid {held.get('pid')}, since {since}, heartbeat {age:.0f}s ago); "
                    "wait for it to finish, or use --force if it is gone"
                )
            log.warning(
                "taking over the lease of %s (host %s, pid %s; heartbeat %.0fs ago%s)",
                self.store.url,
                held.get("host"),
                held.get("pid"),
                age,
                ", --force" if force else "",
            )
            self.store.remove(LEASE_FILE)
        else:
            raise LeaseHeld(f"output.path: {self.store.url}: could not take the lease (another adarun keeps taking it)")
        self._thread = threading.Thread(target=self._beat, name="adarun-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.holder()
                if not held or held.get("owner") != self.owner:
                    self.lost = True
                    log.error("lost the lease of %s to another adarun", self.store.url)
                    return
                self.store.write_bytes(LEASE_FILE, self._record())
            except Exception as e:  # a storage hiccup: the next beat tries again
                log.warning("lease heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self.holder()
            if held and held.get("owner") == self.owner:
                self.store.remove(LEASE_FILE)
        except Exception as e:  # the lease goes stale and is taken over after ttl_s
            log.warning("could not release the lease: %s", e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(held: dict) -> bool:
    """A holder on this host whose process is gone is stale at once; elsewhere only the heartbeat tells."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return True
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
