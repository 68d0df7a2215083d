"""Model configuration: a Hugging Face config.json read into the fields our own model implements.

Torch-free, so the controller's preflight (`adaspec_worker.preflight`) can check a checkpoint's
architecture, sizes and context before any actor starts. `model.py` builds the network from it.
`RopeScaling` is the parsed rope_scaling block (default, linear, dynamic, llama3, yarn, longrope); the math
that turns it into frequencies is in `rope.py`. The per-architecture differences our model implements are
fields here (Qwen3's q/k norm, Phi-3's partial rotary, Gemma-2's norms, scales and soft caps, bias
placement); `layers.py` reads them.
A checkpoint outside that set raises `UnsupportedModel`: plain decoding (`method: none`) then falls back to
transformers (`hf_engine.py`), every other method refuses it. `fallback_context` reads such a config's context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
)
SLIDING_WINDOW_ARCHITECTURES = (
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}  # HF name -> ours


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or field at fault."""


class UnsupportedModel(ModelLoadError):
    """An architecture or RoPE type our own model does not implement (transformers may: `hf_engine.py`)."""


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


class RopeError(ValueError):
    """A rope_scaling block we cannot use; the message names the key."""


class UnsupportedRope(RopeError):
    """A rope type outside ROPE_TYPES (as opposed to a malformed block of a known type)."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, yarn, longrope
    attention_factor: float | None = None  # yarn (None: from factor and mscale), longrope (None: from factor)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors at positions < original_max_...
    long_factor: tuple[float, ...] = ()  # longrope: ... and at positions from there on

    @classmethod
    def from_hf(cls, cfg: dict) -> RopeScaling:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it, as transformers' Phi3Config reads it
        if kind not in ROPE_TYPES:
            raise UnsupportedRope(f"unsupported rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
        if kind == "default":
            return cls()
        max_pos = cfg.get("max_position_embeddings", 2048)

        def num(key, default=None, required=False):
            v = rope.get(key, default)
            if v is None and required:
                raise RopeError(f"rope_scaling.{key}: required for rope_type {kind!r}")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise RopeError(f"rope_scaling.{key}: must be a number, got {v!r}")
            return v

        orig = int(num("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos)))
        factor = num("factor", None, required=kind not in ("yarn", "longrope"))
        if kind in ("yarn", "longrope") and factor is None:
            factor = max_pos / orig
        if factor <= 0:
            raise RopeError(f"rope_scaling.factor: must be > 0, got {factor}")
        if kind == "llama3":
            num("low_freq_factor", required=True), num("high_freq_factor", required=True)
        return cls(
            rope_type=kind,
            factor=float(factor),
            low_freq_factor=float(num("low_freq_factor", 1.0)),
            high_freq_factor=float(num("high_freq_factor", 4.0)),
            original_max_position_embeddings=orig,
            attention_factor=num("attention_factor"),
            beta_fast=float(num("beta_fast") or 32.0),
            beta_slow=float(num("beta_slow") or 1.0),
            mscale=num("mscale"),
            mscale_all_dim=num("mscale_all_dim"),
            truncate=bool(rope.get("truncate", True)),
            **(_longrope(cfg, rope) if kind == "longrope" else {}),
        )


def _longrope(cfg: dict, rope: dict) -> dict:
    """Phi-3's short and long factors: one number per rotated frequency (half the rotary dims)."""
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    half = int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) // 2
    out = {}
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if not ok or len(v) != half or not all(math.isfinite(x) and x > 0 for x in v):
            raise RopeError(f"rope_scaling.{key}: must be {half} positive numbers (one per rotated frequency), "
                            f"got {v!r}")
        out[key] = tuple(float(x) for x in v)
    if "original_max_position_embeddings" not in rope and "original_max_position_embeddings" not in cfg:
        raise RopeError("rope_scaling.original_max_position_embeddings: required for rope_type 'longrope'")
    return out


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # rope.py: linear, dynamic, llama3, yarn
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    o_proj_bias: bool = False  # Qwen3: o_proj has a bias when attention_bias does
    partial_rotary_factor: float = 1.0  # Phi-3: RoPE turns the first head_dim * factor dims only
    fused_checkpoint: bool = False  # Phi-3: checkpoint stores qkv_proj and gate_up_proj (split on load)
    # Gemma-2: (1 + w) RMSNorms, norms before and after attention and MLP, GELU(tanh) MLP, embeddings times
    # sqrt(hidden), attention scaled by query_pre_attn_scalar^-0.5, tanh soft caps on attention and final logits
    gemma_norms: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None: head_dim^-0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def llama_shaped(self) -> ModelConfig:
        """The same sizes as a plain Llama layer: what EAGLE heads are, whatever their target."""
        return replace(self, architecture="LlamaForCausalLM", **{k: getattr(LLAMA, k) for k in ARCHITECTURE_FIELDS})

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"{where}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        try:
            scaling = RopeScaling.from_hf(cfg)
        except UnsupportedRope as e:
            raise UnsupportedModel(f"{where}: {e}") from None
        except RopeError as e:
            raise ModelLoadError(f"{where}: {e}") from None
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bias = bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM"))
        gemma = arch == "Gemma2ForCausalLM"
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS or (act != "silu" and not gemma):
            raise UnsupportedModel(f"{where}: unsupported activation {act!r} for {arch}")
        max_pos = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        if window and arch in SLIDING_WINDOW_ARCHITECTURES and window < max_pos:
            max_pos = window  # full attention equals sliding attention within the window: cap the usable context
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            attention_bias=bias,
            eos_token_ids=eos,
            rope_scaling=scaling,
            qk_norm=arch == "Qwen3ForCausalLM",
            o_proj_bias=bias and arch in ("Qwen3ForCausalLM", "Gemma2ForCausalLM"),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
            fused_checkpoint=arch == "Phi3ForCausalLM",
            gemma_norms=gemma,
            hidden_act=ACTIVATIONS[act],
            embed_scale=cfg["hidden_size"] ** 0.5 if gemma else 1.0,
            attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5 if gemma else None,
            attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        )


# the fields that differ between architectures (what `llama_shaped` resets), and their Llama values
ARCHITECTURE_FIELDS = (
    "qk_norm",
    "o_proj_bias",
    "fused_checkpoint",
    "gemma_norms",
    "hidden_act",
    "embed_scale",
    "attn_scale",
    "attn_softcap",
    "final_softcap",
)
LLAMA = ModelConfig("LlamaForCausalLM", 1, 1, 1, 1, 1, 1, 1, 1e-6, 1e4, 1, False, False)


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def fallback_context(cfg: dict) -> int | None:
    """The context of a config our model does not implement, from the first key transformers configs use for it
    (None when the config names none: a model without a position limit)."""
    for key in CONTEXT_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
