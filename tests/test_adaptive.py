"""Adaptive methods: lossless under greedy decoding, AdaEDL's lambda update by hand, and the two
training commands (train-draft, fit-ldlp) doing what they claim on tiny setups."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.ldlp import LDLP, save_ldlp
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.policy import Shape
from adaspec_worker.decode.proposers.adaptive import AdaEDL, adaedl_update
from adaspec_worker.decode.proposers.base import PROPOSERS, BatchInfo, Proposer, RoundInput
from adaspec_worker.decode.proposers.fixed import EagleChain
from adaspec_worker.decode.sampling import SamplingParams
from jobs.cli import cli
from jobs.specs import METHOD_SPECS, AdaEDLSpec, EagleSpec, parse_spec
from tests import tiny
from tests.helpers import REPO, TINY, TINY_HEAD, assert_text_equals_plain

ADAPTIVE = [("adaeagle", {}), ("adaeagle-ddd", {}), ("adaedl", {"k_max": 4}),
            ("ddd", {"top_k": 3, "max_depth": 5, "total_tokens": 12}),
            ("opt-tree", {"n": 3, "max_depth": 5, "delta": 0.05}),
            ("ldlp-tree", {"top_k": 3, "nodes_per_level": 4, "max_depth": 4}),
            ("oracle", {"k_max": 5})]


def test_every_method_has_a_proposer_and_a_spec():
    assert set(PROPOSERS) == set(METHOD_SPECS.values())


def test_every_spec_class_has_exactly_one_proposer():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    implementing = Counter(sub.__dict__["spec_class"] for sub in subclasses(Proposer) if "spec_class" in sub.__dict__)
    assert implementing == Counter(METHOD_SPECS.values())


class CountingDrafter:
    """A fake drafter for proposers tested alone: after token t it is sure the next one is (t + 1) mod V."""

    V = 10

    def logits(self, toks):
        return 50.0 * torch.nn.functional.one_hot((toks + 1) % self.V, self.V).double()

    def step(self, toks, hidden, level, offset, mask):
        return self.logits(toks), hidden


def round_input(drafter, root):
    B = root.shape[0]
    zeros = torch.zeros(B, dtype=torch.long)
    return RoundInput(root=root, root_logits=drafter.logits(root), root_hidden=torch.zeros(B, 4), drafter=drafter,
                      sampling=SamplingParams(), seeds=zeros, counter=zeros)


def test_proposers_alone_with_a_fake_drafter():
    drafter = CountingDrafter()
    r = round_input(drafter, torch.tensor([4, 8]))
    tree = EagleChain(EagleSpec(k=3)).propose(r, None)
    assert tree.tokens.tolist() == [[4, 5, 6, 7], [8, 9, 0, 1]] and tree.valid.all()
    # AdaEDL: a sure drafter has zero entropy, so 1 - sqrt(gamma * H) = 1 >= lambda and the whole chain is kept
    adaedl = AdaEDL(AdaEDLSpec(k_max=4, top_k=1, nodes_per_level=1))
    adaedl.begin(BatchInfo(B=2, device=torch.device("cpu"), sampling=SamplingParams(), prompts=[[1], [2]]))
    adaedl.shape = Shape(depth=4, nodes=4, width=1)
    tree = adaedl.propose(r, None)
    assert tree.tokens[:, 1:].tolist() == [[5, 6, 7, 8], [9, 0, 1, 2]] and tree.valid.all()
    adaedl.lam[1] = 1.5  # nothing passes the bound for row 1: it keeps only its first level (the floor)
    tree = adaedl.propose(r, None)
    assert tree.valid.tolist() == [[True] * 5, [True, True, False, False, False]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ada")
    hf = tiny.hf_model("llama", vocab=24)
    tiny.save(hf, d / "target")
    tiny.random_eagle_head(d / "target", d / "head")
    torch.manual_seed(0)
    m = LDLP(64, 32, 4)
    with torch.no_grad():
        m.out.bias.fill_(2.0)  # predicts lengths around 2, varying with the input
    save_ldlp(m, str(d / "ldlp"), {"note": "random"})
    return hf, d, load_target(str(d / "target"), dtype="float64", device="cpu")


@pytest.mark.parametrize("method,params", ADAPTIVE, ids=[m for m, _ in ADAPTIVE])
@pytest.mark.parametrize("batch", [1, 4])
def test_adaptive_greedy_equals_plain(setup, method, params, batch):
    hf, d, tgt = setup
    g = torch.Generator().manual_seed(batch + 10)
    lengths = torch.randint(1, 12, (batch,), generator=g)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in lengths]
    sp = SamplingParams(max_new_tokens=16)
    plain, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp)
    eng = build_engine(tgt, parse_spec(method, params), draft=str(d / "head"), ldlp=str(d / "ldlp"))
    outs, st = eng.generate(prompts, sp)
    assert [o.tokens for o in outs] == [p.tokens for p in plain]
    assert st.rows.tau >= 1.0


@pytest.mark.parametrize("method,params", [m for m in ADAPTIVE if m[0] != "oracle"],
                         ids=[m for m, _ in ADAPTIVE if m != "oracle"])
def test_adaptive_sampled_text_equals_plain_alone_and_in_any_batch(setup, method, params):
    """Batch-dependent trees (AdaEDL's lambda, LDLP depths, batch-max depths) leave a row's sampled text alone: it
    is `none`'s for its seed (float32). The oracle is greedy-only."""
    _, d, _ = setup
    tgt = load_target(str(d / "target"), dtype="float32", device="cpu")
    accepted = assert_text_equals_plain(tgt, method, params, draft=d / "head", ldlp=d / "ldlp")
    if method in ("ddd", "opt-tree", "ldlp-tree"):  # branching trees accept drafts even from a random head
        assert accepted > 0, "drafts must be accepted"


def test_adaptive_on_the_shipped_model_beats_a_random_guess():
    tgt = load_target(str(TINY), dtype="float32", device="cpu")
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    rows = pq.read_table(REPO / "manifests" / "prompts.parquet").column("prompt").to_pylist()[:4]
    prompts = [tok(r, add_special_tokens=False)["input_ids"][-200:] for r in rows]
    sp = SamplingParams(max_new_tokens=24)
    plain, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp)
    taus = {}
    for method in ("adaeagle", "oracle", "ldlp-tree"):
        eng = build_engine(tgt, parse_spec(method, {}), draft=str(TINY_HEAD),
                           ldlp=str(REPO / "models" / "pycoder-tiny-ldlp"))
        outs, st = eng.generate(prompts, sp)
        assert [o.tokens for o in outs] == [p.tokens for p in plain]
        taus[method] = st.rows.tau
    assert taus["oracle"] >= taus["adaeagle"] > 1.3


def test_adaedl_lambda_update_by_hand():
    lam, ema = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    # round 1: acceptance 0.5 -> ema 0.7 < 0.9 -> lambda' = 0.71 -> lambda = 0.9*0.7 + 0.1*0.71 = 0.701
    lam, ema = adaedl_update(lam, ema, torch.tensor([0.5], dtype=torch.float64), 0.5, 0.9, 0.01)
    assert ema.item() == pytest.approx(0.7) and lam.item() == pytest.approx(0.701)
    # round 2: acceptance 1.0 -> ema 0.85 < 0.9 -> lambda' = 0.711 -> lambda = 0.6309 + 0.0711 = 0.702
    lam, ema = adaedl_update(lam, ema, torch.tensor([1.0], dtype=torch.float64), 0.5, 0.9, 0.01)
    assert ema.item() == pytest.approx(0.85) and lam.item() == pytest.approx(0.702)
    # round 3: acceptance 1.0 -> ema 0.925 >= 0.9 -> lambda' = 0.692 -> lambda = 0.6318 + 0.0692 = 0.701
    lam, ema = adaedl_update(lam, ema, torch.tensor([1.0], dtype=torch.float64), 0.5, 0.9, 0.01)
    assert ema.item() == pytest.approx(0.925) and lam.item() == pytest.approx(0.701)


def test_train_draft_lowers_loss_raises_tau_and_writes_eagle_format(tmp_path):
    from safetensors.torch import load_file

    d = tmp_path
    (d / "target").symlink_to(TINY)  # a real (trained) tiny target: a head can learn it in a few steps
    corpus = d / "corpus"
    corpus.mkdir()
    for i, p in enumerate(sorted((REPO / "adaspec_worker").rglob("*.py"))):
        (corpus / f"{i}.py").write_text(p.read_text())
    r = CliRunner().invoke(cli, ["train-draft", "--target", str(d / "target"), "--corpus", str(corpus / "*.py"),
                                 "--out", str(d / "head"), "--steps", "150", "--batch-size", "8", "--seq-len", "64",
                                 "--lr", "3e-3", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["val_after"]["loss"] < rep["val_before"]["loss"]
    keys = set(load_file(str(d / "head" / "model.safetensors")))
    assert "fc.weight" in keys and "fc.bias" in keys
    assert not any(k.startswith(("lm_head", "layers.0.input_layernorm")) for k in keys)
    assert all(k.startswith(("fc.", "layers.0.")) for k in keys)
    cfg = json.loads((d / "head" / "config.json").read_text())
    assert cfg["bias"] is True and cfg["num_hidden_layers"] == 1
    tiny.random_eagle_head(d / "target", d / "random")
    tgt = load_target(str(d / "target"), dtype="float32", device="cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    texts = ("import os\nimport sys\n\n\ndef main(", "class Foo:\n    def __init__(self")
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    taus = {}
    for name in ("random", "head"):
        _, st = build_engine(tgt, parse_spec("eagle", {"k": 4}), draft=str(d / name)).generate(prompts,
                                                                                    SamplingParams(max_new_tokens=32))
        taus[name] = st.rows.tau
    assert taus["head"] > taus["random"]
    # resume: rerunning continues from the checkpoint rather than starting over
    r = CliRunner().invoke(cli, ["train-draft", "--target", str(d / "target"), "--corpus", str(corpus / "*.py"),
                                 "--out", str(d / "head"), "--steps", "160", "--batch-size", "8", "--seq-len", "64",
                                 "--unroll", "2", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["steps_run"] == 10  # its last steps trained on the head's own predictions (the training-time test)
    assert {"top1_step2", "chain4"} <= set(rep["val_after"])


def test_fit_ldlp_beats_a_constant_predictor(tmp_path):
    import sysconfig

    from adaspec_worker.train.fit_ldlp import LDLPFitConfig, fit_ldlp
    cfg = LDLPFitConfig(prompts=80, new_tokens=40, widths=(64,), lambdas=(2.0,), k_maxes=(6,), steps=300, device="cpu",
                        dtype="float32")
    corpus = sysconfig.get_paths()["stdlib"] + "/*.py"
    lines = []
    meta = fit_ldlp(str(TINY), str(TINY_HEAD), corpus, str(tmp_path / "ldlp"), cfg, log=lines.append)
    assert meta["val_mae"] < meta["constant_mae"]
    saved = json.loads((tmp_path / "ldlp" / "config.json").read_text())
    for k in ("width", "lambda", "k_max", "offset", "val_mae", "val_exact_share", "cost_model"):
        assert k in saved
    # chosen by simulated tokens/s under the measured cost model: the best of the grid, at least the constant k's
    assert len(saved["grid"]) == 2 and meta["val_simulated_speed"] == max(g["simulated_tokens_per_s"]
                                                                          for g in saved["grid"])
    assert saved["cost_model"]["device"] == "cpu" and any(m.startswith("[1/1]") for m in lines)
    assert any(m.startswith("collect: 80/80") for m in lines)
    from transformers import AutoTokenizer

    from adaspec_worker.train.fit_ldlp import _prefixes
    told = []
    assert len(_prefixes(AutoTokenizer.from_pretrained(TINY), ["x = 1\n" * 40, "y"], cfg, told.append)) == 1
    assert "only 1 of 80 prefixes" in told[0] and "1 of them under 32 tokens" in told[0]
