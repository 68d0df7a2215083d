"""RoPE scaling (decode/rope.py): greedy decoding is token-identical to transformers' generate on tiny random
Llama checkpoints (float64) with each rope_scaling type, and bad rope blocks are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.config import ModelConfig, ModelLoadError
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import parse_spec

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def _llama(rope: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, rope_parameters=params)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m.double().eval()


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_rope_greedy_equals_transformers(kind, tmp_path):
    hf = _llama(SCALINGS[kind])
    hf.save_pretrained(tmp_path / "t")
    tgt = load_target(str(tmp_path / "t"), dtype="float64", device="cpu")
    assert tgt.cfg.rope_scaling.rope_type == kind
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32, (n,), generator=g).tolist() for n in (5, 40)]
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(p):].tolist()
           for p in prompts]
    outs, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, SamplingParams(max_new_tokens=20))
    assert [o.tokens for o in outs] == ref
    if kind != "dynamic":  # dynamic NTK only differs past max_position_embeddings: the others must change text
        plain = _llama(None)
        base = [plain.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(p):]
                .tolist() for p in prompts]
        assert base != ref


def test_bad_rope_blocks_name_the_key():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ModelLoadError, match="rope_scaling.low_freq_factor"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ModelLoadError, match="unsupported rope_type 'longrope'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    assert ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling.factor == 2.0
