"""Tiny random models built in the test from a config (float64 where exactness matters)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def hf_model(kind: str, vocab: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0, ctx: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                torch.nn.init.normal_(p, std=0.3)
    else:
        m = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # sharper distributions than the default init, so drafts get accepted sometimes
        m.lm_head.weight.mul_(8.0)
    return m.double().eval()


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def random_eagle_head(target_dir: Path, out: Path, seed: int = 0, bias: bool = True) -> Path:
    from adaspec_worker.decode.drafters import EagleHead, save_eagle_head
    from adaspec_worker.decode.model import ModelConfig, read_json

    torch.manual_seed(seed)
    raw = read_json(str(target_dir / "config.json"))
    head = EagleHead(ModelConfig.from_hf(raw), fc_bias=bias)
    save_eagle_head(head, raw, str(out))
    return out


def random_eagle3_head(target_dir: Path, out: Path, draft_vocab: int, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from adaspec_worker.decode.drafters import Eagle3Head
    from adaspec_worker.decode.model import ModelConfig, read_json

    torch.manual_seed(seed)
    raw = read_json(str(target_dir / "config.json"))
    head = Eagle3Head(ModelConfig.from_hf(raw), draft_vocab, raw["vocab_size"])
    keep = torch.randperm(raw["vocab_size"])[:draft_vocab].sort().values
    head.d2t.copy_(keep - torch.arange(draft_vocab))
    head.t2d[keep] = True
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(raw, num_hidden_layers=1, draft_vocab_size=draft_vocab)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "model.safetensors"))
    return out


def hf_and_target(kind: str, d: Path, vocab: int = 24):
    """A tiny random HF model of `kind` saved under d/target, and the same weights loaded by our loader (float64)."""
    from adaspec_worker.decode.model import load_target

    hf = hf_model(kind, vocab=vocab)
    save(hf, d / "target")
    return hf, load_target(str(d / "target"), dtype="float64", device="cpu")


def early_exit_head(target_dir: Path, out: Path, exit_layer: int = 1, seed: int = 0, noise: float = 0.0) -> Path:
    """An untrained early-exit head on the target's first `exit_layer` layers (adapter = the target's next layer,
    norm = its final norm, as training starts), plus Gaussian noise of std `noise` on the adapter's weights."""
    from adaspec_worker.decode.early_exit import new_head, save_early_exit_head
    from adaspec_worker.decode.model import load_target, read_json

    torch.manual_seed(seed)
    raw = read_json(str(target_dir / "config.json"))
    head = new_head(load_target(str(target_dir), dtype="float64", device="cpu"), raw, exit_layer)
    with torch.no_grad():
        for p in head.adapter.parameters():
            p.add_(noise * torch.randn_like(p))
    save_early_exit_head(head.double(), raw, str(out))
    return out
