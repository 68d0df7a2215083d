"""The target model: a small Llama-family transformer of our own, run over a static KV cache.

What it does: loads `LlamaForCausalLM`, `Qwen2ForCausalLM` (q/k/v biases), `Qwen3ForCausalLM` (q/k norm),
`MistralForCausalLM`, `Phi3ForCausalLM` (fused `qkv_proj` / `gate_up_proj` checkpoint names, split on load;
partial rotary) and `Gemma2ForCausalLM` (scaled embeddings, (1 + w) sandwich norms, soft caps) checkpoints
from a local Hugging Face directory (safetensors first; a pickled `.bin` only through
`torch.load(weights_only=True)`), and runs a forward pass over new tokens that sit at explicit
positions, attend to a per-row prefix of the cache plus an arbitrary (tree) mask among themselves,
and returns logits, the final-norm hidden state and, on request, intermediate layer features.

What it does not know: tokenization, drafting, sampling, Ray or files other than the checkpoint, nor
architectures outside `SUPPORTED_ARCHITECTURES` (plain decoding runs those through transformers:
`hf_engine.py`). It is deliberately not a copy of HF's modeling file: the blocks (`layers.py`) are one
attention, one MLP and one norm whose per-architecture differences are config fields; one cache layout.

Fast path (`CausalLM.fuse()`, done by `build_engine(fast=True)`): q/k/v and gate/up weights are
concatenated once (the separate projections become views of the fused weight, so checkpoints still
load and save by their usual names), grouped-query attention runs as one SDPA call over
[B, Hkv, T*G, D] with an additive mask built once per forward, and on CUDA every forward of at most
`compile_max_tokens` tokens per row (prompt prefills included) runs through `torch.compile` (inductor,
dynamic shapes) so RMSNorm, RoPE, the KV write and SiLU*mul fuse. On CUDA (unless ADARUN_TREE_KERNEL=0)
attention is one Triton kernel (`tree_attention.py`) reading the cache up to each row's live length with the
tree mask over the new slots only, and RoPE one more (`rope_kernel.py`). CPU stays on the plain PyTorch ops.

The cache and its mask arithmetic: `kv_cache.py`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import rope, rope_kernel, tree_attention
from .config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError, read_json  # noqa: F401  (re-exported)
from .kv_cache import KVCache, LayerCache, attention_mask, causal_tree, slots_and_mask  # noqa: F401  (re-exported)
from .layers import (  # noqa: F401  (re-exported: drafters build their layers from the same blocks)
    MLP,
    Attention,
    DecoderLayer,
    RMSNorm,
    apply_rope,
    fuse_linears,
    gqa_mask,
    rope_cos_sin,
)


def compiled(fn):
    """torch.compile (inductor, dynamic shapes: one graph serves every batch and tree size) with room for
    the few specialisations decoding meets (B or T of 1, offsets)."""
    import torch._dynamo
    import torch.fx.experimental._config

    torch.fx.experimental._config.use_duck_shape = False  # equal sizes (heads, rows) need not stay equal: no guard
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, dynamic=True)


def compile_wanted(device: torch.device) -> bool:
    """Compile on CUDA unless ADARUN_COMPILE=0."""
    return device.type == "cuda" and os.environ.get("ADARUN_COMPILE", "1") != "0"


def dense(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides for every dim (size-1 dims included, which `.contiguous()` leaves as they are):
    the compiled pass guards on strides, so an expanded or sliced input would recompile it."""
    want, step = [], 1
    for n in reversed(t.shape):
        want.append(step)
        step *= n
    return t if t.stride() == tuple(reversed(want)) else t.clone(memory_format=torch.contiguous_format)


class CausalLM(nn.Module):
    """Llama-family causal LM. `forward` returns (logits [B,T,V], final-norm hidden [B,T,H], aux features)."""

    # passes of more tokens per row run the plain ops; ADARUN_COMPILE_MAX_TOKENS overrides. Prefills are compiled
    # too (refills are frequent under continuous batching: 1.29x instead of 1.19x on an H100). The recompiles once
    # met there were stride guards (an expanded `positions`): `forward` hands the compiled pass contiguous inputs.
    compile_max_tokens = int(os.environ.get("ADARUN_COMPILE_MAX_TOKENS", "8192"))

    def __init__(self, cfg: ModelConfig, aux_layers: tuple[int, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.aux_layers = aux_layers  # layer outputs EAGLE-3 heads read (set by the drafter)
        self.fused = False
        self.kernel_attention = False  # attention through tree_attention.py's Triton kernel (set by fuse())
        self._compiled = None
        self.rope_freq: tuple[torch.Tensor, float] | None = None  # (inverse frequencies [R/2], attention factor)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, B: int, S: int) -> KVCache:
        c = self.cfg
        return KVCache(B, S, c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def fuse(self, compile: bool | None = None, kernel: bool | None = None) -> CausalLM:
        """Fused QKV and gate|up weights (idempotent); compile (default: on CUDA) the decode-shaped forward; the
        Triton tree-attention and RoPE kernels (default: on CUDA unless ADARUN_TREE_KERNEL=0; never with a soft cap)."""
        if not self.fused:
            for layer in self.layers:
                layer.fuse()
            self.fused = True
        if kernel is None:  # batch 64 `none`: 112.7k tok/s against 85.5k on SDPA, one H100 (h100-kernel-default)
            kernel = self.device.type == "cuda" and os.environ.get("ADARUN_TREE_KERNEL", "1") != "0"
        fits = self.cfg.attn_softcap is None and self.cfg.head_dim in (16, 32, 64, 128, 256)
        self.kernel_attention = bool(kernel and fits and tree_attention.available())
        longrope = self.cfg.rope_scaling.rope_type == "longrope"  # frequencies per position: the plain tables
        rope_fits = self.kernel_attention and not self.cfg.qk_norm and not longrope and rope_kernel.available()
        for layer in self.layers:
            layer.self_attn.rope_kernel = rope_fits
        # made once, outside the compiled pass: traced inside it, inductor recomputes the table for every layer
        self.rope_freq = rope.frequencies(self.cfg, self.device) if rope_fits else None
        if compile is None:
            compile = compile_wanted(self.device)
        if compile and self._compiled is None:
            self._compiled = compiled(self._body)
        return self

    def forward(self, ids, positions, cache: KVCache, tree_mask=None, offset: int = 0, logits: bool = True):
        """ids, positions [B, T]; new tokens go to slots cache.lens + offset + arange(T).

        tree_mask [B, T, offset + T]: what each new token sees of the uncommitted region (default causal);
        logits False: None in their place (a prefill's: no [B, T, V] block computed)."""
        B, T = ids.shape
        if tree_mask is None:
            tree_mask = causal_tree(B, T, ids.device)
        slots = None
        if self.kernel_attention:  # the kernels' int8 mask and slots made here: traced, inductor remade them per layer
            tree_mask = tree_mask.to(torch.int8)
            slots = cache.lens[:, None] + torch.arange(offset, offset + T, device=ids.device)[None, :]  # [B, T]
        if self._compiled is not None and T <= self.compile_max_tokens:  # one layout per input: no stride recompiles
            return self._compiled(dense(ids), dense(positions), cache.kv, cache.lens, dense(tree_mask), offset, logits,
                                  slots)
        return self._body(ids, positions, cache.kv, cache.lens, tree_mask, offset, logits, slots)

    def _body(self, ids, positions, kv, lens, tree_mask, offset: int, logits: bool = True, slots=None):
        """The pass itself over the cache tensors kv [B, S, L, 2, Hkv, D] and lens [B] (what torch.compile sees);
        slots [B, T] where the new tokens go (kernel path; default lens + offset + arange(T))."""
        T = ids.shape[1]
        if self.kernel_attention:  # the kernel reads lens and the tree mask itself: no [B, T, S] mask
            if slots is None:
                slots = lens[:, None] + offset + torch.arange(T, device=lens.device)[None, :]  # [B, T]
            mask = tree_attention.span(lens, tree_mask)
        else:
            slots, mask = slots_and_mask(lens, kv.shape[1], T, tree_mask, offset)
        h = self.embed_tokens(ids)  # [B, T, H]
        if self.cfg.embed_scale != 1.0:  # Gemma-2: sqrt(hidden), rounded to the weights' dtype first
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype, device=h.device)
        if not self.kernel_attention and (self.fused or self.cfg.attn_softcap is not None):  # grouped additive mask
            mask = gqa_mask(mask, self.cfg.num_heads // self.cfg.num_kv_heads, h.dtype)
        if self.layers[0].self_attn.rope_kernel:  # the kernel computes cos/sin itself (no per-layer tables)
            inv, att = self.rope_freq
            cos, sin = rope_kernel.Angles(positions=positions, inv_freq=inv, scale=att), None
        else:
            cos, sin = rope.cos_sin(positions, self.cfg, h.dtype)  # RoPE scaling: rope.py
        outs = {}
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, LayerCache(kv, i), slots, mask)
            if i in self.aux_layers:
                outs[i] = h
        hidden = self.norm(h)
        aux = torch.cat([outs[i] for i in self.aux_layers], -1) if self.aux_layers else None
        if not logits:
            return None, hidden, aux
        return self.head(hidden), hidden, aux

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., H] -> logits [..., V]."""
        out = self.lm_head(hidden)
        if self.cfg.final_softcap is not None:  # Gemma-2
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out


# ---------------------------------------------------------------- loading


def load_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded) first; a `.bin` only through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(model_dir, f)))
        return sd
    bins = sorted(f for f in os.listdir(model_dir) if f.endswith(".bin"))
    if bins:
        sd = {}
        for f in bins:
            try:
                sd.update(torch.load(os.path.join(model_dir, f), map_location="cpu", weights_only=True))
            except Exception as e:  # weights_only refuses arbitrary pickles
                raise ModelLoadError(f"{model_dir}/{f}: refused to unpickle ({type(e).__name__}: {e})") from None
        return sd
    raise ModelLoadError(f"{model_dir}: no *.safetensors or *.bin weights found")


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], where: str, optional: tuple[str, ...] = ()) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    if getattr(module, "cfg", None) is not None and getattr(module.cfg, "tie_word_embeddings", False):
        own.pop("lm_head.weight", None)
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own and k not in optional)
    if missing or unexpected:
        parts = ([f"missing keys {missing}"] if missing else []) + (
            [f"unexpected keys {unexpected}"] if unexpected else []
        )
        raise ModelLoadError(f"{where}: " + "; ".join(parts))
    for k, t in own.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ModelLoadError(f"{where}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    module.load_state_dict({k: sd[k] for k in own}, strict=False)  # every own key checked above


def split_fused(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused names -> ours: `qkv_proj` [(H + 2 Hkv) * D, hidden] into q/k/v_proj, `gate_up_proj` [2I, hidden]
    into gate/up_proj (gate first). Views of the loaded tensors; `fuse()` concatenates them back."""
    d, sizes = cfg.head_dim, (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    out = {}
    for k, v in sd.items():
        if k.endswith(".qkv_proj.weight") or k.endswith(".qkv_proj.bias"):
            stem, kind = k.rsplit(".qkv_proj.", 1)
            if v.shape[0] != sizes[0] + 2 * sizes[1]:
                raise ModelLoadError(f"{k} has {v.shape[0]} rows, expected {sizes[0] + 2 * sizes[1]} (heads x {d})")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split((sizes[0], sizes[1], sizes[1]), 0)):
                out[f"{stem}.{name}.{kind}"] = part
        elif k.endswith(".gate_up_proj.weight"):
            stem = k.removesuffix(".gate_up_proj.weight")
            gate, up = v.chunk(2, 0)  # [I, hidden] each
            out[f"{stem}.gate_proj.weight"], out[f"{stem}.up_proj.weight"] = gate, up
        else:
            out[k] = v
    return out


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    return names[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_target(model_dir: str, dtype: str = "auto", device: str = "auto") -> CausalLM:
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    cfg = ModelConfig.from_hf(read_json(cfg_path), where=cfg_path)
    sd = {k.removeprefix("model."): v for k, v in load_state_dict(model_dir).items()}
    if cfg.fused_checkpoint:
        sd = split_fused(sd, cfg)
    model = CausalLM(cfg)
    load_strict(model, sd, model_dir, optional=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    dev = resolve_device(device)
    return model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval().requires_grad_(False)
