"""RASD and the job datastore: greedy identity with transformers' generate (alone, in batches, with a warm
datastore), sampled text equal to plain sampling's, the longest-common-prefix fusion and the datastore's ring
buffer by hand, and the datastore kept with the job (saved, loaded, drafting from last run's outputs)."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.proposers.datastore import Datastore
from adaspec_worker.decode.proposers.rasd import fuse
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.trees import DraftTree
from jobs.specs import SpecError, parse_spec
from tests import tiny
from tests.helpers import assert_text_equals_plain
from tests.test_engine import hf_greedy

# prune_top_k 0: a random head's top tokens would prune the (right) retrieved continuations; pruning is on in case 1
RASD = {"top_k": 3, "depth": 3, "total_tokens": 8, "k": 4, "branches": 3, "datastore_tokens": 256, "prune_top_k": 0}
CASES = [
    ("rasd", RASD),
    ("rasd", dict(RASD, prune_top_k=5, datastore_tokens=0)),
    ("retrieval", {"datastore_tokens": 64, "branches": 2}),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf, tgt = tiny.hf_and_target(request.param, d)
    tiny.random_eagle_head(d / "target", d / "head")
    return hf, d, tgt


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 24, (int(k),), generator=g).tolist() * 2 for k in torch.randint(1, 8, (n,), generator=g)]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_generate_cold_and_warm(setup, method, params, batch):
    hf, d, tgt = setup
    prompts = _prompts(batch, batch)
    ref = hf_greedy(hf, prompts, 20)
    eng = build_engine(tgt, parse_spec(method, params), draft=str(d / "head") if method == "rasd" else None)
    taus = []
    for _ in range(2):  # the second call drafts from the first call's rows when there is a datastore
        outs, st = eng.generate(prompts, SamplingParams(max_new_tokens=20))
        assert [o.tokens for o in outs] == ref
        taus.append(st.rows.tau)
    if params.get("datastore_tokens"):
        assert taus[1] > taus[0] and taus[1] > 3


def test_sampled_text_equals_plain_alone_and_in_any_batch(setup):
    """The coupled rule: whatever the fused tree and whatever the datastore holds (rows of earlier calls, other
    seeds), a row's sampled text is plain sampling's for its seed (float32)."""
    _, d, _ = setup
    tgt = load_target(str(d / "target"), dtype="float32", device="cpu")
    assert assert_text_equals_plain(tgt, "rasd", dict(RASD, prune_top_k=12), draft=d / "head") > 0


def test_fusion_by_longest_common_prefix():
    # tree: root 0 -> 1 (tok 5) -> 3 (tok 6); root -> 2 (tok 7)
    tree = DraftTree(
        tokens=torch.tensor([[9, 5, 7, 6]]),
        parents=torch.tensor([[0, 0, 0, 1]]),
        depth=torch.tensor([[0, 1, 1, 2]]),
        valid=torch.ones(1, 4, dtype=torch.bool),
        levels=2,
        width=2,
    )
    toks = torch.tensor([[[5, 6, 1], [5, 6, 1], [5, 2, 3], [7, 7, 7], [4, 4, 4]]])  # [1, b=5, k=3]
    valid = torch.ones(1, 5, 3, dtype=torch.bool)
    valid[0, 4] = False  # pruned / no match
    fused = fuse(tree, toks, valid)
    N, k = 4, 3
    at = lambda c, j: N + c * k + j  # noqa: E731
    new = {i for i in range(fused.size) if fused.valid[0, i]} - set(range(N))
    # c0: 5 6 on the tree, 1 new under node 3; c1: duplicate of c0; c2: 5 on the tree, 2 3 new; c3: 7 on the tree
    assert new == {at(0, 2), at(2, 1), at(2, 2), at(3, 1), at(3, 2)}
    par = fused.parents[0].tolist()
    assert par[at(0, 2)] == 3 and par[at(2, 1)] == 1 and par[at(2, 2)] == at(2, 1)
    assert par[at(3, 1)] == 2 and par[at(3, 2)] == at(3, 1)
    assert fused.depth[0, at(2, 2)] == 3 and fused.levels == 3
    assert all(par[i] < i for i in range(1, fused.size)), "topological order"
    kids: dict[int, list[int]] = {}
    for i in range(1, fused.size):  # siblings among valid nodes carry distinct tokens
        if fused.valid[0, i]:
            kids.setdefault(par[i], []).append(int(fused.tokens[0, i]))
    assert all(len(set(v)) == len(v) for v in kids.values())


def test_datastore_ring_buffer_by_hand(tmp_path):
    store = Datastore(10)
    store.ensure("cpu")
    text = torch.tensor([[1, 2, 3, 4, -1, -1], [7, 8, -1, -1, -1, -1], [5, 5, 5, 5, 5, 5]])
    store.add(text, torch.tensor([4, 2, 6]), torch.tensor([True, True, False]))
    assert store.tokens.tolist() == [1, 2, 3, 4, -1, 7, 8, -1, -1, -1] and int(store.write) == 8
    length, age = store.match(torch.tensor([[-1, 2, 3]]), min_ngram=1)  # the row ends in "2 3"
    assert int(length.argmax()) == 2 and int(length.max()) == 2
    toks, ok = store.continuation(torch.tensor([[2]]), 3)
    assert toks[0, 0, :1].tolist() == [4] and ok[0, 0].tolist() == [True, False, False]  # stops at the separator
    store.add(torch.tensor([[6, 6, 6, 6]]), torch.tensor([4]), torch.tensor([True]))  # wraps: overwrites the oldest
    assert store.tokens.tolist() == [6, 6, -1, 4, -1, 7, 8, -1, 6, 6] and int(store.write) == 3
    assert int(age[0, 2]) == 4  # ages count from the write pointer (8 then): slot 2 is 4 slots after it
    store.save(str(tmp_path / "ds.safetensors"))
    again = Datastore(6, str(tmp_path / "ds.safetensors"))
    again.ensure("cpu")  # a smaller buffer keeps the newest tokens, oldest first
    assert again.tokens.tolist() == [6, 6, 6, 6, -1, -1] and int(again.write) == 5


def test_datastore_is_kept_with_the_job(setup, tmp_path):
    """A second engine (a resumed job, or tonight's job) loads what the first one persisted and drafts from it
    at once; without the file it starts cold."""
    hf, d, tgt = setup
    prompts = _prompts(3, 7)
    sp = SamplingParams(max_new_tokens=20)
    path = str(tmp_path / "job" / "datastore.safetensors")
    params = dict(RASD, datastore=path)
    first = build_engine(tgt, parse_spec("rasd", params), draft=str(d / "head"))
    _, cold = first.generate(prompts, sp)
    first.proposer.persist()
    warm_eng = build_engine(tgt, parse_spec("rasd", params), draft=str(d / "head"))
    outs, warm = warm_eng.generate(prompts, sp)
    assert [o.tokens for o in outs] == hf_greedy(hf, prompts, 20)
    assert warm.rows.tau > cold.rows.tau and warm.rows.tau > 3
    with pytest.raises(SpecError, match="datastore needs datastore_tokens"):
        parse_spec("retrieval", {"datastore": path})
    with pytest.raises(SpecError, match="local path"):
        parse_spec("rasd", {"datastore": "s3://bucket/ds"})


def test_finished_rows_join_the_datastore_once(setup):
    """Rows enter the datastore when they leave the batch or at the next call: each exactly once, padding never."""
    _, d, tgt = setup
    for fast in (False, True):  # eager: rows leave as they finish; fast: 3 rows padded to a bucket of 4
        eng = build_engine(tgt, parse_spec("retrieval", {"datastore_tokens": 512}), fast=fast)
        prompts = [[1, 2, 3], [4, 5], [6]]
        eng.generate(prompts, SamplingParams(max_new_tokens=5, eos_token_ids=(7,)))
        eng.generate([[9]], SamplingParams(max_new_tokens=2))
        eng.proposer.persist()  # no path: writes nothing
        with torch.inference_mode():
            eng.proposer.flush()
            eng.proposer.flush()  # twice: nothing is added again
        tokens = eng.proposer.store.tokens.tolist()
        rows = [i for i in range(1, len(tokens)) if tokens[i] == -1 and tokens[i - 1] >= 0]
        assert len(rows) == 4, (fast, tokens[:40])
        text = ",".join(map(str, tokens))
        assert all(",".join(map(str, p)) in text for p in prompts + [[9]])


def test_new_parameters_leave_old_config_hashes_alone():
    """`datastore_tokens`/`datastore` (retrieval) and `matrix` (token-recycling) came after outputs were written:
    at their defaults the config hash is the one computed before they existed (values from commit 245ba26)."""
    from jobs.manifest import manifest_from_dict

    base = {
        "name": "a",
        "input": {"path": "/data/x.parquet"},
        "output": {"path": "/out/o"},
        "model": {"target": "/m/t"},
    }
    old = {"retrieval": "6e3aa0c28bc5d7c5", "token-recycling": "ee2467a8f476e5d5"}
    for method, want in old.items():
        m = manifest_from_dict({**base, "speculative": {"method": method, "params": {"k": 4}}})
        assert m.config_hash() == want and "k" in m.speculative.params
    on = manifest_from_dict({**base, "speculative": {"method": "retrieval", "params": {"k": 4, "datastore_tokens": 8}}})
    assert on.config_hash() != old["retrieval"]
