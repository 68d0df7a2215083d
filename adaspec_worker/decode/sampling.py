"""Sampling parameters, logits processing and a counter-based random source.

The random source is a pure function of (row seed, counter, stream, lane): a row's text depends
only on its own seed and history, never on which other rows share its batch or how a shard was
retried. That is what lets a retried shard reproduce the same completions.

This module knows nothing of models, trees or batching policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters shared by every row of one `generate` call."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    eos_token_ids: tuple[int, ...] = ()
    # None: no log-probabilities; k >= 0: each emitted token's raw log-probability plus its k most likely
    # alternatives (`logprobs.py`), as vLLM's SamplingParams.logprobs
    logprobs: int | None = None

    def __post_init__(self):
        assert self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
        assert self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        assert 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"
        assert self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"
        assert self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs}"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def graph_key(self) -> tuple:
        """What of these settings a captured round graph bakes in (Python constants there)."""
        return (self.temperature, self.top_k, self.top_p, self.logprobs)


def target_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from: temperature, then top-k, then top-p. [..., V] -> [..., V]."""
    logits = logits / sp.temperature
    if sp.top_k:
        kth = logits.topk(min(sp.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop_sorted = (cum - sorted_p) >= sp.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# ------------------------------------------------------------ counter-based random numbers

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32), computed in int64 so no op overflows into the sign bit."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _uniform(seeds: torch.Tensor, counter: torch.Tensor, stream: int, lane: torch.Tensor | int) -> torch.Tensor:
    """The hash behind `uniform` and `uniform_at`, broadcasting seeds, counter and lane against each other.

    Two chained 32-bit hashes give 48 random bits per value."""
    seed_mix = _mix32(seeds ^ (seeds >> 32))
    base = _mix32(seed_mix ^ (counter * 0x9E3779B1 + stream * 0x85EBCA77))
    hi = _mix32(base ^ (lane * 0xC2B2AE3D + 0x27D4EB2F))
    lo = _mix32(hi ^ 0x165667B1 ^ (lane * 0x61C88647))
    bits = (hi << 16) | (lo >> 16)  # 48 bits
    return (bits.double() + 0.5) / float(1 << 48)


def uniform(seeds: torch.Tensor, counter: torch.Tensor, stream: int, lanes: int) -> torch.Tensor:
    """Uniforms in (0, 1): seeds [B] int64, counter [B] int64 (e.g. the row's output position) -> [B, lanes]."""
    lane = torch.arange(lanes, device=seeds.device, dtype=torch.long)[None, :]
    return _uniform(seeds[:, None], counter[:, None], stream, lane)


def uniform_at(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Lane 0 at several counters: seeds [B], positions [B, P] -> [B, P], equal to
    `uniform(seeds, positions[:, j], stream, 1)[:, 0]` for every j."""
    return _uniform(seeds[:, None], positions, stream, 0)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B, V], u [B] in (0, 1) -> token ids [B]."""
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype).contiguous()).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


# streams: each random decision of a round draws from its own stream. STREAM_BONUS at output position t is the
# uniform every target draw for position t uses (plain decoding, the coupled tree rule, the chain rule's bonus).
STREAM_BONUS = 1
STREAM_ACCEPT = 2
STREAM_DRAFT = 3
