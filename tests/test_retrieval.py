"""Retrieval (prompt lookup): lossless (greedy identity, the Monte-Carlo sampling law and its failure on a
broken verifier), a row's text independent of its batch companions, and the lookup itself by hand."""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode import verify
from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.proposers.base import BatchInfo, RoundInput
from adaspec_worker.decode.proposers.retrieval import Retrieval
from adaspec_worker.decode.sampling import SamplingParams, target_probs
from adaspec_worker.decode.verify import Verdict
from jobs.specs import RetrievalSpec, SpecError, parse_spec
from tests import tiny
from tests.test_engine import hf_greedy
from tests.test_verify import BROKEN_MATCHES, SP, V, mc, tv  # noqa: F401  (mc: fixture)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    return tiny.hf_and_target(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("params", [{}, {"k": 3, "branches": 3, "max_ngram": 2}], ids=["pld", "branches"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_generate(setup, params, batch):
    hf, tgt = setup
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 12, (batch,), generator=g)
    prompts = [(torch.randint(0, 24, (int(n),), generator=g).tolist()) * 2 for n in lengths]  # some repetition
    ref = hf_greedy(hf, prompts, 20)
    eng = build_engine(tgt, parse_spec("retrieval", params))
    outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=20))
    assert [o.tokens for o in outs] == ref
    assert stats.rows.tau >= 1.0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_row_alone_equals_row_in_batch(setup, temperature):
    _, tgt = setup
    sp = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=20)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 4, 5], [6, 7, 6], [7, 8, 9, 10, 7, 8]]
    eng = build_engine(tgt, parse_spec("retrieval", {"k": 4, "branches": 2}))
    a, _ = eng.generate(prompts, sp, seeds=[11, 12, 13, 14])
    b, _ = eng.generate(prompts[2:3], sp, seeds=[13])
    c, _ = build_engine(tgt, parse_spec("retrieval", {"k": 4, "branches": 2})).generate(prompts[2:3], sp, seeds=[13])
    assert a[2].tokens == b[0].tokens == c[0].tokens


def test_lookup_by_hand():
    spec = RetrievalSpec(k=3, max_ngram=2, branches=2)
    prop = Retrieval(spec, context=32)
    # row 0: ... 5 6 | 7 8 9 ... 5 6 | 1 ... 6 ; the last 2 tokens (9 6)? no: the text ends in "5 6", matched twice
    prompts = [[5, 6, 7, 8, 9, 4, 5, 6, 1, 2, 5, 6], [3, 3, 3], [1, 2]]
    prop.begin(BatchInfo(B=3, device=torch.device("cpu"), sampling=SamplingParams(), prompts=prompts))
    zeros = torch.zeros(3, dtype=torch.long)
    r = RoundInput(root=torch.tensor([6, 3, 2]), root_logits=None, root_hidden=None, drafter=None,
                   sampling=SamplingParams(), seeds=zeros, counter=zeros)
    tree = prop.propose(r, None)
    # row 0: "5 6" ends at 7 (most recent) -> 1 2 5, and at 1 -> 7 8 9
    assert tree.tokens[0].tolist() == [6, 1, 2, 5, 7, 8, 9] and tree.valid[0].all()
    # row 1: "3 3" ends at 1 -> continuation 3 (position 2 is the root itself), then past the history;
    # the 1-gram "3" at 0 is the second branch -> 3 3
    assert tree.tokens[1].tolist()[:2] == [3, 3] and tree.valid[1].tolist() == [True, True, False, False,
                                                                                True, True, False]
    assert not tree.valid[2, 1:].any(), "no earlier occurrence: nothing drafted"
    assert tree.parents[0].tolist() == [0, 0, 1, 2, 0, 4, 5] and tree.depth[0].tolist() == [0, 1, 2, 3, 1, 2, 3]
    # the round committed row 0's first branch node (1) and the bonus 9; row 1 finished (counter frozen)
    verdict = Verdict(n_accepted=torch.tensor([1, 0, 0]), path=torch.tensor([[0, 1, 0, 0], [0] * 4, [0] * 4]),
                      bonus=torch.tensor([9, 4, 7]))
    counter = torch.tensor([2, 0, 1])
    prop.observe(verdict, tree, RoundInput(root=verdict.bonus, root_logits=None, root_hidden=None, drafter=None,
                                           sampling=SamplingParams(), seeds=zeros, counter=counter))
    assert prop.hist_len.tolist() == [14, 3, 3]
    assert prop.hist[0, :15].tolist() == prompts[0] + [1, 9, -1]
    assert prop.hist[1, :4].tolist() == [3, 3, 3, -1] and prop.hist[2, :4].tolist() == [1, 2, 7, -1]
    with pytest.raises(SpecError, match="min_ngram"):
        parse_spec("retrieval", {"min_ngram": 3, "max_ngram": 2})


# ------------------------------------------------------------------ Monte-Carlo through the engine

N = 30_000
REPEAT = [1, 4, 2, 1, 4]  # the root (4) occurred before: a draft every round


@pytest.fixture(scope="module")
def exact_repeat(mc):  # noqa: F811
    _, tgt, _ = mc
    with torch.no_grad():
        T = len(REPEAT)
        ids = torch.tensor([REPEAT + [a] for a in range(V)])
        logits, _, _ = tgt(ids, torch.arange(T + 1).expand(V, -1), tgt.new_cache(V, 16))
        p1 = target_probs(logits[0, T - 1], SP)
        p2 = target_probs(logits[:, T], SP)
    return tgt, p1[:, None] * p2


def empirical(tgt):
    eng = build_engine(tgt, parse_spec("retrieval", {"k": 3, "branches": 2}))
    outs, stats = eng.generate([REPEAT] * N, SP, seeds=list(range(N)))
    counts = torch.zeros(V, V, dtype=torch.float64)
    for o in outs:
        counts[o.tokens[0], o.tokens[1]] += 1
    return counts / N, stats


def test_monte_carlo_matches_target(exact_repeat):
    tgt, exact = exact_repeat
    emp, stats = empirical(tgt)
    assert stats.rows.accepted > N // 10, "drafts must be accepted often enough for the test to bite"
    assert tv(emp, exact) < 0.03


def test_monte_carlo_fails_on_broken_verifier(exact_repeat, monkeypatch):
    monkeypatch.setattr(verify, "matches", BROKEN_MATCHES["one-past"])
    tgt, exact = exact_repeat
    emp, _ = empirical(tgt)
    assert tv(emp, exact) > 0.03
