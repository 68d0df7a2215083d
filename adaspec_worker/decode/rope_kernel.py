"""RoPE for q and k from the fused QKV projection, and the cache write of k and v, in one Triton kernel.

What it does: reads each new token's fused projection [q heads | k heads | v heads] (`Attention.qkv`'s output)
once, turns the first R dims of every q and k head (HF's half-rotation convention, R = the rotary dim, so
partial rotary works), writes the turned q as [B, T, H, D] and the turned k with v straight into the token's
cache slot (one layer of [B, S, L, 2, Hkv, D], at the slots the pass writes). The plain path is four kernels per
layer under inductor (the split, q's RoPE, k's RoPE, the cache's index write, and cos/sin tables inductor
recomputes per layer); this is one, computing cos/sin itself from the positions and the inverse frequencies
(`Angles`). Arithmetic in float32, rounded once to the model's dtype.

Where it runs: the fast path on CUDA, with the tree-attention kernel (`tree_attention.py`), for architectures
without Qwen3's q/k norm (that norm sits between the projection and RoPE). Checked equal to `layers.apply_rope`
and the plain cache write on CPU through Triton's interpreter (`tests/test_tree_attention.py`).

What it does not know: masks, which slots are committed, or which architecture it serves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .kv_cache import LayerCache


@dataclass
class Angles:
    """What the kernel turns by, in place of cos/sin tables: it computes cos/sin itself, so no per-layer tables."""

    positions: torch.Tensor  # [B, T] each new token's position
    inv_freq: torch.Tensor  # [R / 2] float32 inverse frequencies (RoPE scaling applied)
    scale: float = 1.0  # attention factor cos and sin are multiplied by (YaRN, longrope); 1.0 otherwise

_KERNEL = None  # the jitted kernel once `available()` defined it


@functools.cache
def available() -> bool:
    global _KERNEL
    try:
        _KERNEL = _define()
    except ImportError:
        return False
    return True


def _define():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_qkv_kernel(x_ptr, pos_ptr, inv_ptr, q_ptr, kv_ptr, slot_ptr, att, T, stride_b, stride_s, layer_at,
                        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NH: tl.constexpr):
        bt = tl.program_id(0)  # one program per (row, token)
        heads = tl.arange(0, NH)[:, None]  # [NH, 1] q heads, k heads, v heads (padded to a power of two)
        dims = tl.arange(0, D)[None, :]  # [1, D]
        real = heads < H + 2 * HKV
        half = R // 2
        x = tl.load(x_ptr + bt * (H + 2 * HKV) * D + heads * D + dims, mask=real, other=0.0).to(tl.float32)
        partner = tl.where(dims < half, dims + half, dims - half)
        turned = (heads < H + HKV) & (dims < R)  # q and k heads, rotary dims
        xp = tl.load(x_ptr + bt * (H + 2 * HKV) * D + heads * D + partner, mask=real & turned, other=0.0)
        xp = xp.to(tl.float32)
        angle = tl.load(pos_ptr + bt).to(tl.float32) * tl.load(inv_ptr + tl.where(dims < half, dims, dims - half),
                                                                mask=dims < R, other=0.0)  # [1, D]
        c = tl.cos(angle) * att
        s = tl.sin(angle) * att
        y = tl.where(turned, x * c + tl.where(dims < half, -xp, xp) * s, x)
        tl.store(q_ptr + bt * H * D + heads * D + dims, y.to(q_ptr.dtype.element_ty), mask=heads < H)
        # k and v heads straight into the token's cache slot, whose [2, HKV, D] block is contiguous: (heads - H) * D + d
        row = (bt // T).to(tl.int64)
        slot = tl.load(slot_ptr + bt).to(tl.int64)
        dest = kv_ptr + row * stride_b + slot * stride_s + layer_at
        tl.store(dest + (heads - H) * D + dims, y.to(kv_ptr.dtype.element_ty), mask=real & (heads >= H))

    return rope_qkv_kernel


def rope_qkv(x: torch.Tensor, angles: Angles, cache: LayerCache, slots: torch.Tensor, H: int, HKV: int,
             D: int) -> torch.Tensor:
    """x [B, T, (H + 2 Hkv) * D] (contiguous) turned by `angles` -> q [B, T, H, D]; the turned keys and the values
    are written to `cache` (one layer of kv [B, S, L, 2, Hkv, D]) at slots [B, T], in place."""
    assert _KERNEL is not None, "rope_qkv needs Triton: check available() first"
    R = 2 * angles.inv_freq.shape[0]
    assert x.shape[-1] == (H + 2 * HKV) * D and x.is_contiguous(), "x must be the fused projection, contiguous"
    assert D in (16, 32, 64, 128, 256) and R % 2 == 0 and R <= D, f"head_dim {D} / rotary dim {R} unsupported"
    kv = cache.kv
    assert kv.shape[3:] == (2, HKV, D) and kv.stride()[3:] == (HKV * D, D, 1), "a slot's [2, Hkv, D] must be contiguous"
    return _rope_qkv_op(x, angles.positions.contiguous(), angles.inv_freq, float(angles.scale), kv, cache.index,
                        slots.contiguous(), H, HKV, D)


# an opaque custom op (see tree_attention.py: inductor clones the inputs of user kernels it cannot analyse) that
# writes the cache in place (declared: the compiled pass orders the layer's attention after it)
@torch.library.custom_op("adarun::rope_qkv", mutates_args=("kv",))
def _rope_qkv_op(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, kv: torch.Tensor,
                 layer: int, slots: torch.Tensor, H: int, HKV: int, D: int) -> torch.Tensor:
    B, T, _ = x.shape
    q = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    nh = 1 << (H + 2 * HKV - 1).bit_length()  # heads padded to a power of two
    _KERNEL[(B * T,)](x, positions, inv_freq, q, kv, slots, scale, T, kv.stride(0), kv.stride(1), layer * kv.stride(2),
                      H=H, HKV=HKV, D=D, R=2 * inv_freq.shape[0], NH=nh)
    return q


@_rope_qkv_op.register_fake
def _(x, positions, inv_freq, scale, kv, layer, slots, H, HKV, D):
    B, T, _ = x.shape
    return x.new_empty(B, T, H, D)
