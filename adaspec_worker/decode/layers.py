"""The blocks a decoder layer is made of: RMSNorm, RoPE application, attention over the cache, the gated MLP,
and the layer that chains them; plus the fast path's weight fusion (`fuse_linears`) and grouped mask (`gqa_mask`).

Architectures differ here only through `ModelConfig` fields: Qwen2's q/k/v biases (`attention_bias`), Qwen3's
per-head RMSNorm of q and k before RoPE (`qk_norm`) and o_proj bias (`o_proj_bias`), Phi-3's partial rotary
(`partial_rotary_factor`: cos/sin cover the first `rotary_dim` dims of each head, the rest pass unturned),
Gemma-2's (1 + w) norms around attention and MLP (`gemma_norms`), GELU(tanh) MLP (`hidden_act`), attention
scale and tanh soft cap (`attn_scale`, `attn_softcap`: `grouped_attention`, since SDPA has no cap).
Phi-3's fused checkpoint names (`qkv_proj`, `gate_up_proj`) are split on load (`model.load_target`), so every
architecture runs the same modules and the same fused path.

What it does not know: the cache's layout beyond the per-layer view it is handed, masks beyond the one it is
given, checkpoints, RoPE scaling (`rope.py` makes cos/sin), sampling or drafting.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import LayerCache
from .rope_kernel import Angles, rope_qkv
from .tree_attention import TreeSpan, tree_attention


class RMSNorm(nn.Module):
    """x / rms(x) * w; Gemma's (`offset`): in float32, times (1 + w), then back to x's dtype."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        """x [..., dim] -> [..., dim] (statistics in float32 for half types)."""
        dtype = x.dtype
        if self.offset:
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * (1.0 + self.weight.float())).to(dtype)
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def default_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """[D / 2] float32: RoPE's inverse frequencies without scaling."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, D] (HF's half-rotation convention)."""
    inv = default_inv_freq(head_dim, theta, positions.device)
    freqs = positions[..., None].float() * inv  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, R], R <= D: the first R dims of each head turn, the rest pass (partial)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


class Attention(nn.Module):
    """GQA attention over the cache. `in_features` differs from hidden only for EAGLE-3's midlayer."""

    def __init__(self, cfg: ModelConfig, in_features: int | None = None, bias: bool | None = None):
        super().__init__()
        d, h, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        fin = in_features or cfg.hidden_size
        b = cfg.attention_bias if bias is None else bias
        self.q_proj = nn.Linear(fin, h * d, bias=b)
        self.k_proj = nn.Linear(fin, hk * d, bias=b)
        self.v_proj = nn.Linear(fin, hk * d, bias=b)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by every head
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap  # Gemma-2; None: SDPA's default, no cap
        self.h, self.hk, self.d = h, hk, d
        self.qkv: nn.Linear | None = None  # set by fuse(): [q; k; v] in one GEMM
        self.rope_kernel = False  # RoPE and the [k; v] block in one Triton kernel (`rope_kernel.py`; set by the model)

    def fuse(self) -> None:
        object.__setattr__(self, "qkv", fuse_linears(self.q_proj, self.k_proj, self.v_proj))  # not a submodule

    def forward(self, x, cos, sin, cache: LayerCache, slots, mask):
        """x [B, T, Fin]; cos, sin [B, T, R] (or, with `rope_kernel` set, `Angles` and None); cache: this layer of
        the KV cache; slots [B, T];
        mask [B, T, S] bool (plain) or, once fused or soft-capped, [B, 1, T*G, S] additive (see `gqa_mask`), or
        a `TreeSpan` for the Triton kernel (`tree_attention.py`), which reads the cache up to each row's length."""
        B, T, _ = x.shape
        h, hk, d = self.h, self.hk, self.d
        if isinstance(cos, Angles):  # the fast path (`rope_kernel`): 1 GEMM + 2 kernels (KV write inside); sin unused
            q = rope_qkv(self.qkv(x), cos, cache, slots, h, hk, d)  # [B, T, H, D]; k, v into the cache at slots
            return self.o_proj(tree_attention(q, cache, mask, self.scale).reshape(B, T, h * d))
        if self.qkv is not None:
            q, k, v = self.qkv(x).split((h * d, hk * d, hk * d), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, h, d), k.view(B, T, hk, d)  # [B, T, H, D], [B, T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(B, T, hk, d)
        cache.write(slots, torch.stack((k, v), dim=2))  # [B, T, 2, Hkv, D]
        if isinstance(mask, TreeSpan):
            return self.o_proj(tree_attention(q, cache, mask, self.scale).reshape(B, T, h * d))
        keys = cache.kv[:, :, cache.index, 0].transpose(1, 2)  # [B, Hkv, S, D]
        vals = cache.kv[:, :, cache.index, 1].transpose(1, 2)
        if mask.dtype == torch.bool and self.softcap is None:  # plain path (unfused, no cap)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, vals, attn_mask=mask[:, None], enable_gqa=True, scale=self.scale
            )  # [B, H, T, D]
            return self.o_proj(out.transpose(1, 2).reshape(B, T, h * d))
        g = h // hk  # query heads per KV head: one attention over [B, Hkv, T*G, D], no K/V repeat
        if mask.dtype == torch.bool:  # a soft cap without the fused model's mask: the grouped layout too
            mask = gqa_mask(mask, g, q.dtype)
        qg = q.view(B, T, hk, g, d).permute(0, 2, 1, 3, 4).reshape(B, hk, T * g, d)
        out = grouped_attention(qg, keys, vals, mask, self.scale, self.softcap)  # [B, Hkv, T*G, D]
        return self.o_proj(out.view(B, hk, T, g, d).permute(0, 2, 1, 3, 4).reshape(B, T, h * d))


def grouped_attention(q, keys, vals, mask, scale: float | None, softcap: float | None) -> torch.Tensor:
    """q [B, Hkv, N, D], keys/vals [B, Hkv, S, D], mask [B, 1, N, S] additive -> [B, Hkv, N, D]. With a soft cap
    (Gemma-2) the scores are cap * tanh(scores / cap) before the mask, softmax in float32: SDPA has no cap."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)
    scores = q @ keys.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [B, Hkv, N, S]
    scores = torch.tanh(scores / softcap) * softcap + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ vals


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs; each input Linear's weight
    (and bias) becomes a view of the fused one, so memory stays as it was. Owners keep it outside their
    submodules, so state_dict names stay as they were; fuse after `.to(device, dtype)`, not before."""
    w = torch.cat([lin.weight for lin in linears], 0)  # [sum(out_i), in]
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears], 0), requires_grad=False)
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused.weight[at : at + n], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(fused.bias[at : at + n], requires_grad=False)
        at += n
    return fused


def gqa_mask(mask: torch.Tensor, groups: int, dtype) -> torch.Tensor:
    """mask [B, T, S] bool -> additive [B, 1, T*G, S] in `dtype`, rows ordered as the fused attention's queries."""
    B, T, S = mask.shape
    add = torch.zeros(B, T, S, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return add[:, None, :, None, :].expand(B, 1, T, groups, S).reshape(B, 1, T * groups, S)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.act = F.silu if act == "silu" else lambda x: F.gelu(x, approximate="tanh")  # config.ACTIVATIONS
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: nn.Linear | None = None  # set by fuse(): [gate; up] in one GEMM

    def fuse(self) -> None:
        object.__setattr__(self, "gate_up", fuse_linears(self.gate_proj, self.up_proj))  # not a submodule

    def forward(self, x):
        """x [B, T, H] -> [B, T, H]: down(act(gate(x)) * up(x))."""
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, -1)  # [B, T, I] each
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm MLP. Gemma-2 (`gemma_norms`): `post_attention_layernorm` normalises
    the attention's output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP."""

    def __init__(self, cfg: ModelConfig, input_norm: bool = True):
        super().__init__()
        H, eps, gemma = cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms
        self.input_layernorm = RMSNorm(H, eps, gemma) if input_norm else nn.Identity()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(H, eps, gemma)
        self.mlp = MLP(H, cfg.intermediate_size, cfg.hidden_act)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(H, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(H, eps, gemma)
        self.gemma = gemma

    def forward(self, h, cos, sin, cache: LayerCache, slots, mask):
        """h [B, T, H] -> [B, T, H]: attention, then MLP, each added to the residual."""
        a = self.self_attn(self.input_layernorm(h), cos, sin, cache, slots, mask)  # [B, T, H]
        if self.gemma:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))

    def fuse(self) -> None:
        self.self_attn.fuse()
        self.mlp.fuse()
