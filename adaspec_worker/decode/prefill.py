"""Prompt prefill: prompts into a KV cache (and the drafter's), whole or a chunk of positions at a time.

A prompt of T tokens prefills its first T - 1 into the target's cache; its last token becomes the slot's root
(the first pending token, which the first round verifies). `prefill_target` does that in one pass (hidden
states only: a prefill needs no logits); `prefill_batch` adds the drafter's entries. `ChunkedPrefill` does the
same over `chunk` positions per `step()`, so that continuous batching can prefill a long prompt into a freed
slot a chunk per round while the other slots keep decoding (`stream.py` schedules it, as a `Loading`; the slot
stays frozen until the last chunk). Each chunk is one target pass over positions [a, b) that attends to the
cache's first a positions (the earlier chunks) causally, then the drafter's entries for the
same positions (`Drafter.extend`). The result is the whole-prompt prefill's up to float rounding (the passes'
shapes differ, as a refill of k rows differs from a first batch of B): the tests find every method's tokens
unchanged by the chunk size in float32 on the CPU (tests/test_refill.py, tests/test_prefill.py).

Knows nothing of slots, batches or scheduling: the caller hands it right-padded prompts and scratch caches,
and copies the caches into its slots when `done`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import on_device
from .drafters import Drafter
from .kv_cache import KVCache
from .model import CausalLM

DraftOpinion = tuple[torch.Tensor, "torch.Tensor | None"]  # the drafter's (logits [B, V], hidden [B, H] | None)


@dataclass
class Prefilled:
    """What a prompt prefill hands the slots it fills (all indexed by the prefilled rows)."""

    root: torch.Tensor  # [k] each prompt's last token: the first pending token
    ldlp_feat: torch.Tensor  # [k, 2H] emb(root) ++ the hidden state before it (zeros for one-token prompts)
    features: torch.Tensor | None  # [k, T-1, F] the drafter's features at the prefilled positions (None without one)
    draft: DraftOpinion | None = None  # `prefill_batch`: the drafter's opinion at each prompt's last entry


def right_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> ids [B, T] right-padded with 0, lens [B] (one copy to the device)."""
    T = max(len(p) for p in prompts)
    block = on_device([p + [0] * (T - len(p)) + [len(p)] for p in prompts], device)  # [B, T + 1]
    return block[:, :T], block[:, T]


def seated(target: CausalLM, ids: torch.Tensor, lens: torch.Tensor,
           last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(root [k], ldlp_feat [k, 2H]) of prompts ids [k, T] with lens [k], given the hidden state at each one's
    position lens - 2 (last_hidden [k, H]; ignored for one-token prompts, which have none)."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    root = ids[rows, lens - 1]
    one_token = (lens > 1)[:, None]
    return root, torch.cat([target.embed_tokens(root), torch.where(one_token, last_hidden, 0.0)], -1)


def prefill_target(target: CausalLM, drafter: Drafter | None, ids: torch.Tensor, lens: torch.Tensor,
                   cache: KVCache) -> Prefilled:
    """Every prompt token but the last into `cache` (ids [B, T] right-padded, lens [B]); the last becomes the
    root. The drafter, when given, only picks its features from the pass."""
    B, T = ids.shape
    rows = torch.arange(B, device=ids.device)
    cache.lens.zero_()
    features = None
    last_hidden = torch.zeros(B, target.cfg.hidden_size, dtype=target.dtype, device=ids.device)  # [B, H]
    if T > 1:
        positions = torch.arange(T - 1, device=ids.device).expand(B, -1)
        _, hidden, aux = target(ids[:, :-1], positions, cache, logits=False)  # hidden [B, T-1, H]
        features = drafter.pick_features(hidden, aux) if drafter is not None else None
        last_hidden = hidden[rows, (lens - 2).clamp(min=0)]
    cache.lens.copy_(lens - 1)
    root, ldlp_feat = seated(target, ids, lens, last_hidden)
    return Prefilled(root=root, ldlp_feat=ldlp_feat, features=features)


def prefill_batch(target: CausalLM, drafter: Drafter | None, ids: torch.Tensor, lens: torch.Tensor, cache: KVCache,
                  draft_cache: KVCache | None = None) -> Prefilled:
    """Prompts ids [B, T] (right-padded, lens [B]) into the target's `cache` and, given a drafter, their drafter
    entries into `draft_cache` (emptied here) or, without one, into the drafter's own cache (emptied by the caller):
    the Prefilled, with the drafter's opinion at each prompt's last entry as its `draft` (None without a drafter)."""
    pre = prefill_target(target, drafter, ids, lens, cache)
    if drafter is not None and draft_cache is None:
        pre.draft = drafter.prefill(ids, lens, pre.features)
    elif drafter is not None:
        draft_cache.lens.zero_()
        pre.draft = drafter.prefill_into(draft_cache, ids, lens, pre.features)
    return pre


class ChunkedPrefill:
    """Prompts ids [k, T] (right-padded, lens [k]) prefilled `chunk` positions per step() into `cache` (k rows)
    and, when `draft_cache` is given, the drafter's entries for the same positions into it (the drafter's own
    cache is left alone). When `done`: the caches hold what a whole prefill would have written, `prefilled` is
    its Prefilled (without features: they went to the drafter chunk by chunk) and `draft` the drafter's
    (logits [k, V], hidden [k, H] | None) at each prompt's last entry, or None without a drafter."""

    def __init__(self, target: CausalLM, drafter: Drafter | None, ids: torch.Tensor, lens: torch.Tensor,
                 cache: KVCache, draft_cache: KVCache | None, chunk: int):
        assert chunk >= 1, f"a prefill chunk needs at least one position, got {chunk}"
        assert (draft_cache is None) == (drafter is None), "a drafter needs a scratch cache, and only a drafter"
        self.target, self.drafter, self.ids, self.lens, self.chunk = target, drafter, ids, lens, chunk
        self.cache, self.draft_cache = cache, draft_cache
        k, T = ids.shape
        self.end = T - 1  # target positions to prefill: 0 .. T-2 (the last token is the root)
        self.cursor = 0  # positions [0, cursor) are in the caches
        self.steps = 0
        self.last_hidden = torch.zeros(k, target.cfg.hidden_size, dtype=target.dtype, device=ids.device)  # [k, H]
        self.draft: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the drafter's, so far
        self._drafted = drafter is None  # the drafter's last entries are in
        cache.lens.zero_()
        if draft_cache is not None:
            draft_cache.lens.zero_()
            if self.end == 0:  # one-token prompts: no target position, the drafter's entries only
                self._draft_entries(0, None)

    @property
    def done(self) -> bool:
        return self.cursor >= self.end and self._drafted

    def step(self) -> None:
        """Prefill the next chunk of positions (target, then the drafter)."""
        assert not self.done, "the prefill is done"
        a, b = self.cursor, min(self.cursor + self.chunk, self.end)
        k, rows = self.ids.shape[0], torch.arange(self.ids.shape[0], device=self.ids.device)
        self.cache.lens.fill_(a)  # every row attends to the chunks before (rows already past their end: padding)
        positions = torch.arange(a, b, device=self.ids.device).expand(k, -1)
        _, hidden, aux = self.target(self.ids[:, a:b], positions, self.cache, logits=False)  # hidden [k, b - a, H]
        last = self.lens - 2  # [k] the position whose hidden state the root's LDLP feature carries
        here = ((last >= a) & (last < b))[:, None]
        self.last_hidden = torch.where(here, hidden[rows, (last - a).clamp(0, b - a - 1)], self.last_hidden)
        self.cursor = b
        self.steps += 1
        if self.drafter is not None:
            self._draft_entries(a, self.drafter.pick_features(hidden, aux))
        if self.cursor >= self.end:
            self.cache.lens.copy_(self.lens - 1)

    def _draft_entries(self, a: int, feats: torch.Tensor | None) -> None:
        """The drafter's entries a.. for this chunk (entry e carries token e + shift and the feature at e): up to
        the chunk's end, or each prompt's last entry in the last chunk (a draft model has one more entry than the
        target has positions: the root)."""
        drafter, s, T = self.drafter, self.drafter.entry_shift, self.ids.shape[1]
        final = self.cursor >= self.end
        stop = T - s if final else self.cursor  # entries [a, stop)
        n_new = (self.lens - s - a).clamp(0, stop - a)  # [k]
        with drafter.using(self.draft_cache):
            logits, hidden = drafter.extend(self.ids[:, a + s: stop + s], feats, n_new)
        if self.draft is None:
            self.draft = (torch.zeros_like(logits), None if hidden is None else torch.zeros_like(hidden))
        some = (n_new > 0)[:, None]  # rows whose last entry is in this chunk, or later: keep the latest
        self.draft = (torch.where(some, logits, self.draft[0]),
                      None if hidden is None else torch.where(some, hidden, self.draft[1]))
        self._drafted = final

    @property
    def prefilled(self) -> Prefilled:
        assert self.done, "the prefill is not done"
        root, ldlp_feat = seated(self.target, self.ids, self.lens, self.last_hidden)
        return Prefilled(root=root, ldlp_feat=ldlp_feat, features=None)


@dataclass
class Loading:
    """A refill whose prompts prefill a chunk per round (`ChunkedPrefill`): the slots they will take (frozen until
    then), their rows, prompts and seeds."""

    slots: list[int]
    rows: list[int]
    prompts: list[list[int]]
    seeds: list[int]
    prefill: ChunkedPrefill
