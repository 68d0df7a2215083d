"""The early-exit drafter (EESD, Liu et al., 2024, arXiv 2406.03853): the target's first N layers, then a head.

`EarlyExitHead` drafts with the target's own layers < N (shared weights, not copies), then its own small head
on layer N's hidden state: an optional adapter decoder layer (trained), an RMSNorm (trained) and the
target's lm_head (shared). It keeps its own KV cache of N (+1 with the adapter) layers, with entries as a
draft model's (entry i = token x[i]; `drafters.Drafter` explains entries), so the engine drives it like
any drafter. `train.early_exit` trains the head by self-distillation; this module loads and saves it.

On disk (a directory, like a head): config.json = the target's config plus `early_exit_layer` (N) and
`early_exit_adapter` (bool); model.safetensors = `norm.weight` and, with the adapter, `adapter.*`.
Registered as the "early-exit" drafter kind. Knows nothing of trees, verification or draft lengths.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from . import rope
from .drafters import Drafter, register_drafter
from .model import (
    CausalLM,
    DecoderLayer,
    KVCache,
    LayerCache,
    ModelConfig,
    ModelLoadError,
    RMSNorm,
    causal_tree,
    compile_wanted,
    compiled,
    gqa_mask,
    load_state_dict,
    load_strict,
    read_json,
    slots_and_mask,
)


class EarlyExitHead(nn.Module, Drafter):
    entry_shift = 0

    def __init__(self, cfg: ModelConfig, exit_layer: int, adapter: bool = True):
        super().__init__()
        self.cfg = cfg
        self.exit_layer = exit_layer
        self.adapter = DecoderLayer(cfg) if adapter else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._compiled = None

    def attach(self, target: CausalLM) -> EarlyExitHead:
        if not 1 <= self.exit_layer <= target.cfg.num_layers:
            raise ModelLoadError(f"early_exit_layer {self.exit_layer} is not in [1, {target.cfg.num_layers}]")
        self.target = [target]  # a list keeps the target out of this module's parameters
        return self

    def stack(self) -> list[nn.Module]:
        """The decoder layers a draft step runs: the target's first N, then the adapter."""
        layers = list(self.target[0].layers[: self.exit_layer])
        return layers + ([self.adapter] if self.adapter is not None else [])

    def new_cache(self, B: int, S: int) -> KVCache:
        c = self.cfg
        w = self.norm.weight
        return KVCache(B, S, len(self.stack()), c.num_kv_heads, c.head_dim, w.dtype, w.device)

    def fuse(self, compile: bool | None = None) -> None:
        """Fused adapter weights (the target fuses its own layers); compile (default: on CUDA) the draft pass."""
        if self.adapter is not None and self.adapter.self_attn.qkv is None:
            self.adapter.fuse()
        if compile is None:
            compile = compile_wanted(self.norm.weight.device)
        if compile and self._compiled is None:
            self._compiled = compiled(self._body)

    def forward(self, toks, hidden, pos, mask, offset, logits: bool = True):
        small = self._compiled is not None and toks.shape[1] <= CausalLM.compile_max_tokens
        body = self._compiled if small else self._body
        out = body(toks, pos, self.cache.kv, self.cache.lens, mask, offset, logits)
        return (out, None) if logits else (None, out)

    def head(self, state):
        return self.target[0].lm_head(state)

    def _body(self, toks, pos, kv, lens, mask, offset: int, logits: bool = True):
        """toks, pos [B, T]; kv [B, S, L', 2, Hkv, D]; lens [B]; mask [B, T, offset + T] -> logits [B, T, V] (or,
        logits False, the normed hidden states [B, T, H] that head() maps to them)."""
        tgt = self.target[0]
        slots, full_mask = slots_and_mask(lens, kv.shape[1], toks.shape[1], mask, offset)
        h = tgt.embed_tokens(toks)
        fused_mask = None
        cos, sin = rope.cos_sin(pos, tgt.cfg, h.dtype)
        for i, layer in enumerate(self.stack()):
            m = full_mask
            if layer.self_attn.qkv is not None:  # a fused layer takes the additive grouped-query mask
                if fused_mask is None:
                    fused_mask = gqa_mask(full_mask, self.cfg.num_heads // self.cfg.num_kv_heads, h.dtype)
                m = fused_mask
            h = layer(h, cos, sin, LayerCache(kv, i), slots, m)
        h = self.norm(h)
        return self.head(h) if logits else h

    def head_forward(self, exit_hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Training: layer N's hidden states over whole blocks [B, T, H] (no cache) -> the head's logits [B, T, V]."""
        B, T, _ = exit_hidden.shape
        h = exit_hidden
        if self.adapter is not None:
            c = self.cfg
            cache = KVCache(B, T, 1, c.num_kv_heads, c.head_dim, h.dtype, h.device)
            slots, mask = cache.slots_and_mask(T, causal_tree(B, T, h.device))
            cos, sin = rope.cos_sin(pos, c, h.dtype)
            h = self.adapter(h, cos, sin, LayerCache(cache.kv, 0), slots, mask)
        return self.target[0].lm_head(self.norm(h).to(self.target[0].dtype))


def exit_hidden(target: CausalLM, ids: torch.Tensor, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target pass over whole blocks ids [B, T]: (layer `exit_layer`'s output [B, T, H], logits [B, T, V])."""
    B, T = ids.shape
    saved = target.aux_layers
    target.aux_layers = (exit_layer - 1,)
    try:
        logits, _, aux = target(ids, torch.arange(T, device=ids.device).expand(B, T), target.new_cache(B, T))
    finally:
        target.aux_layers = saved
    return aux, logits


def new_head(target: CausalLM, target_cfg: dict, exit_layer: int, adapter: bool = True) -> EarlyExitHead:
    """A head to train: the norm starts as the target's final norm, the adapter as the target's layer N
    (the one it stands in for; the last layer when N is the whole target). float32, on the target's device."""
    head = EarlyExitHead(ModelConfig.from_hf(target_cfg), exit_layer, adapter)
    head = head.to(device=target.device, dtype=torch.float32).attach(target)
    with torch.no_grad():
        head.norm.weight.copy_(target.norm.weight)
        if adapter:
            src = target.layers[min(exit_layer, target.cfg.num_layers - 1)].state_dict()
            head.adapter.load_state_dict({k: v.float() for k, v in src.items()})
    return head


def save_early_exit_head(head: EarlyExitHead, target_cfg: dict, path: str) -> None:
    """config.json (the target's plus early_exit_layer, early_exit_adapter) and model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = dict(target_cfg, early_exit_layer=head.exit_layer, early_exit_adapter=head.adapter is not None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


@register_drafter("early-exit")
def load_early_exit_head(path: str, target: CausalLM) -> Drafter:
    """A head directory from `adarun train-draft --early-exit N` (or `save_early_exit_head`)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: no config.json")
    raw = read_json(cfg_path)
    if "early_exit_layer" not in raw:
        raise ModelLoadError(f"{cfg_path}: no early_exit_layer (not a head from adarun train-draft --early-exit)")
    cfg = ModelConfig.from_hf(raw, where=cfg_path)
    for name in ("hidden_size", "vocab_size", "num_heads", "num_kv_heads"):
        if getattr(cfg, name) != getattr(target.cfg, name):
            raise ModelLoadError(
                f"{cfg_path}: {name} {getattr(cfg, name)} does not match the target's {getattr(target.cfg, name)}"
            )
    head = EarlyExitHead(cfg, int(raw["early_exit_layer"]), bool(raw.get("early_exit_adapter", True)))
    load_strict(head, load_state_dict(path), path)
    head = head.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
    try:
        return head.attach(target)
    except ModelLoadError as e:
        raise ModelLoadError(f"{cfg_path}: {e}") from None
