"""Model configuration: a Hugging Face config.json read into the fields our own model implements.

Torch-free, so the controller's preflight (`adaspec_worker.preflight`) can check a checkpoint's
architecture, sizes and context before any actor starts. `model.py` builds the network from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .rope import RopeError, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or field at fault."""


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

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{where}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        try:
            scaling = RopeScaling.from_hf(cfg)
        except RopeError as e:
            raise ModelLoadError(f"{where}: {e}") from None
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bias = bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM"))
        max_pos = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        if window and arch in ("MistralForCausalLM", "Qwen2ForCausalLM") and window < max_pos:
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
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            eos_token_ids=eos,
            rope_scaling=scaling,
        )


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
