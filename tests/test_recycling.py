"""Token Recycling: lossless (greedy identity, the Monte-Carlo sampling law, and its failure on a broken
verifier), the matrix learns, its update is deterministic, and what the shared matrix means for sampled text."""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode import verify
from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.proposers.base import BatchInfo, RoundInput
from adaspec_worker.decode.proposers.recycling import TokenRecycling, default_template, update
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.trees import DraftTree, StaticShape
from jobs.specs import SpecError, TokenRecyclingSpec, parse_spec
from tests import tiny
from tests.helpers import TINY
from tests.test_engine import hf_greedy
from tests.test_verify import BROKEN_MATCHES, PROMPT, SP, N, V, mc, tv  # noqa: F401  (mc: fixture)

SMALL = {"k": 4, "nodes": 16, "max_depth": 5}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    return tiny.hf_and_target(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("params", [{}, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_generate_cold_and_warm(setup, params, batch):
    hf, tgt = setup
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 12, (batch,), generator=g)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in lengths]
    ref = hf_greedy(hf, prompts, 16)
    eng = build_engine(tgt, parse_spec("token-recycling", params))
    for _ in range(2):  # cold table, then the table the first call left
        outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=16))
        assert [o.tokens for o in outs] == ref
    assert stats.rows.tau > 1.0 and stats.rows.drafted > 0


@pytest.fixture(scope="module")
def pycoder_tiny():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    prompts = [tok(text * 2, add_special_tokens=False)["input_ids"], tok("import os\nimport sys\n",
                                                                          add_special_tokens=False)["input_ids"]]
    return load_target(str(TINY), dtype="float32", device="cpu"), prompts


def test_pycoder_tiny_greedy_identity_and_the_matrix_learns(pycoder_tiny):
    tgt, prompts = pycoder_tiny
    sp = SamplingParams(max_new_tokens=32)
    ref, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp)
    eng = build_engine(tgt, parse_spec("token-recycling", {}))
    taus = []
    for batch in (prompts[:1], prompts, prompts[:1]):
        outs, st = eng.generate(batch, sp)
        assert [o.tokens for o in outs] == [r.tokens for r in ref[: len(batch)]]
        taus.append(st.rows.tau)
    assert taus[2] > 2.0 and taus[2] > taus[0], f"a warm matrix on a repeated prompt drafts well: tau {taus}"
    eng.proposer.reset()
    _, cold = eng.generate(prompts[:1], sp)
    assert cold.rows.tau < taus[2]


def test_matrix_is_kept_with_the_job(pycoder_tiny, tmp_path):
    """`matrix: PATH`: what one engine learnt and persisted (the worker does after each shard), a new engine (a
    resumed job) loads, so it starts warm; a matrix of another shape is ignored (a cold start)."""
    from safetensors.torch import load_file, save_file

    tgt, prompts = pycoder_tiny
    sp = SamplingParams(max_new_tokens=32)
    path = tmp_path / "job" / "matrix.safetensors"
    first = build_engine(tgt, parse_spec("token-recycling", {"matrix": str(path)}))
    for _ in range(2):
        first.generate(prompts[:1], sp)
    first.proposer.persist()
    _, learnt = first.generate(prompts[:1], sp)  # from the matrix it persisted
    assert load_file(str(path))["table"].shape == (tgt.cfg.vocab_size + 1, 8)
    ref, cold = build_engine(tgt, parse_spec("token-recycling", {})).generate(prompts[:1], sp)
    outs, warm = build_engine(tgt, parse_spec("token-recycling", {"matrix": str(path)})).generate(prompts[:1], sp)
    assert outs[0].tokens == ref[0].tokens and warm.rows.tau == learnt.rows.tau > cold.rows.tau
    save_file({"table": torch.zeros(3, 8, dtype=torch.int32)}, str(path))
    _, other = build_engine(tgt, parse_spec("token-recycling", {"matrix": str(path)})).generate(prompts[:1], sp)
    assert other.rows.tau == cold.rows.tau
    with pytest.raises(SpecError, match="local path"):
        parse_spec("token-recycling", {"matrix": "s3://b/m"})


def test_greedy_row_alone_equals_row_in_batch(setup):
    _, tgt = setup
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    sp = SamplingParams(max_new_tokens=12)
    a, _ = build_engine(tgt, parse_spec("token-recycling", SMALL)).generate(prompts, sp)
    b, _ = build_engine(tgt, parse_spec("token-recycling", SMALL)).generate(prompts[2:3], sp)
    assert a[2].tokens == b[0].tokens


def test_sampled_text_does_not_depend_on_the_shared_matrix(setup):
    """Token Recycling's tree comes from a matrix other rows (and earlier calls) write. The coupled tree rule
    (verify.py) makes a row's sampled text plain sampling's for its seed whatever tree it was offered, so the
    same row and seed give the same text after any history of the matrix, and the same text as `none`."""
    _, tgt = setup
    sp = SamplingParams(max_new_tokens=16, temperature=0.8)
    row, others = [[6, 1]], [[3, 4, 5], [9, 9, 2], [7, 1, 8, 2]]
    plain = build_engine(tgt, parse_spec("none", {}))
    for seed in range(8):
        cold = build_engine(tgt, parse_spec("token-recycling", SMALL))
        a, _ = cold.generate(row, sp, seeds=[seed])
        warm = build_engine(tgt, parse_spec("token-recycling", SMALL))
        warm.generate(others, sp, seeds=[100, 101, 102])
        b, _ = warm.generate(row, sp, seeds=[seed])
        c, _ = plain.generate(row, sp, seeds=[seed])
        assert a[0].tokens == b[0].tokens == c[0].tokens, seed


def test_propose_walks_the_matrix_breadth_first():
    spec = TokenRecyclingSpec(k=2, tree=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    prop = TokenRecycling(spec, vocab_size=10)
    prop.begin(BatchInfo(B=2, device=torch.device("cpu"), sampling=SamplingParams(), prompts=[[1], [1]]))
    prop.table[1] = torch.tensor([2, 3], dtype=torch.int32)
    prop.table[2] = torch.tensor([4, -1], dtype=torch.int32)  # rank 1 after 2 unset
    prop.table[3] = torch.tensor([5, 6], dtype=torch.int32)
    root = torch.tensor([1, 7])  # row 1: nothing known after 7
    zeros = torch.zeros(2, dtype=torch.long)
    r = RoundInput(root=root, root_logits=None, root_hidden=None, drafter=None, sampling=SamplingParams(),
                   seeds=zeros, counter=zeros)
    tree = prop.propose(r, None)
    # nodes: root | 2, 3 | (2,0)=4, (2,1)=unset, (3,0)=5 | (4,0)=unset
    assert tree.tokens[0].tolist() == [1, 2, 3, 4, 0, 5, 0]
    assert tree.valid[0].tolist() == [True, True, True, True, False, True, False]
    assert tree.parents[0].tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert tree.depth[0].tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.valid[1].tolist() == [True] + [False] * 6


def test_update_is_deterministic_accepted_path_first_then_later_row():
    V, k = 10, 2
    table = torch.full((V + 1, k), -1, dtype=torch.int32)
    # two rows, 3 nodes each (root, two children); token 5 appears at row 0 node 2 (accepted) and at row 1
    # nodes 1 and 2 (not accepted); token 8 at row 0 node 1 and row 1 node 0 (the root: always on the path)
    tree = DraftTree(tokens=torch.tensor([[3, 8, 5], [8, 5, 5]]), parents=torch.tensor([[0, 0, 0]] * 2),
                     depth=torch.tensor([[0, 1, 1]] * 2), valid=torch.tensor([[True, True, True], [True, True, False]]),
                     levels=1, width=2)
    path = torch.tensor([[0, 2], [0, 0]])
    n_acc = torch.tensor([1, 0])
    logits = torch.zeros(2, 3, V)
    for b in range(2):
        for n in range(3):
            logits[b, n, b * 3 + n] = 2.0  # node (b, n) predicts token 3b+n first, then token 9
            logits[b, n, 9] = 1.0
    update(table, tree, path, n_acc, logits)
    assert table[3].tolist() == [0, 9]  # row 0 root
    assert table[5].tolist() == [2, 9]  # row 0 node 2 (accepted) beats row 1 node 1; row 1 node 2 is invalid
    assert table[8].tolist() == [3, 9]  # row 1 root (on its path) beats row 0 node 1 (off its path)
    assert (table[[0, 1, 2, 4, 6, 7, 9]] == -1).all()


def test_default_template_is_closed_and_sized():
    paths = default_template(8, 64, 8)
    assert len(paths) == 64 and all(p[:-1] in set(paths) | {()} for p in paths)
    assert max(len(p) for p in paths) <= 8 and all(r < 8 for p in paths for r in p)
    StaticShape.from_paths(paths)
    with pytest.raises(SpecError, match="ranks in"):
        parse_spec("token-recycling", {"k": 2, "tree": [[0], [2]]})
    with pytest.raises(SpecError, match="lacks its parent"):
        parse_spec("token-recycling", {"tree": [[0], [1, 0]]})


# ------------------------------------------------------------------ Monte-Carlo through the engine

def empirical_recycling(tgt):
    eng = build_engine(tgt, parse_spec("token-recycling", {"k": 4, "nodes": 12, "max_depth": 4}))
    eng.generate([PROMPT] * 64, SamplingParams(max_new_tokens=6, temperature=1.0), seeds=list(range(10**6, 10**6 + 64)))
    outs, stats = eng.generate([PROMPT] * N, SP, seeds=list(range(N)))
    counts = torch.zeros(V, V, dtype=torch.float64)
    for o in outs:
        counts[o.tokens[0], o.tokens[1]] += 1
    return counts / N, stats


def test_monte_carlo_matches_target(mc):  # noqa: F811
    _, tgt, exact = mc
    emp, stats = empirical_recycling(tgt)
    assert stats.rows.accepted > N // 10, "drafts must be accepted often enough for the test to bite"
    assert tv(emp, exact) < 0.03


def test_monte_carlo_fails_on_broken_verifier(mc, monkeypatch):  # noqa: F811
    monkeypatch.setattr(verify, "matches", BROKEN_MATCHES["one-past"])
    _, tgt, exact = mc
    emp, _ = empirical_recycling(tgt)
    assert tv(emp, exact) > 0.03
