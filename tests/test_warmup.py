"""Engine warm-up (`decode/warmup.py`): every round shape run, and timed for the policy, before a job's first row,
without teaching the policy anything about acceptance, without changing any row's text, and over the workspace
the job's first batch will use (so what was captured is what the job replays)."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.cost import CostModel
from adaspec_worker.decode.policy import NO_DRAFT
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.warmup import warm
from tests.test_policy import _cost, _engine, models  # noqa: F401  (the module-scoped fixture)

MEASURED = CostModel.from_json({**_cost(0.0).to_json(), "device": "cpu"})


def _prompts(n: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 24, (int(k),), generator=g).tolist() for k in torch.randint(1, 6, (n,), generator=g)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_warm_up_times_every_shape_and_learns_nothing_of_acceptance(models, temperature):  # noqa: F811
    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    eng.proposer.cost = MEASURED
    sp = SamplingParams(max_new_tokens=12, temperature=temperature)
    policy = eng.proposer.policy
    assert warm(eng, slots=2, sampling=sp, prompt_len=5, rounds=3) > 0
    eng.generate(_prompts(2), sp, seeds=[1, 2])  # its begin() hands the last forced call's times over
    rule = ("greedy",) if temperature == 0 else (temperature, 0, 1.0)
    timed = {shape for (B, r, shape) in policy.timings.seen if (B, r) == (2, rule)}
    assert timed == set(policy.shapes), "every menu shape, plain decoding included, has a measured round time"
    assert NO_DRAFT in timed
    assert all(p.rounds == 0 for p in policy.posteriors.values()), "forced calls are no evidence of acceptance"
    assert eng.proposer.forced is None and policy.last["batch"] == 2  # the job's call chose by the policy
    assert warm(eng, slots=2, sampling=sp, prompt_len=5, rounds=3) == 0.0  # once per setting


def test_warm_up_changes_no_rows_text(models):  # noqa: F811
    d, tgt = models
    prompts, seeds = _prompts(3, seed=9), [4, 8, 15]
    for kw in ({}, {"temperature": 0.8}):
        sp = SamplingParams(max_new_tokens=10, **kw)
        cold = _engine(d, tgt, "ddd")
        want = [c.tokens for c in cold.generate(prompts, sp, seeds)[0]]
        hot = _engine(d, tgt, "ddd")
        hot.proposer.cost = MEASURED
        warm(hot, slots=3, sampling=sp, prompt_len=max(map(len, prompts)), rounds=2)
        assert [c.tokens for c in hot.generate(prompts, sp, seeds)[0]] == want, kw


def test_warm_up_sizes_the_workspace_the_job_will_use(models):  # noqa: F811
    """The job's first batch reuses the warmed workspace (and with it the graphs captured over it): warm-up sizes
    it for the job's max_new_tokens, not for the few rounds it runs."""
    d, tgt = models
    eng = _engine(d, tgt, "opt-tree")
    sp = SamplingParams(max_new_tokens=240)
    prompts = _prompts(2)
    warm(eng, slots=2, sampling=sp, prompt_len=max(map(len, prompts)), rounds=2)
    work = eng.workspace
    assert work.S > 256, "the job's rows need more than the first 256-slot bucket"
    eng.generate(prompts, sp, seeds=[0, 1])
    assert eng.workspace is work


def test_warm_up_of_a_fixed_method_runs_its_one_shape(models):  # noqa: F811
    d, tgt = models
    eng = _engine(d, tgt, "eagle2")
    calls = []
    real = eng.generate
    eng.generate = lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    warm(eng, slots=4, sampling=SamplingParams(max_new_tokens=64), prompt_len=3, rounds=2)
    assert len(calls) == 1 and calls[0].max_new_tokens == 2 * eng.proposer.max_nodes
    assert calls[0].eos_token_ids == ()  # no dummy row ends before its rounds
