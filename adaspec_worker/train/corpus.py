"""Training corpora: text files or Parquet text columns -> fixed-length token blocks, held-out files left out.

Held-out rule (from the shared benchmark's README): a file is held out when
`int(sha1(text.encode()).hexdigest()[:8], 16) % 40 == 0`. Training commands drop such files by
default so nothing trained here has seen a benchmark prompt's source.
This module knows nothing about models; it needs a tokenizer's `__call__`.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random

import torch


def is_held_out(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 40 == 0


def read_texts(pattern: str, text_column: str = "text", max_files: int | None = None, seed: int = 0,
               min_bytes: int = 200, max_bytes: int = 300_000, drop_held_out: bool = True) -> tuple[list[str], dict]:
    """Texts matching a glob (`**` allowed), deduplicated by content; Parquet files contribute a column."""
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"--corpus {pattern!r} matches no files")
    random.Random(seed).shuffle(files)
    seen, texts, held = set(), [], 0
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            column = pq.read_table(f, columns=[text_column]).column(text_column).to_pylist()
            chunk = [t for t in column if isinstance(t, str)]
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    chunk = [fh.read()]
            except (UnicodeDecodeError, OSError):
                continue
        for t in chunk:
            if not (min_bytes <= len(t.encode()) <= max_bytes):
                continue
            h = hashlib.sha1(t.encode()).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            if drop_held_out and is_held_out(t):
                held += 1
                continue
            texts.append(t)
        if max_files and len(texts) >= max_files:
            break
    return texts, {"files_matched": len(files), "texts": len(texts), "held_out_dropped": held}


def token_blocks(texts: list[str], tokenizer, block: int, eos_id: int = 0,
                 max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate tokenized texts (EOS between them) and cut into [N, block] rows."""
    ids: list[int] = []
    step = 256
    for i in range(0, len(texts), step):
        for seq in tokenizer(texts[i: i + step], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos_id)
        if max_tokens and len(ids) >= max_tokens:
            break
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def split(blocks: torch.Tensor, val_fraction: float = 0.02, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocks.shape[0], generator=g)
    n_val = max(1, int(blocks.shape[0] * val_fraction)) if blocks.shape[0] > 1 else 0
    return blocks[perm[n_val:]], blocks[perm[:n_val]]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model directory")
    return AutoTokenizer.from_pretrained(path)
