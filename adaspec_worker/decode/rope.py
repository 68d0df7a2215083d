"""RoPE scaling: inverse frequencies and the attention factor for `default`, `linear`, `dynamic`, `llama3`,
`yarn` and `longrope` (Phi-3) rope types, read from a Hugging Face config's `rope_scaling` / `rope_parameters`.

`decode.config.RopeScaling.from_hf(cfg)` parses and validates (torch-free, for the controller's
preflight); `cos_sin(positions, cfg, dtype)` is what the model calls. The formulas follow
transformers' `modeling_rope_utils` (float32 frequencies, cos/sin multiplied by the attention factor).
`dynamic` (NTK) changes the frequencies only past `max_position_embeddings`, which our context never
exceeds (prompt + max_new_tokens <= the context), so within it it equals the default.
`longrope` divides the frequencies by `short_factor` at positions below `original_max_position_embeddings` and
by `long_factor` from there on, and scales cos/sin by sqrt(1 + ln(factor) / ln(original)) (or the config's
`attention_factor`). The set is chosen per position, so a position's rotation never changes and a row's text
depends on neither its batch companions nor the draft tree. That is what transformers' model computes step by
step over its KV cache (its rotary module picks the long set once a pass reaches past the original context; the
cached keys keep theirs). Its `generate` adds one step we do not take: when a sequence first grows past the
original context it drops the cache and re-encodes everything with the long factors, and a prompt already past
it is encoded with the long factors throughout, where we rotate its first `original_max_position_embeddings`
positions with the short ones. Texts that stay within the original context are identical either way.
Knows nothing of attention, caches or checkpoints.
"""

from __future__ import annotations

import functools
import math

from .config import RopeScaling


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, s: RopeScaling, device: str):
    """(inverse frequencies [head_dim/2] float32, attention factor) for one configuration and device."""
    import torch

    dim = head_dim
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    inv = 1.0 / base
    if s.rope_type in ("default", "dynamic"):
        return inv, 1.0
    if s.rope_type == "linear":
        return inv / s.factor, 1.0
    if s.rope_type == "llama3":
        low_wl = s.original_max_position_embeddings / s.low_freq_factor
        high_wl = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    att = s.attention_factor
    if att is None:
        att = (
            _mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim)
            if s.mscale and s.mscale_all_dim
            else _mscale(s.factor)
        )

    def corr(rot: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr(s.beta_fast), corr(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extra = 1 - ramp
    return (1.0 / (s.factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(att)


@functools.lru_cache(maxsize=64)
def _longrope(head_dim: int, theta: float, s: RopeScaling, device: str):
    """(short inverse frequencies [head_dim/2], long ones [head_dim/2], attention factor), float32."""
    import torch

    att = s.attention_factor
    if att is None:
        att = 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_position_embeddings))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    short, long = (1.0 / (torch.tensor(f, dtype=torch.float32, device=device) * theta**shape)
                   for f in (s.short_factor, s.long_factor))
    return short, long, float(att)


def cos_sin(positions, cfg, dtype):
    """positions [B, T] -> cos, sin [B, T, R] for a `ModelConfig` (HF's half-rotation convention); R = the
    config's `rotary_dim` (head_dim unless a partial rotary factor turns fewer dims)."""
    import torch

    s = cfg.rope_scaling
    if s.rope_type == "longrope":  # per position: short factors inside the original context, long past it
        short, long, att = _longrope(cfg.rotary_dim, float(cfg.rope_theta), s, str(positions.device))
        inv = torch.where(positions[..., None] >= s.original_max_position_embeddings, long, short)  # [B, T, D/2]
    else:
        inv, att = _inv_freq(cfg.rotary_dim, float(cfg.rope_theta), s, str(positions.device))
    freqs = positions[..., None].float() * inv  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    if att == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * att).to(dtype), (emb.sin() * att).to(dtype)


def frequencies(cfg, device):
    """The config's inverse frequencies [R / 2] (float32, scaling applied) and attention factor: what the RoPE
    kernel (`rope_kernel.Angles`) turns by. Not for longrope, whose frequencies depend on the position."""
    assert cfg.rope_scaling.rope_type != "longrope", "longrope picks its frequencies per position: use cos_sin"
    return _inv_freq(cfg.rotary_dim, float(cfg.rope_theta), cfg.rope_scaling, str(device))
