"""Fingerprints of what decides a job's rows besides its config: the input files and the model directories.

Recorded in job.json when a job starts and compared on every rerun or resume, so an input rewritten in
place or a model replaced at the same path is noticed instead of mixing old and new rows:
  - an input file: its size and the store's version marker (ETag, version id, or modification time);
  - a model, head or LDLP directory: the sha256 of each JSON file (config, tokenizer) and, for each
    weights file, its size and the sha256 of its first and last MiB (cheap for an 8B checkpoint, and
    a safetensors header lists every tensor's offsets, so any change of shape or layout shows).

`diff(old, new)` names the first thing that changed. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os

from fsspec.core import url_to_fs

_VERSION_KEYS = (
    "ETag",
    "etag",
    "VersionId",
    "version_id",
    "generation",
    "md5Hash",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MIB = 1 << 20


def file_fingerprint(url: str, storage_options: dict | None = None) -> dict:
    fs, path = url_to_fs(url, **(storage_options or {}))
    info = fs.info(path)
    out = {"size": info.get("size")}
    for k in _VERSION_KEYS:
        if info.get(k) is not None:
            out["version"] = str(info[k])
            break
    return out


def _partial_sha(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(size - _MIB)
            h.update(f.read(_MIB))
    return h.hexdigest()[:16]


def model_fingerprint(directory: str) -> dict:
    """{file name: digest} for a local model directory (JSON files whole, weights by size + head/tail)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            continue
        if name.endswith(".json"):
            with open(p, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()[:16]
        elif name.endswith(_WEIGHTS):
            size = os.path.getsize(p)
            out[name] = f"{size}:{_partial_sha(p, size)}"
    return out


def job_fingerprint(input_files: list[str], input_options: dict, models: dict[str, str | None]) -> dict:
    """models: manifest field -> local directory (None when the field is unset)."""
    return {
        "inputs": {f: file_fingerprint(f, input_options) for f in sorted(set(input_files))},
        "models": {field: model_fingerprint(d) for field, d in models.items() if d and os.path.isdir(d)},
    }


def diff(old: dict, new: dict) -> str | None:
    """One line naming what changed between two fingerprints, or None when nothing did."""
    for f, fp in new.get("inputs", {}).items():
        was = old.get("inputs", {}).get(f)
        if was is not None and was != fp:
            what = ", ".join(
                f"{k} {was.get(k)} -> {fp.get(k)}" for k in sorted(set(was) | set(fp)) if was.get(k) != fp.get(k)
            )
            return f"input.path: {f} changed since this output was started ({what})"
    for field, files in new.get("models", {}).items():
        was = old.get("models", {}).get(field)
        if was is not None and was != files:
            changed = sorted(k for k in set(was) | set(files) if was.get(k) != files.get(k))
            return (
                f"model.{field.removeprefix('model.')}: the directory changed since this output was started "
                f"({', '.join(changed[:5])} differ)"
            )
    return None


def describe(fp: dict) -> str:
    return json.dumps(fp, sort_keys=True)
