"""The KV cache: one pre-allocated tensor for every layer, the per-layer handle attention writes through, and the
slot and mask arithmetic of new tokens.

Cache layout: one tensor `kv` of shape [B, S, L, 2, Hkv, D]. Slot s of row b holds the rotated key and the value
of the token at sequence position s. Keeping the layer axis inside the slot lets KV compaction after
verification move every layer of a row in one gather (`KVCache.compact`).

Writes go through the whole tensor (`LayerCache.write`: one index_put over the batch, slot and layer axes), never
through a per-layer view: under torch.compile a write into a view of a graph input is functionalised into a
layer-sized copy per layer plus a copy back at the end of the pass (found in inductor's generated code; on an
H100 it cost batch-64 decoding most of its speed), while a write into the input itself is done in place.

What it does not know: models, attention kernels, drafting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """Layer `index` of a cache: what one attention reads and writes."""

    kv: torch.Tensor  # [B, S, L, 2, Hkv, D] the whole cache
    index: int

    def write(self, slots: torch.Tensor, new: torch.Tensor) -> None:
        """new [B, T, 2, Hkv, D] (keys and values) into slots [B, T] of this layer, in place."""
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)  # [B, T]
        layer = torch.full_like(slots, self.index)
        self.kv.index_put_((rows, slots, layer), new.to(self.kv.dtype))

    @property
    def view(self) -> torch.Tensor:
        """[B, S, 2, Hkv, D] this layer's keys and values (a view: read, never written through)."""
        return self.kv[:, :, self.index]


def attention_mask(lens: torch.Tensor, tree_mask: torch.Tensor, S: int) -> torch.Tensor:
    """Row b's new token t sees cache slots < lens[b] and slot lens[b]+j where tree_mask[b, t, j].

    lens [B]; tree_mask [B, T, W] bool (W = slots of the uncommitted region) -> [B, T, S] bool."""
    B, T, W = tree_mask.shape
    rel = torch.arange(S, device=lens.device)[None, :] - lens[:, None]  # [B, S]
    in_new = (rel >= 0) & (rel < W)
    idx = rel.clamp(0, W - 1)[:, None, :].expand(B, T, S)
    return (rel < 0)[:, None, :] | (in_new[:, None, :] & torch.gather(tree_mask, 2, idx))


def slots_and_mask(lens: torch.Tensor, S: int, T: int, tree_mask: torch.Tensor, offset: int = 0):
    """lens [B] -> slots [B, T] the T new tokens are written to, and their attention mask [B, T, S] bool."""
    assert tree_mask.shape[-1] == offset + T, f"tree mask covers {tree_mask.shape[-1]} slots, expected {offset + T}"
    slots = lens[:, None] + offset + torch.arange(T, device=lens.device)[None, :]
    return slots, attention_mask(lens, tree_mask, S)


def compact(kv: torch.Tensor, lens: torch.Tensor, src: torch.Tensor, n_keep: torch.Tensor) -> None:
    """kv [B, S, L, 2, Hkv, D], lens [B]: move slots lens+src[b, j] to lens+j (j < P) over every layer, then commit
    n_keep[b] of them; in place. src [B, P] indexes the block the last forward wrote (0 = its first token)."""
    B, P = src.shape
    bi = torch.arange(B, device=src.device)[:, None]
    dst = lens[:, None] + torch.arange(P, device=src.device)[None, :]
    kv[bi, dst] = kv[bi, lens[:, None] + src]
    lens += n_keep


def move_rows(buf: torch.Tensor, order: Sequence[int]) -> bool:
    """buf[:n] = buf[order] along dim 0 (n = len(order)) by one row copy per moved row, with no temporary, when no
    row is read after an earlier move overwrote it (true when the kept rows are in ascending order, as shrinking a
    batch keeps them); returns False, having done nothing, otherwise."""
    moves = [(i, r) for i, r in enumerate(order) if r != i]
    written: set[int] = set()
    for i, r in moves:
        if r in written:
            return False
        written.add(i)
    for i, r in moves:
        buf[i].copy_(buf[r])
    return True


def causal_tree(B: int, T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)


class KVCache:
    """Pre-allocated cache: kv [B, S, L, 2, Hkv, D]; lens [B] = committed slots per row.

    `kv` and `lens` are views of the first B rows of buffers allocated once at capacity, so a batch
    that shrinks keeps its memory addresses (what CUDA graphs captured over it need)."""

    def __init__(self, B: int, S: int, L: int, Hkv: int, D: int, dtype, device):
        self.full_kv = torch.zeros(B, S, L, 2, Hkv, D, dtype=dtype, device=device)
        self.full_lens = torch.zeros(B, dtype=torch.long, device=device)
        self.view(B)

    def view(self, B: int) -> None:
        self.kv, self.lens = self.full_kv[:B], self.full_lens[:B]

    @property
    def capacity(self) -> int:
        return self.kv.shape[1]

    def fits(self, B: int, S: int) -> bool:
        return self.full_kv.shape[0] >= B and self.full_kv.shape[1] == S

    def slots_and_mask(self, T: int, tree_mask: torch.Tensor, offset: int = 0):
        """Slots [B, T] the T new tokens are written to, and their attention mask [B, T, S]."""
        return slots_and_mask(self.lens, self.capacity, T, tree_mask, offset)

    def compact(self, src: torch.Tensor, n_keep: torch.Tensor) -> None:
        """Move new slots lens+src[b, j] to lens+j (j < P) and commit n_keep[b] of them.

        src [B, P] indexes the block written by the last forward (0 = its first token)."""
        compact(self.kv, self.lens, src, n_keep)

    def select(self, rows: torch.Tensor, order: Sequence[int] | None = None) -> None:
        """Keep `rows` (indices into the current batch), moved to the front, in place. With `order` (the same indices
        on the host) the rows move one by one where they can (`move_rows`), not through a copy of the whole kept
        cache: that copy was a batch-16 `eagle2` call's peak, 36 of its 245 MiB on an H100
        (bench/results/h100-head-retrain/memory-b16.json)."""
        n = rows.shape[0]
        if order is None or not move_rows(self.full_kv, order):
            self.full_kv[:n] = self.full_kv[rows]
        self.full_lens[:n] = self.full_lens[rows]
        self.view(n)

    def load_rows(self, rows: torch.Tensor, src: KVCache) -> None:
        """Rows `rows` [k] of this cache become a copy of `src` (k rows, capacity at most this one's)."""
        self.kv[rows, : src.capacity] = src.kv
        self.lens[rows] = src.lens


