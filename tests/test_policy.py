"""Issue #12: the cost model, the cost-aware shape policy, per-row text independence for every method, no host
sync inside any method's round, and the oracle as a true ceiling."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.cost import CostModel, measure_cost, measure_for_actor
from adaspec_worker.decode.ldlp import LDLP, save_ldlp
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.policy import NO_DRAFT, ShapePolicy, menu, round_seconds
from adaspec_worker.decode.sampling import SamplingParams
from jobs.layout import ShardStats
from jobs.specs import METHOD_SPECS, parse_spec
from tests import tiny
from tests.helpers import REPO, TINY, TINY_HEAD

SMALL = {
    "eagle": {"k": 3},
    "eagle2": {"top_k": 3, "depth": 4, "total_tokens": 10},
    "draft-model": {"k": 3},
    "adaeagle": {"k_max": 4},
    "adaeagle-ddd": {"k_max": 4},
    "adaedl": {"k_max": 4},
    "ddd": {"top_k": 3, "max_depth": 5, "total_tokens": 12, "check_depths": [2, 3]},
    "opt-tree": {"n": 3, "max_depth": 4, "delta": 0.05},
    "ldlp-tree": {"top_k": 3, "nodes_per_level": 3, "max_depth": 4},
    "oracle": {"k_max": 4, "top_k": 3},
    "token-recycling": {"nodes": 12},
    "retrieval": {"k": 4},
    "rasd": {"top_k": 3, "depth": 3, "total_tokens": 8, "k": 3, "branches": 2, "datastore_tokens": 256},
    "eesd": {"lengths": [1, 2, 3]},
    "eagle-thompson": {"lengths": [1, 2, 3]},
}


def _cost(slope_target: float, slope_draft: float = 0.0) -> CostModel:
    """A synthetic cost model: target pass 1 + slope x B x tokens, draft level 0.05 + slope_draft x B x width."""
    b, t, w = [1, 64], [1, 64], [1, 16]
    return CostModel(
        "synthetic",
        "none",
        b,
        t,
        w,
        [[1 + slope_target * B * T for T in t] for B in b],
        [[0.05 + slope_draft * B * W for W in w] for B in b],
    )


def test_cost_model_interpolates_and_round_trips():
    c = _cost(0.01)
    assert c.target(1, 1) == pytest.approx(1.01) and c.target(64, 64) == pytest.approx(1 + 0.01 * 64 * 64)
    assert c.target(64, 32.5) == pytest.approx(1 + 0.01 * 64 * 32.5)  # linear between grid points
    assert c.target(32.5, 1) == pytest.approx(1 + 0.01 * 32.5)
    assert c.draft(1, 0) == 0.0 and c.draft(1, 16) == pytest.approx(0.05)
    assert CostModel.from_json(c.to_json()) == c
    stats = ShardStats(rows=1, cost_model=c.to_json())
    assert ShardStats.from_json(stats.to_json()).cost_model == c.to_json()
    assert (stats + stats).cost_model == c.to_json()  # kept when equal
    assert (stats + ShardStats(cost_model=_cost(0.5).to_json())).cost_model is None


def test_cost_model_measured_on_cpu():
    tgt = load_target(str(TINY), dtype="float32", device="cpu")
    head = build_engine(tgt, parse_spec("eagle", {}), draft=str(TINY_HEAD)).drafter
    c = measure_cost(tgt, head, name="tiny", batches=(1, 4), tokens=(1, 8), widths=(1, 4), context=32, repeats=2)
    assert len(c.target_s) == 2 and all(v > 0 for line in c.target_s + c.draft_s for v in line)
    assert c.target(4, 8) > 0 and CostModel.from_json(c.to_json()).draft(2, 2) == pytest.approx(c.draft(2, 2))
    actor = measure_for_actor(tgt, head, "tiny", batch_size=3)  # a worker's start-up grid: 1 and 3's bucket
    assert (actor.batches, actor.tokens, actor.widths, actor.device) == ([1, 4], [1, 4, 16], [1, 4], "cpu")


def test_policy_drafts_deep_when_verification_is_flat_and_backs_off_when_it_is_steep():
    shapes = menu(8, 2, 2)
    greedy = SamplingParams()
    flat = ShapePolicy(shapes, 0.8, _cost(0.0))
    assert flat.choose(1, greedy).depth >= 6  # memory bound: verifying more costs nothing
    steep = ShapePolicy(shapes, 0.8, _cost(0.05, 0.01))
    assert steep.choose(64, greedy) == NO_DRAFT  # compute bound at batch 64: plain decoding
    assert steep.choose(1, greedy).drafts  # the same policy still drafts alone
    # evidence moves the choice: a shape observed to emit 1 token per round loses to plain decoding
    weak = ShapePolicy(shapes, 0.8, _cost(0.0))
    for s in shapes[1:]:
        weak.update(("greedy",), s, rounds=1000, tokens=1000, squares=1000)
    assert weak.choose(1, greedy) == NO_DRAFT


def test_policy_learns_what_its_rounds_cost_and_scales_the_cost_model_for_shapes_not_yet_run():
    """The cost model times a round's graphs, not the tree building, verification and host work around them: a
    shape measured slower than predicted loses to plain decoding, and a shape not yet run is priced at the
    prediction times the measured / predicted ratio (here 3x, which makes drafting a loss)."""
    shapes = menu(4, 2, 2)
    greedy, rule = SamplingParams(), ("greedy",)
    measured = CostModel.from_json({**_cost(0.0).to_json(), "device": "cpu"})
    policy = ShapePolicy(shapes, 0.8, measured)
    first = policy.choose(1, greedy)
    assert first.drafts  # predicted: every draft level is cheap
    predicted = policy.seconds(1, rule, first)
    policy.timed(1, rule, first, 3 * predicted)
    assert policy.seconds(1, rule, first) == pytest.approx(3 * predicted)  # its own measurement
    other = next(s for s in shapes if s.drafts and s != first)
    assert policy.seconds(1, rule, other) == pytest.approx(3 * round_seconds(measured, 1, other))
    policy.timed(1, rule, NO_DRAFT, round_seconds(measured, 1, NO_DRAFT))  # plain decoding as predicted
    for s in shapes[1:]:  # and every drafting shape emitting 1.5 tokens a round at 3x its predicted cost
        policy.update(rule, s, rounds=1000, tokens=1500, squares=2500)
        policy.timed(1, rule, s, 3 * round_seconds(measured, 1, s))
    assert policy.choose(1, greedy) == NO_DRAFT
    assert policy.last["measured_shapes"] == len(shapes)
    # the nominal stand-in's units are not seconds: nothing measured is kept against it
    nominal = ShapePolicy(shapes, 0.8)
    nominal.timed(1, rule, first, 100.0)
    assert not nominal.timings.seen and nominal.choose(1, greedy).drafts


def test_an_adaptive_engine_times_its_rounds_for_its_policy(models):
    """generate() hands each landed round's seconds to the proposer; the next call's policy has them for each
    shape the last call's rounds ran (the call's first, then the per-round choices) at its batch bucket."""
    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    eng.proposer.cost = CostModel.from_json({**_cost(0.0).to_json(), "device": "cpu"})
    ran = []
    landed = eng.proposer.landed
    eng.proposer.landed = lambda report: ran.append((report.B, report.shape[0], report.seconds)) or landed(report)
    sp = SamplingParams(max_new_tokens=6)
    eng.generate([[1, 2, 3], [4, 5]], sp, [0, 1])
    first = list(ran)
    assert first and all(s.drafts for _, s, _ in first)
    eng.generate([[1, 2, 3]], sp, [0])
    seen = eng.proposer.policy.timings.seen
    assert set(seen) == {(B, ("greedy",), s) for B, s, _ in first}
    assert all(v[0] > 0 for v in seen.values())


def test_without_the_per_round_choice_a_call_keeps_its_first_shape(models):
    """ADARUN_DEPTH_POLICY=0 (`Budgeted.per_round` False): every round of a call runs the shape its call chose."""
    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    eng.proposer.cost = CostModel.from_json({**_cost(0.0).to_json(), "device": "cpu"})
    ran = []
    landed = eng.proposer.landed
    eng.proposer.landed = lambda report: ran.append(report.shape[0]) or landed(report)
    sp = SamplingParams(max_new_tokens=12)
    eng.generate([[1, 2, 3], [4, 5]], sp, [0, 1])
    assert len(set(ran)) > 1  # on: the rounds changed shape (the check below is not vacuous)
    eng.proposer.per_round, ran[:] = False, []
    eng.generate([[1, 2, 3], [4, 5]], sp, [0, 1])
    assert len(ran) > 2 and len(set(ran)) == 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    tiny.save(tiny.hf_model("llama", vocab=24), d / "target")
    tiny.save(tiny.hf_model("llama", vocab=24, seed=3, layers=1), d / "draft")
    tiny.random_eagle_head(d / "target", d / "head")
    tiny.early_exit_head(d / "target", d / "early-exit", exit_layer=1, noise=0.05)
    torch.manual_seed(0)
    m = LDLP(64, 32, 4)
    with torch.no_grad():
        m.out.bias.fill_(2.0)
    save_ldlp(m, str(d / "ldlp"), {"note": "random"})
    return d, load_target(str(d / "target"), dtype="float32", device="cpu")


def _engine(d, tgt, method):
    spec = parse_spec(method, SMALL.get(method, {}))
    draft = {"draft-model": d / "draft", "early-exit": d / "early-exit", None: None}.get(spec.drafter_kind, d / "head")
    return build_engine(tgt, spec, draft=str(draft) if draft else None, ldlp=str(d / "ldlp"))


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_a_rows_text_depends_only_on_its_seed(models, method):
    """Every registered method: a row decoded alone and inside batches of different companions gives the same
    tokens, greedy and at T = 0.8."""
    d, tgt = models
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (5,), generator=g)]
    seeds = [3, 17, 17, 40, 99]
    for kw in ({}, {"temperature": 0.8}):
        sp = SamplingParams(max_new_tokens=10, **kw)
        eng = _engine(d, tgt, method)
        alone = [eng.generate([p], sp, seeds=[s])[0][0].tokens for p, s in zip(prompts, seeds)]
        for rows in ([3, 0, 1], [2, 4, 1, 0, 3]):
            outs, _ = eng.generate([prompts[i] for i in rows], sp, seeds=[seeds[i] for i in rows])
            assert [o.tokens for o in outs] == [alone[i] for i in rows], (method, kw, rows)


@pytest.mark.parametrize("method", ["ldlp-tree", "ddd", "opt-tree", "adaeagle", "adaeagle-ddd", "adaedl"])
def test_sampled_text_does_not_depend_on_the_shape_the_policy_picks(models, method):
    """The policy's choice depends on measured round times (wall time), so it may differ from run to run: every
    shape of the menu, plain decoding included, must give each row the same sampled tokens for its seed."""
    d, tgt = models
    eng = _engine(d, tgt, method)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (4,), generator=g)]
    sp = SamplingParams(max_new_tokens=10, temperature=0.8)
    texts = {}
    for shape in eng.proposer.policy.shapes:
        eng.proposer.policy.choose = lambda B, sampling, shape=shape: shape
        outs, _ = eng.generate(prompts, sp, seeds=[3, 17, 5, 40])
        texts[shape] = [o.tokens for o in outs]
    first = texts[NO_DRAFT]
    assert all(t == first for t in texts.values()), method


@pytest.mark.parametrize("refill", [False, True])
def test_a_call_that_backs_off_leaves_the_drafter_out_of_its_batch(models, monkeypatch, refill):
    """A batch whose policy chose plain decoding never prefilled the drafter (its cache still sized for an earlier
    call of 1 row): shrinking the batch (refill off) and refilling freed slots (refill on) leave the drafter alone,
    and the text is plain decoding's."""
    d, tgt = models
    eng = _engine(d, tgt, "ldlp-tree")
    monkeypatch.setattr(eng.proposer.policy, "choose", lambda B, sampling: NO_DRAFT)
    eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))  # the drafter's cache: 1 row (not drafting either)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (7,), generator=g)]
    lengths = [2, 9, 3, 12, 1, 6, 4]
    stop = lambda j, toks: lengths[j] if len(toks) >= lengths[j] else None  # noqa: E731
    sp = SamplingParams(max_new_tokens=12)
    outs, _ = eng.generate(prompts, sp, list(range(7)), stop, slots=4, refill=refill)
    plain, _ = _engine(d, tgt, "none").generate(prompts, sp, list(range(7)), stop, slots=4, refill=refill)
    assert [o.tokens for o in outs] == [o.tokens for o in plain]
    assert [len(o.tokens) for o in outs] == lengths


class HostSyncs(TorchDispatchMode):
    """Counts operations that bring a device value to the host or make a data-dependent shape."""

    SYNCING = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_no_method_syncs_inside_a_round(models, method, monkeypatch):
    """propose and observe of every method stay on the device (no scalar read, no .tolist(), no data-dependent
    shape), so every method's rounds can be CUDA graphs."""
    d, tgt = models
    eng = _engine(d, tgt, method)
    assert eng.proposer.graphable
    mode, inside, calls = HostSyncs(), [], []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (inside and mode.seen.append("tolist"), real_tolist(t))[1])

    def watched(fn):
        def run(*a, **kw):
            calls.append(fn.__name__)
            inside.append(fn.__name__)
            try:
                with mode:
                    return fn(*a, **kw)
            finally:
                inside.pop()

        return run

    monkeypatch.setattr(eng.proposer, "propose", watched(eng.proposer.propose))
    monkeypatch.setattr(eng.proposer, "observe", watched(eng.proposer.observe))
    for kw in ({}, {"temperature": 0.8}):
        eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=8, **kw), seeds=[1, 2])
    assert "propose" in calls and "observe" in calls and not mode.seen, (method, mode.seen)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_oracle_tau_is_a_ceiling(temperature):
    """On the shipped tiny model (fp32 CPU): the oracle's tau >= every EAGLE-head method's tau on the same prompts.
    (Drafter-free methods and draft-model draft from other sources: the oracle bounds what the head can do.)"""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tgt = load_target(str(TINY), dtype="float32", device="cpu")
    tok = AutoTokenizer.from_pretrained(TINY)
    rows = pq.read_table(REPO / "manifests" / "prompts.parquet").column("prompt").to_pylist()[:3]
    prompts = [tok(r, add_special_tokens=False)["input_ids"][-120:] for r in rows]
    sp = SamplingParams(max_new_tokens=20, temperature=temperature)
    taus = {}
    for name, params in [
        ("oracle", {"k_max": 10, "top_k": 6}),
        ("eagle", {"k": 6}),
        ("eagle2", {}),
        ("eagle-tree", {}),
        ("adaeagle", {}),
        ("adaeagle-ddd", {}),
        ("adaedl", {}),
        ("ddd", {}),
        ("opt-tree", {}),
        ("ldlp-tree", {}),
    ]:
        eng = build_engine(
            tgt, parse_spec(name, params), draft=str(TINY_HEAD), ldlp=str(REPO / "models" / "pycoder-tiny-ldlp")
        )
        _, st = eng.generate(prompts, sp, seeds=[1, 2, 3])
        taus[name] = st.rows.tau
    assert taus["oracle"] >= max(taus.values()) and taus["oracle"] > 1.5, taus
