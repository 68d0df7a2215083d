"""RoPE scaling (decode/rope.py): greedy decoding is token-identical to transformers' generate on tiny random
Llama checkpoints (float64) with each rope_scaling type, and bad rope blocks are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.config import ModelConfig, ModelLoadError
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.preflight import check_models
from jobs.manifest import manifest_from_dict
from jobs.specs import parse_spec
from tests.helpers import job_dict

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
    with pytest.raises(ModelLoadError, match="unsupported rope_type 'dynamic-ntk'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "dynamic-ntk", "factor": 2.0}})
    longrope = {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 2.0],
                "original_max_position_embeddings": 16}
    assert ModelConfig.from_hf({**base, "rope_scaling": longrope}).rope_scaling.long_factor == (1.0, 2.0)
    su = {**{k: v for k, v in longrope.items() if k != "rope_type"}, "type": "su"}  # early Phi-3 checkpoints' name
    assert ModelConfig.from_hf({**base, "rope_scaling": su}).rope_scaling.rope_type == "longrope"
    with pytest.raises(ModelLoadError, match="rope_scaling.long_factor: must be 2 positive numbers"):
        ModelConfig.from_hf({**base, "rope_scaling": {**longrope, "long_factor": [1.0]}})
    with pytest.raises(ModelLoadError, match="rope_scaling.original_max_position_embeddings: required"):
        ModelConfig.from_hf({**base, "rope_scaling": {k: v for k, v in longrope.items() if k[0] != "o"}})
    assert ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling.factor == 2.0


def _phi3(rope: dict, original: int = 16):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=original,
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     initializer_range=0.3, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                                             **rope})
    return Phi3ForCausalLM(cfg).double().eval()


def _hf_step_by_step(hf, prompt: list[int], n: int) -> list[int]:
    """Greedy through transformers' forward over its KV cache, one token a step (its rotary module switches to the
    long factors once a step's position passes the original context; `generate` would also re-encode then)."""
    from transformers import DynamicCache

    cache, ids, out = DynamicCache(config=hf.config), torch.tensor([prompt]), []
    with torch.no_grad():
        logits = hf(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[len(prompt) + len(out) - 1]])
            logits = hf(torch.tensor([[out[-1]]]), position_ids=step, past_key_values=cache, use_cache=True).logits
    return out


def test_phi3_longrope_equals_transformers(tmp_path):
    """Phi-3 `longrope` (short factors inside the original 16 positions, long ones past them, attention factor
    sqrt(1 + ln 4 / ln 16), partial rotary): greedy text is token-identical to transformers' own forward decoding
    across the switch, and to its `generate` for texts within the original context; short factors, long factors
    and the attention factor each change the text."""
    import dataclasses

    longrope = {"rope_type": "longrope", "short_factor": [1.0, 1.7, 3.0], "long_factor": [2.0, 6.0, 30.0]}
    hf = _phi3(longrope)
    hf.save_pretrained(tmp_path / "t")
    tgt = load_target(str(tmp_path / "t"), dtype="float64", device="cpu")
    s = tgt.cfg.rope_scaling
    assert (s.rope_type, s.original_max_position_embeddings, s.factor) == ("longrope", 16, 4.0)
    (tmp_path / "t" / "tokenizer.json").write_text("{}")  # preflight reads listings and JSON only
    d = job_dict("x.parquet", "out", speculative={"method": "none"})
    d["model"] = {"target": str(tmp_path / "t")}
    assert check_models(manifest_from_dict(d)) is not None  # our own model decodes it, not the fallback
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32, (n,), generator=g).tolist() for n in (3, 12, 16)]
    ref = [_hf_step_by_step(hf, p, 30) for p in prompts]
    eng = build_engine(tgt, parse_spec("none", {}))
    assert [o.tokens for o in eng.generate(prompts, SamplingParams(max_new_tokens=30))[0]] == ref
    short = [p[:5] for p in prompts]  # within the original context: generate's re-encoding never happens
    within = [hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, len(p):].tolist()
              for p in short]
    assert [o.tokens for o in eng.generate(short, SamplingParams(max_new_tokens=10))[0]] == within
    assert len({t for r in ref for t in r}) > 3  # the text varies: the comparisons below bite
    for change in ({"short_factor": (1.0, 1.0, 1.0)}, {"long_factor": s.short_factor}, {"attention_factor": 1.0}):
        tgt.cfg = dataclasses.replace(tgt.cfg, rope_scaling=dataclasses.replace(s, **change))
        outs, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, SamplingParams(max_new_tokens=30))
        assert [o.tokens for o in outs] != ref, change


def test_longrope_picks_factors_per_position(tmp_path):
    """Short generation (every position inside the original 16) uses only the short factors; the choice is per
    position, so a 20-token pass rotates positions 0..15 with the short factors and 16..19 with the long ones
    (transformers would rotate the whole pass with the long ones: documented in rope.py)."""
    import dataclasses

    from adaspec_worker.decode import rope

    longrope = {"rope_type": "longrope", "short_factor": [1.0, 1.7, 3.0], "long_factor": [2.0, 6.0, 30.0]}
    hf = _phi3(longrope)
    hf.save_pretrained(tmp_path / "t")
    tgt = load_target(str(tmp_path / "t"), dtype="float64", device="cpu")
    s = tgt.cfg.rope_scaling
    prompts = [[3, 9, 27], [5, 1, 4, 1, 5, 9]]
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, len(p):].tolist()
           for p in prompts]  # last position 15: never past the original context
    eng = build_engine(tgt, parse_spec("none", {}))
    assert [o.tokens for o in eng.generate(prompts, SamplingParams(max_new_tokens=10))[0]] == ref
    tgt.cfg = dataclasses.replace(tgt.cfg, rope_scaling=dataclasses.replace(s, long_factor=(9.0, 9.0, 9.0)))
    eng = build_engine(tgt, parse_spec("none", {}))
    assert [o.tokens for o in eng.generate(prompts, SamplingParams(max_new_tokens=10))[0]] == ref  # long unused
    cfg = dataclasses.replace(tgt.cfg, rope_scaling=s)
    cos, _ = rope.cos_sin(torch.arange(20)[None], cfg, torch.float64)  # [1, 20, R]
    short = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(s, long_factor=s.short_factor))
    long = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(s, short_factor=s.long_factor))
    cos_short, _ = rope.cos_sin(torch.arange(20)[None], short, torch.float64)
    cos_long, _ = rope.cos_sin(torch.arange(20)[None], long, torch.float64)
    assert torch.equal(cos[:, :16], cos_short[:, :16]) and torch.equal(cos[:, 16:], cos_long[:, 16:])
    assert not torch.equal(cos[:, 16:], cos_short[:, 16:]) and not torch.equal(cos[:, 1:16], cos_long[:, 1:16])
