"""Log-probabilities of emitted tokens (decoding.logprobs / top_logprobs, issue #14): for plain decoding, a
speculative method and the transformers fallback, greedy and sampled, with continuous batching on and off and
the round launched ahead, each emitted token's value equals log_softmax of a plain forward over prompt +
completion (float32 CPU, the raw distribution: before temperature, top-k and top-p), the top-k lists are that
distribution's k largest in order, a stop cut trims them with the tokens, and off means no values at all."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.hf_engine import HFEngine, load_hf_target
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import parse_spec
from tests.helpers import TINY, TINY_HEAD

K = 3
LENGTHS = [5, 11, 2, 8, 14]  # each row's stopping point: rows finish at different rounds, so slots refill


@pytest.fixture(scope="module")
def tgt():
    return load_target(str(TINY), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in (4, 9, 1, 6, 3)]


def _stop_at(prompt: int, tokens: list[int]):
    return LENGTHS[prompt] if len(tokens) >= LENGTHS[prompt] else None


def _reference(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), V] log_softmax of a plain forward over prompt + completion, at each completion token."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) + len(completion) - 1].log_softmax(-1)


def _check(hf, prompts, outs, k: int) -> None:
    for p, c in zip(prompts, outs):
        assert len(c.logprobs) == len(c.tokens) == len(c.top_logprobs) and c.tokens
        ref = _reference(hf, p, c.tokens)
        want = ref.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-4, rtol=0)
        for j, top in enumerate(c.top_logprobs):
            assert len(top) == k
            values = [v for _, v in top]
            assert values == sorted(values, reverse=True)
            best = ref[j].topk(k)
            torch.testing.assert_close(torch.tensor(values), best.values, atol=2e-4, rtol=0)
            assert [i for i, _ in top] == best.indices.tolist() or k == 0


@pytest.mark.parametrize("method,params", [("none", {}), ("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8})])
def test_logprobs_equal_a_plain_forward(tgt, hf, method, params):
    eng = build_engine(tgt, parse_spec(method, params), draft=str(TINY_HEAD) if method != "none" else None)
    prompts, seeds = _prompts(), [11, 12, 13, 14, 15]
    accepted = 0
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9}):
        plain = eng.generate(prompts, SamplingParams(max_new_tokens=16, **kw), seeds, _stop_at)[0]
        sp = SamplingParams(max_new_tokens=16, logprobs=K, **kw)
        ref = None
        for slots, refill, overlap in ((None, True, False), (2, True, True), (2, False, False), (3, True, False)):
            eng.overlap = overlap  # the next round launched before this one is recorded (the CUDA default)
            outs, stats = eng.generate(prompts, sp, seeds, _stop_at, slots=slots, refill=refill)
            assert [c.tokens for c in outs] == [c.tokens for c in plain]  # asking for logprobs changes no token
            assert [len(c.tokens) for c in outs] == LENGTHS  # the stop cut trims the logprobs with the tokens
            _check(hf, prompts, outs, K)
            ref = ref or outs  # the same values whatever the batching (to float rounding: batch shapes differ)
            for a, b in zip(outs, ref):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
            accepted += stats.rows.accepted
        eng.overlap = False
    assert method == "none" or accepted > 0  # the speculative rows really took accepted tokens from the tree
    assert all(c.logprobs is None and c.top_logprobs is None for c in plain)  # off: nothing computed


def test_only_the_emitted_tokens_logprob_when_k_is_zero(tgt, hf):
    eng = build_engine(tgt, parse_spec("eagle", {"k": 3}), draft=str(TINY_HEAD))
    prompts = _prompts()
    outs, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=0))
    _check(hf, prompts, outs, 0)
    # k larger than a later call's: the outcome buffer grows, and a narrower request still reads back right
    wide, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=7))
    again, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=2))
    assert [c.logprobs for c in wide] == [c.logprobs for c in again] == [c.logprobs for c in outs]
    assert [[t[:2] for t in c.top_logprobs] for c in wide] == [c.top_logprobs for c in again]
    assert all(len(t) == 7 for c in wide for t in c.top_logprobs)


def test_transformers_fallback_reports_the_same_logprobs(tgt, hf):
    eng = HFEngine(load_hf_target(str(TINY), dtype="float32", device="cpu"), parse_spec("none", {}))
    prompts, seeds = _prompts(), [1, 2, 3, 4, 5]
    for kw in ({}, {"temperature": 0.8}):
        sp = SamplingParams(max_new_tokens=16, logprobs=K, **kw)
        outs, _ = eng.generate(prompts, sp, seeds, _stop_at, slots=2)
        _check(hf, prompts, outs, K)
        own, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp, seeds, _stop_at)
        assert [c.tokens for c in outs] == [c.tokens for c in own]
        for a, b in zip(outs, own):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-4, rtol=0)
    off, _ = eng.generate(prompts, SamplingParams(max_new_tokens=4), seeds)
    assert all(c.logprobs is None and c.top_logprobs is None for c in off)
