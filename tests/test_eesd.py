"""EESD (early-exit drafter + Thompson-sampled chain length) and eagle-thompson: greedy identity with
transformers' generate, sampled text (coupled rule for the EAGLE chain; a row's text independent of its batch
for the sampled early-exit chain; its law is checked in test_verify's Monte Carlo), the drafter's cache against
the target it is cut from, the controller by itself, and `train-draft --early-exit`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.drafters import DRAFTERS
from adaspec_worker.decode.early_exit import new_head, save_early_exit_head
from adaspec_worker.decode.model import ModelLoadError, load_target, read_json
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.thompson import LANES, ThompsonConfig, ThompsonLength, beta_from_uniforms
from jobs.cli import cli
from jobs.specs import SpecError, parse_spec
from tests import tiny
from tests.helpers import REPO, TINY, assert_text_equals_plain
from tests.test_engine import hf_greedy

METHODS = [
    ("eesd", {"draft_cost": 0.05}, "ee"),
    ("eesd", {"lengths": [2, 5]}, "ee"),
    ("eagle-thompson", {"draft_cost": 0.05}, "head"),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf, tgt = tiny.hf_and_target(request.param, d)
    tiny.random_eagle_head(d / "target", d / "head")
    tiny.early_exit_head(d / "target", d / "ee", exit_layer=1, noise=0.05)
    return hf, d, tgt


@pytest.mark.parametrize("method,params,draft", METHODS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_generate(setup, method, params, draft, batch):
    hf, d, tgt = setup
    g = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (batch,), generator=g)
    ]
    eng = build_engine(tgt, parse_spec(method, params), draft=str(d / draft))
    outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.tokens for o in outs] == hf_greedy(hf, prompts, 16)
    assert stats.rows.tau >= 1.0


def test_eagle_thompson_sampled_text_equals_plain(setup):
    _, d, _ = setup
    tgt = load_target(str(d / "target"), dtype="float32", device="cpu")
    assert_text_equals_plain(tgt, "eagle-thompson", {"draft_cost": 0.05}, draft=d / "head")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_eesd_row_alone_equals_row_in_batch(setup, temperature):
    """Drafts, lengths and the chain rule's draws are the row's own (seeded per row): companions change nothing."""
    _, d, tgt = setup
    sp = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=20)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 4, 5], [6, 7, 6], [7, 8, 9, 10, 7, 8]]
    eng = build_engine(tgt, parse_spec("eesd", {"draft_cost": 0.05}), draft=str(d / "ee"))
    a, st = eng.generate(prompts, sp, seeds=[11, 12, 13, 14])
    b, _ = eng.generate(prompts[2:3], sp, seeds=[13])
    assert a[2].tokens == b[0].tokens and st.rows.accepted > 0


def test_whole_target_as_early_exit_head_is_always_accepted(setup, tmp_path):
    """Exit after the last layer with no adapter and the final norm: the drafter is the target itself, so every
    draft is accepted (its own KV cache kept in step), the posterior climbs and the longest length wins."""
    hf, d, tgt = setup
    raw = read_json(str(d / "target" / "config.json"))
    head = new_head(tgt, raw, tgt.cfg.num_layers, adapter=False)
    save_early_exit_head(head.double(), raw, str(tmp_path / "whole"))
    eng = build_engine(tgt, parse_spec("eesd", {"draft_cost": 0.01}), draft=str(tmp_path / "whole"))
    outs, st = eng.generate([[3, 4, 5], [9]], SamplingParams(max_new_tokens=40))
    assert [o.tokens for o in outs] == hf_greedy(hf, [[3, 4, 5], [9]], 40)
    assert st.rows.accepted == st.rows.drafted and st.rows.tau > 4.5
    assert max(st.rows.draft_lengths) == 8


def test_thompson_posterior_follows_acceptance_and_is_seeded():
    B = 256
    ctrl = ThompsonLength(ThompsonConfig((1, 2, 4, 8), draft_cost=0.1))
    seeds, g = torch.arange(B), torch.Generator().manual_seed(0)
    for rate, want_len in ((0.9, 8), (0.25, 1)):
        a, b = torch.ones(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
        ks = []
        for t in range(60):
            k = ctrl.choose(a, b, seeds, torch.full((B,), t))
            ok = torch.rand(B, 8, generator=g) < rate  # per-token acceptance, cut at the row's length
            n = (ok.long().cumprod(-1)[:, :8] * (torch.arange(8) < k[:, None])).sum(-1)
            ctrl.update(a, b, n, k)
            ks.append(k)
        mean = ctrl.posterior_mean(a, b)
        assert abs(float(mean.mean()) - rate) < 0.05, (rate, float(mean.mean()))
        late = torch.stack(ks[-20:])
        assert (late == want_len).float().mean() > 0.8, (rate, late.float().mean())
    a, b = torch.full((B,), 3.0, dtype=torch.float64), torch.full((B,), 2.0, dtype=torch.float64)
    first = ctrl.choose(a, b, seeds, torch.full((B,), 5))
    assert torch.equal(first, ctrl.choose(a, b, seeds, torch.full((B,), 5)))  # same seed and position: same draw
    assert not torch.equal(first, ctrl.choose(a, b, seeds + 1000, torch.full((B,), 5)))
    nothing = torch.zeros(B, dtype=torch.long)
    ctrl.update(a, b, nothing, nothing)  # rows that drafted nothing learn nothing
    assert (a == 3).all() and (b == 2).all()


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.4, 2.5), (3.0, 7.0), (40.0, 5.0)])
def test_beta_draws_follow_the_beta_law(a, b):
    from scipy import stats

    n = 20_000
    u = torch.rand(n, LANES, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    x = beta_from_uniforms(torch.full((n,), a, dtype=torch.float64), torch.full((n,), b, dtype=torch.float64), u)
    assert stats.kstest(x.numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


def test_spec_checks():
    for bad in ({"lengths": []}, {"lengths": [0, 2]}, {"decay": 0.0}, {"prior_accept": -1.0}):
        with pytest.raises(SpecError):
            parse_spec("eesd", bad)
    assert parse_spec("eagle-thompson", {"lengths": [4, 2]}).lengths == (4, 2)


def test_loading_errors_name_the_problem(setup, tmp_path):
    _, d, tgt = setup
    with pytest.raises(ModelLoadError, match="no early_exit_layer"):
        DRAFTERS["early-exit"](str(d / "head"), tgt)
    cfg = json.loads((d / "ee" / "config.json").read_text())
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text(json.dumps(dict(cfg, early_exit_layer=9)))
    (tmp_path / "deep" / "model.safetensors").write_bytes((d / "ee" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="early_exit_layer 9 is not in"):
        DRAFTERS["early-exit"](str(tmp_path / "deep"), tgt)


def test_train_draft_early_exit_lowers_kl_and_writes_a_loadable_head(tmp_path):
    d = tmp_path
    corpus = d / "corpus"
    corpus.mkdir()
    for i, p in enumerate(sorted((REPO / "adaspec_worker").rglob("*.py"))):
        (corpus / f"{i}.py").write_text(p.read_text())
    args = [
        "train-draft",
        "--target",
        str(TINY),
        "--corpus",
        str(corpus / "*.py"),
        "--out",
        str(d / "ee"),
        "--early-exit",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "1e-3",
        "--quiet",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(cli, args + ["--steps", "30"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["val_after"]["kl"] < rep["val_before"]["kl"]
    saved = json.loads((d / "ee" / "config.json").read_text())
    assert saved["early_exit_layer"] == 2 and saved["early_exit_adapter"] is True
    tgt = load_target(str(TINY), dtype="float32", device="cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("import os\nimport sys\n\n\ndef main(",)]
    sp = SamplingParams(max_new_tokens=24)
    plain, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp)
    outs, st = build_engine(tgt, parse_spec("eesd", {}), draft=str(d / "ee")).generate(prompts, sp)
    assert outs[0].tokens == plain[0].tokens and st.rows.tau > 1.2
    r = CliRunner().invoke(cli, args + ["--steps", "35"])  # rerun: resumes from the checkpoint
    assert json.loads(r.output.strip().splitlines()[-1])["steps_run"] == 5
    bad = CliRunner().invoke(cli, [a if a != "2" else "7" for a in args] + ["--steps", "1"])
    assert bad.exit_code == 2 and "--early-exit must be in [1, 4]" in bad.output
