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
    assert len(calls) == 1 and calls[0].max_new_tokens == 2 * (eng.proposer.spec.depth + 1)  # depth + 1 a round
    assert calls[0].eos_token_ids == ()  # no dummy row ends before its rounds


@pytest.mark.parametrize("method,params", [("retrieval", {"k": 4, "datastore_tokens": 256}),
                                           ("token-recycling", {"nodes": 12})])
def test_warm_up_leaves_nothing_in_what_a_proposer_learns_across_calls(models, method, params):  # noqa: F811
    """A retrieval datastore and token-recycling's table hold the job's rows only: the dummy rows are put back out."""
    from adaspec_worker.decode.build import build_engine
    from jobs.specs import parse_spec

    d, tgt = models
    eng = build_engine(tgt, parse_spec(method, params))
    sp = SamplingParams(max_new_tokens=10)
    eng.generate(_prompts(2), sp, seeds=[1, 2])  # the job's first rows: something learnt
    prop = eng.proposer
    before = prop.learned()
    warm(eng, slots=4, sampling=sp, prompt_len=5, rounds=3)
    after = prop.learned()
    assert torch.equal(before[0], after[0]) if method == "retrieval" else torch.equal(before, after)
    cold = build_engine(tgt, parse_spec(method, params))  # and the next call drafts as if warm-up never ran
    cold.generate(_prompts(2), sp, seeds=[1, 2])
    want = cold.generate(_prompts(3, seed=8), sp, seeds=[3, 4, 5])[1].rows.tau
    assert eng.generate(_prompts(3, seed=8), sp, seeds=[3, 4, 5])[1].rows.tau == want


def test_a_forced_call_is_timed_at_its_batch_size_only(models):  # noqa: F811
    """Dummy rows drain through smaller sizes in a few rounds each: only the warmed size's rounds are kept."""
    d, tgt = models
    eng = _engine(d, tgt, "ddd")
    eng.proposer.cost = MEASURED
    warm(eng, slots=8, sampling=SamplingParams(max_new_tokens=40, temperature=0.8), prompt_len=4, rounds=3)
    eng.generate(_prompts(1), SamplingParams(max_new_tokens=4, temperature=0.8), seeds=[0])
    assert {B for (B, _, _) in eng.proposer.policy.timings.seen} == {8}


def test_rounds_that_compile_or_capture_are_not_timed(models, monkeypatch):  # noqa: F811
    """A round whose time includes compile or capture (the engine's warmup_seconds grew) never reaches the policy."""
    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    eng.proposer.cost = MEASURED
    real, times = eng._launch, []
    landed = eng.proposer.landed

    def timed(report):
        if report.seconds is not None:
            times.append(report.seconds)
        landed(report)

    monkeypatch.setattr(eng.proposer, "landed", timed)

    def launch(*a, **k):  # every other launch "captures" (inside it, as `_run` does)
        flight = real(*a, **k)
        eng.warmup_seconds += 0.5 * (len(launches) % 2 == 0)
        launches.append(1)
        return flight

    launches: list = []
    monkeypatch.setattr(eng, "_launch", launch)
    for overlap in (False, True):  # the next round launched before this one lands (CUDA) or after
        eng.overlap, launches[:], times[:] = overlap, [], []
        _, stats = eng.generate(_prompts(2), SamplingParams(max_new_tokens=12), seeds=[1, 2])
        assert 0 < len(times) < stats.target_passes, overlap
        assert len(times) <= (len(launches) + 1) // 2, overlap  # at most the launches that did not capture


def test_warm_up_prefills_every_prompt_width_drafting_or_not(models, monkeypatch):  # noqa: F811
    """With CUDA graphs (`_run` stands in here), warm-up runs a batch's prefill twice (compile, then capture) at every
    prompt width up to the job's longest prompt, 64 tokens apart, for the drafting shapes and for plain decoding, and
    leaves the policy knowing nothing of acceptance; widths past `PREFILL_WIDTHS` are left to the job."""
    from adaspec_worker.decode.engine import Engine

    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    eng.proposer.cost = MEASURED
    keys = []
    monkeypatch.setattr(Engine, "graphs_on", property(lambda self: True))
    monkeypatch.setattr(eng, "_run", lambda key, fn: (keys.append(key), fn())[1])
    warm(eng, slots=2, sampling=SamplingParams(max_new_tokens=8), prompt_len=100, rounds=2)
    prefills = [k for k in keys if k[0] == "prefill"]
    assert set(prefills) == {("prefill", 2, W, drafting) for drafting in (False, True) for W in (64, 128)}
    assert all(prefills.count(k) >= 2 for k in set(prefills))
    assert all(p.rounds == 0 for p in eng.proposer.policy.posteriors.values())
    from adaspec_worker.decode import warmup

    keys.clear()
    eng.warmed = {}
    monkeypatch.setattr(warmup, "PREFILL_WIDTHS", 128)  # (512 in a job; this model's context is 256)
    warm(eng, slots=2, sampling=SamplingParams(max_new_tokens=8), prompt_len=200, rounds=1)
    assert max(k[2] for k in keys if k[0] == "prefill") == 128
