"""Credentials in storage options: recognised by name and masked wherever a manifest is written or shown.

job.json records the manifest with every credential-looking storage option replaced by `MASK`, so whoever
reads the output cannot write to it; commands that reopen an output take the secrets again
(`--storage-option`, the environment, or fsspec's own credential chain). Torch-free.
"""

from __future__ import annotations

import re

MASK = "***"
_SECRET = re.compile(r"(key|secret|token|passw|credential|session|signature|sas|private|auth)", re.IGNORECASE)


def is_secret(name: str) -> bool:
    """Storage-option names that carry credentials (fsspec/s3fs/gcsfs/adlfs spellings)."""
    return bool(_SECRET.search(name)) and name.lower() not in ("key_prefix",)


def mask_secrets(obj):
    """A copy with every credential-looking mapping value replaced by MASK (nested mappings too)."""
    if isinstance(obj, dict):
        return {
            k: (
                MASK
                if isinstance(k, str) and is_secret(k) and not isinstance(v, dict) and v not in (None, "")
                else mask_secrets(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [mask_secrets(v) for v in obj]
    return obj
