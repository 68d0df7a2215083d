"""Rows between text and tokens: per-row seeds, prompt checks and tokenization, stop strings, detokenization.

`RowCodec` wraps the target's tokenizer for one job's decoding settings. A row's seed and its place in
the measured-baseline sample are pure functions of the job seed and the row id, so a row's text never
depends on its batch or shard companions, or on which attempt decoded it.

Knows nothing of the engine, Ray or storage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass


def row_seed(seed: int, row_id: str) -> int:
    """Each row's sampling seed: a pure function of (decoding.seed, row id)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") & ((1 << 62) - 1)


def in_baseline_sample(row_id: str, fraction: float) -> bool:
    """Whether a row is among those decoded a second time with plain decoding (the measured baseline)."""
    h = int.from_bytes(hashlib.sha256(f"baseline:{row_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


@dataclass
class Row:
    """A row ready to decode."""

    id: str
    prompt: str
    tokens: list[int]
    seed: int


StopFn = Callable[[int, list[int]], "int | None"]  # (row, tokens so far) -> keep this many tokens, or None


class RowCodec:
    def __init__(self, tokenizer, stop: list[str], max_new_tokens: int, context: int):
        self.tok, self.stop = tokenizer, list(stop)
        self.max_new_tokens, self.context = max_new_tokens, context

    def encode(self, prompt) -> tuple[list[int] | None, str | None]:
        """(tokens, None) for a usable prompt, else (None, a one-line reason for errors/)."""
        if prompt is None:
            return None, "empty prompt (null)"
        if not isinstance(prompt, str):
            return None, f"undecodable prompt (type {type(prompt).__name__})"
        if not prompt.strip():
            return None, "empty prompt"
        toks = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not toks:
            return None, "prompt tokenizes to nothing"
        if len(toks) + self.max_new_tokens > self.context:
            return None, (
                f"prompt too long: {len(toks)} tokens + max_new_tokens {self.max_new_tokens} > context {self.context}"
            )
        return toks, None

    def text(self, tokens: list[int]) -> str:
        """A completion's text, cut before the first stop string."""
        text = self.tok.decode(tokens, skip_special_tokens=True)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def stop_fn(self) -> StopFn | None:
        """The engine's stop rule for stop strings: where to cut a row's tokens once one appears."""
        stops = self.stop
        if not stops:
            return None
        tail = max(len(s) for s in stops) + 16  # tokens: each is at least one character
        decode = lambda toks: self.tok.decode(toks, skip_special_tokens=True)

        def fn(_row: int, toks: list[int]) -> int | None:
            # called every round, so a stop string not in the tail was already caught in an earlier round
            if not any(s in decode(toks[-tail:]) for s in stops):
                return None
            for k in range(1, len(toks) + 1):  # the shortest prefix that already holds a stop string
                if any(s in decode(toks[:k]) for s in stops):
                    return k
            return len(toks)

        return fn
