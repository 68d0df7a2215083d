"""Tree attention over the cache in one Triton kernel: the fast path's attention for CUDA.

What it does: for new tokens whose keys and values are already written to the cache, attends each query to
its row's committed slots (< lens[b]) and to the uncommitted slots lens[b] + j its tree mask allows, reading
the keys and values straight out of the cache layout (one layer of [B, S, L, 2, Hkv, D], any strides) and only up
to lens[b] + W, the row's live length (the static capacity S is never touched past it). One program serves
BLOCK_M query rows of one (row, KV head): the G query heads sharing a KV head are flattened with the tokens
(row m = token m // G, head m % G), so grouped-query attention needs no K/V repeat. Online softmax in float32.

What replaces it: on CPU, or without Triton, or with Gemma-2's soft cap, `layers.Attention` runs SDPA over a
dense [B, T, S] mask (`model.attention_mask`); the two paths are checked equal by `tests/test_tree_attention.py`
(Triton's interpreter on CPU) and on the GPU by `adarun bench`'s greedy-identity cells.

What it does not know: RoPE, projections, how the tree was built, or which slots were just written.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .kv_cache import LayerCache


@dataclass
class TreeSpan:
    """What the kernel needs instead of a dense mask: the committed length of each row and what each new token
    sees of the W = offset + T uncommitted slots after it."""

    lens: torch.Tensor  # [B] committed slots per row
    tree_mask: torch.Tensor  # [B, T, W] int8, contiguous (`span` makes it once per forward, not once per layer)


def span(lens: torch.Tensor, tree_mask: torch.Tensor) -> TreeSpan:
    """lens [B], tree_mask [B, T, W] bool or int8 (`CausalLM.forward` converts it once) -> the kernel's TreeSpan."""
    return TreeSpan(lens=lens, tree_mask=tree_mask.to(torch.int8).contiguous())


_KERNEL = None  # the jitted kernel once `available()` defined it
_MERGE = None  # the split partials' merge


@functools.cache
def available() -> bool:
    """Triton importable (the CUDA stack ships it; the CPU test extra installs it for the interpreter)."""
    global _KERNEL, _MERGE
    try:
        _KERNEL, _MERGE = _define()
    except ImportError:
        return False
    return True


def _define():
    import triton
    import triton.language as tl

    @triton.jit
    def tree_attention_kernel(
        q_ptr, kv_ptr, out_ptr, lens_ptr, mask_ptr,
        sq_b, sq_t, sq_h,  # q [B, T, H, D] strides (last dim contiguous)
        skv_b, skv_s, skv_c, skv_h,  # kv [B, S, 2, Hkv, D] strides
        so_b, so_t, so_h,  # out [B, T, H, D] strides
        sm_b, sm_t,  # tree mask [B, T, W] strides (last dim contiguous)
        T, W, scale, part_ptr, ml_ptr,
        G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)  # SPLITS > 1: this program's share of the row's live slots (flash-decoding)
        b = bh // HKV
        hk = bh % HKV
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] flattened (token, group head)
        t = rows // G
        head = hk * G + rows % G
        row_ok = t < T
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h + dims[None, :],
                    mask=row_ok[:, None], other=0.0)  # [M, D]
        length = tl.load(lens_ptr + b)
        live = length + W
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = kv_ptr + b * skv_b + hk * skv_h
        if SPLITS == 1:  # the whole row (the single pass: the same code as before the split existed)
            lo = 0
            hi = live
        else:
            chunk = tl.cdiv(tl.cdiv(live, SPLITS), BLOCK_N) * BLOCK_N
            lo = split * chunk
            hi = tl.minimum(live, lo + chunk)
        for start in range(lo, hi, BLOCK_N):  # the row's live slots only, never the whole capacity
            slots = start + tl.arange(0, BLOCK_N)  # [N]
            in_live = slots < hi
            k = tl.load(k_base + slots[:, None] * skv_s + dims[None, :], mask=in_live[:, None], other=0.0)  # [N, D]
            v = tl.load(k_base + skv_c + slots[:, None] * skv_s + dims[None, :], mask=in_live[:, None], other=0.0)
            s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # [M, N] (scale may arrive as float64)
            j = slots - length  # position in the uncommitted region
            in_tree = (j >= 0) & in_live
            tree = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + j[None, :],
                           mask=row_ok[:, None] & in_tree[None, :], other=0)
            seen = (j[None, :] < 0) | (in_tree[None, :] & (tree != 0))
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * so_b + t[:, None] * so_t + head[:, None] * so_h + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # the share's running max, sum and unnormalised output, merged by `merge_kernel`
            at = ((b * T + t) * (G * HKV) + head) * SPLITS + split  # [M] partials [B, T, H, SPLITS, ...]
            tl.store(part_ptr + at[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(ml_ptr + at * 2, m_i, mask=row_ok)
            tl.store(ml_ptr + at * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def merge_kernel(part_ptr, ml_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # one (row, token, head): out [B, T, H, D] contiguous
        sp = tl.arange(0, SPLITS)
        dims = tl.arange(0, D)
        m = tl.load(ml_ptr + (r * SPLITS + sp) * 2)
        el = tl.load(ml_ptr + (r * SPLITS + sp) * 2 + 1)
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
        total = tl.sum(el * w, 0)
        acc = tl.load(part_ptr + (r * SPLITS + sp)[:, None] * D + dims[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + r * D + dims, out.to(out_ptr.dtype.element_ty))

    return tree_attention_kernel, merge_kernel


def tree_attention(q: torch.Tensor, cache: LayerCache, where: TreeSpan, scale: float | None) -> torch.Tensor:
    """q [B, T, H, D] (rotated), one layer of the cache with the new tokens' keys and values already written
    at lens + offset + arange(T) -> [B, T, H, D]. Query t of row b sees slot s < lens[b], and slot lens[b] + j
    where tree_mask[b, t, j] (j < W)."""
    D = q.shape[-1]
    assert _KERNEL is not None, "tree_attention needs Triton: check available() first"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D}: the kernel takes a power of two from 16 to 256"
    assert q.stride(-1) == 1 and cache.kv.stride(-1) == 1, "q and the cache need a contiguous head_dim"
    scale = D**-0.5 if scale is None else scale
    return _tree_attention_op(q, cache.kv, cache.index, where.lens, where.tree_mask, scale)


# An opaque custom op, not a kernel inductor traces: it reads q, the cache, lens and the mask and writes only its
# output. It takes the whole cache and the layer's index, not a per-layer view: the compiled graph then hands it
# the cache buffer itself, with nothing to materialise (kv_cache.py says what a view costs under compile).
@torch.library.custom_op("adarun::tree_attention", mutates_args=())
def _tree_attention_op(q: torch.Tensor, kv: torch.Tensor, layer: int, lens: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    kv_layer = kv[:, :, layer]  # [B, S, 2, Hkv, D]
    B, T, H, D = q.shape
    hkv = kv_layer.shape[3]
    G = H // hkv
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    block_m = 16
    programs = triton_cdiv(T * G, block_m) * B * hkv
    splits = _splits(programs, T)
    part = torch.empty(B, T, H, splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    ml = torch.empty(B, T, H, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    # fixed: Triton's autotuner (block 32-256, 4-8 warps, 1-3 stages, timed per tree size) chose configurations
    # that were faster alone and slower in the round, 10.5 -> 17-21 us a call on an H100 (h100-kernel-default)
    block_n = 64
    _KERNEL[(triton_cdiv(T * G, block_m), B * hkv, splits)](
        q, kv_layer, out, lens, mask,
        q.stride(0), q.stride(1), q.stride(2),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        mask.stride(0), mask.stride(1),
        T, mask.shape[-1], scale, part, ml,
        G=G, HKV=hkv, D=D, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits,
    )
    if splits > 1:
        _MERGE[(B * T * H,)](part, ml, out, D=D, SPLITS=splits)
    return out


SPLIT_MAX_TOKENS = 64  # split only decode and tree passes: a prefill has programs enough, and its partials are big
# programs a pass aims for: "auto" splits each row's live slots until the grid has about this many
SPLIT_PROGRAMS = int(os.environ.get("ADARUN_ATTN_SPLIT_PROGRAMS", "128"))


def _splits(programs: int, T: int) -> int:
    """How many programs share a row's live slots (flash-decoding; a merge kernel follows). ADARUN_ATTN_SPLITS: unset
    or "auto" (the default), enough programs to reach SPLIT_PROGRAMS (ADARUN_ATTN_SPLIT_PROGRAMS, 128: about an
    H100's SMs; larger values, for batch 16's tree passes, not yet measured), at most 8; 1 (or 0), the single pass; an
    integer, that many (a power of two). Measured on an H100 (bench/results/h100-split): `none` +9.6% tok/s at
    batch 1 and +10.7% at batch 16, `eagle2` d4/t30 +8.6% and +2.3%, against the single pass in the same call."""
    want = os.environ.get("ADARUN_ATTN_SPLITS", "auto")
    if T > SPLIT_MAX_TOKENS or want in ("", "1", "0"):
        return 1
    if want == "auto":
        n = max(1, min(8, SPLIT_PROGRAMS // max(programs, 1)))
        return 1 << (n.bit_length() - 1)
    n = int(want)
    assert n >= 1 and n & (n - 1) == 0, f"ADARUN_ATTN_SPLITS={want}: a power of two, or auto"
    return n


@_tree_attention_op.register_fake
def _(q, kv, layer, lens, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def triton_cdiv(a, b):
    return (a + b - 1) // b
