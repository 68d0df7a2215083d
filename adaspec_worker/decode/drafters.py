"""Drafters: the cheap models that propose tokens. Each keeps its own KV cache in step with the target.

  - `EagleHead`   EAGLE-1/2 head (Li et al., 2024) in the EAGLE project's published format:
                  config.json (Llama-shaped; non-standard `bias` decides fc.bias, default true),
                  `fc.weight` [H, 2H] over concat(embedding of the next token, target feature),
                  `layers.0.*` without `input_layernorm`; no lm_head and no embeddings of its own
                  (both are the target's; a copied `embed_tokens.weight` is accepted and ignored).
  - `Eagle3Head`  EAGLE-3 head: `fc` [H, 3H] over three target layers' features, `midlayer.*` whose
                  q/k/v read 2H (normed embedding ++ normed hidden), `norm`, its own `lm_head` over a
                  reduced vocabulary mapped back with `d2t` (target_id = draft_id + d2t[draft_id]).
  - `DraftModel`  an independent small causal LM sharing the target's tokenizer (classic
                  speculative decoding; Leviathan et al., 2023).

Entries. A drafter's cache holds "entries". For EAGLE heads entry i pairs token x[i+1] with the
target's feature at position i; for a draft model entry i is token x[i]. Either way, after a round
that accepted n tokens the drafter appends n + 1 entries whose tokens are (accepted..., bonus),
and its output at the last entry drafts the next token. Tree nodes at draft level d sit at
position `len + d - 1`.

Drafters know nothing of verification, sampling or how trees are shaped.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from . import rope_kernel, tree_attention
from .layers import default_inv_freq
from .model import (
    MLP,
    Attention,
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
    dense,
    gqa_mask,
    load_state_dict,
    load_strict,
    load_target,
    read_json,
    rope_cos_sin,
    slots_and_mask,
)

DRAFTERS: dict[str, Callable[..., Drafter]] = {}


def register_drafter(name: str):
    def deco(fn):
        DRAFTERS[name] = fn
        return fn
    return deco


class Drafter:
    """Interface shared by all drafters. `pick_features` says what of the target's pass it reads per entry."""

    entry_shift = 0  # EAGLE: entry i carries token x[i+1] (shift 1); draft model: x[i] (shift 0)
    carries_hidden = False  # EAGLE: the next draft step reads this step's hidden state; draft models: None

    # forward(toks, feats, pos, mask, offset, logits=True) -> (logits [B, T, V] | None, state [B, T, *] | None):
    # with logits False no [B, T, V] block is made and `state` is what head() maps to logits (extend() takes the
    # logits of each row's last entry only); with logits True `state` is the carried hidden state, or None.

    def head(self, state: torch.Tensor) -> torch.Tensor:
        """forward(logits=False)'s state [..., *] -> logits [..., V]."""
        raise NotImplementedError

    def pick_features(self, hidden: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor | None:
        """The target feature this drafter reads per entry, from the target pass's final-norm hidden
        states [B, T, H] and its auxiliary layers' inputs [B, T, 3H] (EAGLE-3 only)."""
        return hidden

    def begin(self, B: int, S: int) -> bool:
        """A cache for B rows of S slots; reuses the last one when it fits. True when newly allocated."""
        cache = getattr(self, "cache", None)
        if cache is not None and cache.fits(B, S):
            cache.view(B)
            return False
        self.cache = self.new_cache(B, S)
        return True

    def select(self, rows: torch.Tensor, order: list[int] | None = None) -> None:
        self.cache.select(rows, order)

    def admit(self, rows: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor, feats: torch.Tensor | None):
        """Continuous batching: prefill new prompts into cache rows `rows` [k] through a scratch cache of the
        same capacity (so each row's numbers are those of a fresh batch); returns prefill()'s (logits, hidden)."""
        scratch = self.new_cache(ids.shape[0], self.cache.capacity)
        out = self.prefill_into(scratch, ids, lens, feats)
        self.cache.load_rows(rows, scratch)
        return out

    @contextmanager
    def using(self, cache) -> Iterator[None]:
        """Inside the block the drafter reads and writes `cache` (a scratch cache) instead of its own."""
        main, self.cache = getattr(self, "cache", None), cache
        try:
            yield
        finally:
            self.cache = main

    def prefill_into(self, scratch, ids: torch.Tensor, lens: torch.Tensor, feats: torch.Tensor | None):
        """prefill() into `scratch` (a cache of ids' rows) instead of the drafter's own cache."""
        with self.using(scratch):
            return self.prefill(ids, lens, feats)

    def prefill(self, ids: torch.Tensor, lens: torch.Tensor, feats: torch.Tensor | None):
        """ids [B, T] right-padded prompts, lens [B]; feats [B, T, F] at every prompt position but the last."""
        s = self.entry_shift
        return self.extend(ids[:, s:], None if feats is None else feats[:, : ids.shape[1] - s], lens - s)

    def extend(self, toks, feats, n_new):
        """Append n_new[b] entries (toks [B, W], feats [B, W, F]); return (logits [B, V], hidden) at each row's
        last one."""
        B, W = toks.shape
        if W == 0:  # EAGLE on one-token prompts: no entry yet, so no opinion on the first draft
            tgt = self.target[0]
            return (torch.zeros(B, tgt.cfg.vocab_size, dtype=tgt.dtype, device=toks.device),
                    torch.zeros(B, tgt.cfg.hidden_size, dtype=tgt.dtype, device=toks.device))
        pos = self.cache.lens[:, None] + torch.arange(W, device=toks.device)[None, :]
        _, state = self.forward(toks, self.lift(feats), pos, causal_tree(B, W, toks.device), 0, logits=False)
        last = (n_new - 1).clamp(min=0)
        bi = torch.arange(B, device=toks.device)
        self.cache.lens += n_new
        some = (n_new > 0)[:, None]  # rows without a new entry get the same blank opinion as when alone
        state = state[bi, last]  # [B, *]: logits at the last entries only, not a [B, W, V] block
        return (torch.where(some, self.head(state), 0.0),
                torch.where(some, state, 0.0) if self.carries_hidden else None)

    def step(self, toks, hidden, level: int, offset: int, mask):
        """Run tree nodes of draft level `level` (toks [B, T]) in the scratch region after the committed entries."""
        pos = (self.cache.lens + level - 1)[:, None].expand_as(toks)
        return self.forward(toks, hidden, pos, mask, offset)

    def lift(self, feats):
        return feats

    def fuse(self) -> None:
        """The fast path (fused weights; compiled on CUDA) where this drafter has one."""


class DraftModel(Drafter):
    entry_shift = 0

    def __init__(self, model: CausalLM):
        self.model = model
        self.new_cache = model.new_cache

    def fuse(self) -> None:
        self.model.fuse()

    def forward(self, toks, hidden, pos, mask, offset, logits: bool = True):
        out, final, _ = self.model(toks, pos, self.cache, mask, offset, logits=logits)
        return (out, None) if logits else (None, final)

    def head(self, state):
        return self.model.head(state)


class EagleHead(nn.Module, Drafter):
    entry_shift = 1
    carries_hidden = True

    def __init__(self, cfg: ModelConfig, fc_bias: bool):
        super().__init__()
        self.cfg = cfg = cfg.llama_shaped()  # a Llama layer whatever the target (no Qwen3 q/k norm, ...)
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg, input_norm=False)])
        self.fused = False
        self._compiled = None
        self.kernel_attention = False  # attention through the target's Triton kernel (set by fuse(), as the target's)

    def attach(self, target: CausalLM) -> EagleHead:
        self.target = [target]  # a list keeps the target out of this module's parameters
        return self

    def new_cache(self, B, S):
        c = self.cfg
        return KVCache(B, S, 1, c.num_kv_heads, c.head_dim, self.fc.weight.dtype, self.fc.weight.device)

    def fuse(self, compile: bool | None = None) -> None:
        """Fused QKV and gate|up weights (idempotent); compile (default: on CUDA) the draft-shaped forward."""
        if not self.fused:
            self.layers[0].fuse()
            self.fused = True
        if compile is None:
            compile = compile_wanted(self.fc.weight.device)
        if compile and self._compiled is None:
            self._compiled = compiled(self._body)
        tgt = getattr(self, "target", [None])[0]
        self.kernel_attention = bool(tgt is not None and tgt.kernel_attention and self.cfg.head_dim == tgt.cfg.head_dim)
        self.layers[0].self_attn.rope_kernel = self.kernel_attention and rope_kernel.available()
        self.rope_inv = default_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.fc.weight.device)  # made once

    def forward(self, toks, feats, pos, mask, offset, logits: bool = True):
        if self._compiled is not None and toks.shape[1] <= CausalLM.compile_max_tokens:  # strides fixed: no recompiles
            return self._compiled(dense(toks), dense(feats), dense(pos), self.cache.kv, self.cache.lens, dense(mask),
                                  offset, logits)
        return self._body(toks, feats, pos, self.cache.kv, self.cache.lens, mask, offset, logits)

    def head(self, state):
        return self.target[0].lm_head(state)

    def _body(self, toks, feats, pos, kv, lens, mask, offset: int, logits: bool = True):
        """toks, pos [B, T]; feats [B, T, H]; kv [B, S, 1, 2, Hkv, D]; lens [B] -> (logits [B, T, V] | None,
        hidden [B, T, H])."""
        tgt = self.target[0]
        h = self.fc(torch.cat((tgt.embed_tokens(toks), feats.to(self.fc.weight.dtype)), -1))
        if self.kernel_attention:  # the kernel reads lens and the tree mask itself
            slots = lens[:, None] + offset + torch.arange(toks.shape[1], device=lens.device)[None, :]  # [B, T]
            full_mask = tree_attention.span(lens, mask)
        else:
            slots, full_mask = slots_and_mask(lens, kv.shape[1], toks.shape[1], mask, offset)
        if self.fused and not self.kernel_attention:
            full_mask = gqa_mask(full_mask, self.cfg.num_heads // self.cfg.num_kv_heads, h.dtype)
        if self.layers[0].self_attn.rope_kernel:
            cos, sin = rope_kernel.Angles(positions=pos, inv_freq=self.rope_inv), None
        else:
            cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        h = self.layers[0](h, cos, sin, LayerCache(kv, 0), slots, full_mask)
        return (self.head(h) if logits else None), h

    def train_forward(self, emb, feats, pos):
        """Full-sequence causal forward for training (no cache): emb, feats [B, T, H] -> hidden [B, T, H]."""
        return self.train_unrolled(emb, feats, pos, 1)[0]

    def train_unrolled(self, emb, feats, pos, steps: int) -> list[torch.Tensor]:
        """The head run `steps` times over a whole sequence, each run on its own previous predictions, as drafting
        runs it (the training-time test of HASS and EAGLE-3): emb, feats [B, T, H] (the tokens x[p+1] and the
        target's features f[p]), pos [B, T] -> one hidden [B, T, H] per step; step s at position p predicts f[p+1]
        from a chain rooted at p-s+1.

        Step 1 is the plain causal forward. Step s > 1 reads step s-1's prediction made one position earlier as its
        feature input, and attends as a depth-s draft node does: to the true-feature keys of positions <= p-s+1 (the
        committed context) and to the keys of its chain's own steps 2..s (at positions p-s+2..p), never to the
        true-feature keys of those positions. Positions p < s-1 have no such chain: the caller masks them out."""
        B, T, _ = emb.shape
        c = self.cfg
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, emb.dtype)
        p = torch.arange(T, device=emb.device)
        outs: list[torch.Tensor] = []
        kv = emb.new_zeros(B, 0, 1, 2, c.num_kv_heads, c.head_dim)
        for s in range(1, steps + 1):
            x = feats if s == 1 else torch.cat((feats[:, :1], outs[-1][:, :-1]), 1)  # step s-1's output, shifted
            h = self.fc(torch.cat((emb, x), -1))
            kv = torch.cat((kv, kv.new_zeros(B, T, *kv.shape[2:])), 1)  # a new tensor: earlier steps' graph intact
            blocks = [p[None, :] <= (p[:, None] - s + 1)]  # [T, T] true-feature keys: the chain's context
            blocks += [p[None, :] == (p[:, None] - s + t) for t in range(2, s + 1)]  # step t's key of this chain
            mask = torch.cat(blocks, 1).expand(B, T, s * T)  # [B, T, s*T]
            slots = (s - 1) * T + p.expand(B, T)  # [B, T]
            outs.append(self.layers[0](h, cos, sin, LayerCache(kv, 0), slots, mask))
        return outs


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, in_features=2 * H)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = MLP(H, cfg.intermediate_size)

    def forward(self, emb, hidden, cos, sin, cache: LayerCache, slots, mask):
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(hidden)), -1)
        h = hidden + self.self_attn(x, cos, sin, cache, slots, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module, Drafter):
    entry_shift = 1
    carries_hidden = True

    def pick_features(self, hidden, aux):
        """Three target layers' inputs, concatenated: the feature EAGLE-3 reads."""
        return aux

    def __init__(self, cfg: ModelConfig, draft_vocab: int, target_vocab: int):
        super().__init__()
        self.cfg = cfg = cfg.llama_shaped()
        H = cfg.hidden_size
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(target_vocab, dtype=torch.bool))

    def attach(self, target: CausalLM) -> Eagle3Head:
        L = target.cfg.num_layers
        # the inputs of layers 2, L//2 and L-3, as EAGLE-3 reads them (clamped for very shallow targets)
        target.aux_layers = tuple(min(max(i, 0), L - 1) for i in (1, L // 2 - 1, L - 4))
        self.target = [target]
        return self

    def new_cache(self, B, S):
        c = self.cfg
        return KVCache(B, S, 1, c.num_kv_heads, c.head_dim, self.fc.weight.dtype, self.fc.weight.device)

    def lift(self, feats):
        return self.fc(feats.to(self.fc.weight.dtype))

    def forward(self, toks, hidden, pos, mask, offset, logits: bool = True):
        tgt = self.target[0]
        emb = tgt.embed_tokens(toks).to(hidden.dtype)
        slots, full_mask = self.cache.slots_and_mask(toks.shape[1], mask, offset)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, hidden.dtype)
        h = self.midlayer(emb, hidden, cos, sin, LayerCache(self.cache.kv, 0), slots, full_mask)
        return (self.head(h) if logits else None), h

    def head(self, state):
        """The reduced-vocabulary logits mapped onto the target's vocabulary (-inf where the head has no entry)."""
        draft_logits = self.lm_head(self.norm(state))  # [..., Vd]
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.target[0].cfg.vocab_size), float("-inf"))
        ids = torch.arange(draft_logits.shape[-1], device=state.device) + self.d2t
        full[..., ids] = draft_logits
        return full


# ---------------------------------------------------------------- loading

def _head_config(path: str, target: CausalLM) -> tuple[dict, ModelConfig]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: no config.json")
    raw = read_json(cfg_path)
    raw.setdefault("architectures", ["LlamaForCausalLM"])
    cfg = ModelConfig.from_hf(raw, where=cfg_path)
    if cfg.hidden_size != target.cfg.hidden_size:
        raise ModelLoadError(f"{cfg_path}: hidden_size {cfg.hidden_size} does not match the target's "
                             f"{target.cfg.hidden_size}")
    return raw, cfg


def _is_eagle3(sd: dict) -> bool:
    return any(k.startswith("midlayer.") for k in sd)


@register_drafter("eagle")
def load_eagle_head(path: str, target: CausalLM) -> Drafter:
    """An EAGLE-1/2 or EAGLE-3 head directory (the keys decide which)."""
    raw, cfg = _head_config(path, target)
    sd = load_state_dict(path)
    if _is_eagle3(sd):
        if "d2t" not in sd:
            raise ModelLoadError(f"{path}: EAGLE-3 head lacks d2t")
        head = Eagle3Head(cfg, draft_vocab=sd["d2t"].shape[0], target_vocab=target.cfg.vocab_size)
    else:
        head = EagleHead(cfg, fc_bias=bool(raw.get("bias", True)))
    load_strict(head, sd, path, optional=("embed_tokens.weight",))
    return head.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False).attach(target)


@register_drafter("draft-model")
def load_draft_model(path: str, target: CausalLM) -> Drafter:
    model = load_target(path, dtype=str(target.dtype).removeprefix("torch."), device=str(target.device))
    if model.cfg.vocab_size != target.cfg.vocab_size:
        raise ModelLoadError(f"{path}: vocab_size {model.cfg.vocab_size} differs from the target's "
                             f"{target.cfg.vocab_size}")
    return DraftModel(model)


def save_eagle_head(head: EagleHead, target_cfg: dict, path: str) -> None:
    """Write a head in EAGLE's published layout: config.json (Llama-shaped, `bias`) + model.safetensors."""
    import json

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {k: v for k, v in target_cfg.items() if k not in ("num_hidden_layers",)}
    cfg.update(architectures=["LlamaForCausalLM"], num_hidden_layers=1, bias=head.fc.bias is not None,
               attention_bias=head.cfg.attention_bias)  # Qwen2 targets: q/k/v biases, said explicitly
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
