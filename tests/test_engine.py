"""The engine is lossless under greedy decoding: token-identical to transformers' generate, for every
method, batch 1 and 4, on random tiny Llama and Qwen2 models (float64) and on pycoder-22m (float32).
Plus the tree mask, KV compaction, loading errors and the stop rules."""
from __future__ import annotations

import json

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.drafters import DRAFTERS
from adaspec_worker.decode.model import ModelLoadError, load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.trees import DEFAULT_STATIC_TREE, DraftTree, StaticShape, grow_dynamic, grow_static
from jobs.specs import parse_spec
from tests import tiny
from tests.helpers import assert_text_equals_plain

METHODS = [("none", {}), ("eagle", {"k": 3}), ("eagle-tree", {}),
           ("eagle2", {"top_k": 4, "depth": 4, "total_tokens": 12}), ("draft-model", {"k": 3})]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = tiny.hf_model(request.param, vocab=24)
    tiny.save(hf, d / "target")
    tiny.save(tiny.hf_model(request.param, vocab=24, hidden=16, layers=1, seed=1), d / "draft")
    tiny.random_eagle_head(d / "target", d / "head")
    tiny.random_eagle3_head(d / "target", d / "head3", draft_vocab=16)
    return hf, d, load_target(str(d / "target"), dtype="float64", device="cpu")


def hf_greedy(hf, prompts, n):
    out = []
    for p in prompts:
        o = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(o[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_generate(setup, method, params, batch):
    hf, d, tgt = setup
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 12, (batch,), generator=g)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in lengths]
    ref = hf_greedy(hf, prompts, 16)
    draft = {"none": None, "draft-model": d / "draft"}.get(method, d / "head")
    eng = build_engine(tgt, parse_spec(method, params), draft=str(draft) if draft else None)
    outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.tokens for o in outs] == ref
    assert stats.rows.tau >= 1.0


def test_eagle3_head_loads_runs_and_is_lossless(setup):
    hf, d, tgt = setup
    prompts = [[1, 2, 3, 4, 5], [7, 1]]
    eng = build_engine(tgt, parse_spec("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}), draft=str(d / "head3"))
    assert type(eng.drafter).__name__ == "Eagle3Head"
    outs, _ = eng.generate(prompts, SamplingParams(max_new_tokens=10))
    assert [o.tokens for o in outs] == hf_greedy(hf, prompts, 10)
    tgt.aux_layers = ()


def test_perfect_drafter_accepts_everything(setup):
    hf, d, tgt = setup
    # the target drafting for itself
    eng = build_engine(tgt, parse_spec("draft-model", {"k": 4}), draft=str(d / "target"))
    outs, st = eng.generate([[3, 4, 5]], SamplingParams(max_new_tokens=15))
    assert st.rows.tau == pytest.approx(5.0) and outs[0].tokens == hf_greedy(hf, [[3, 4, 5]], 15)[0]


def test_pycoder_22m_matches_generate(shared):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import REPO

    path = shared / "models" / "pycoder-22m"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = pq.read_table(shared / "data" / "code-prompts.parquet").column("prompt").to_pylist()[:3]
    prompts = [tok(r, add_special_tokens=False)["input_ids"][-200:] for r in rows]
    ref = hf_greedy(hf, prompts, 24)
    tgt = load_target(str(path), dtype="float32", device="cpu")
    for method, params, draft in [("draft-model", {"k": 4}, shared / "models" / "pycoder-mini"),
                                  ("eagle2", {}, REPO / "heads" / "pycoder-22m-eagle"),
                                  ("eagle", {"k": 4}, REPO / "heads" / "pycoder-22m-eagle")]:
        eng = build_engine(tgt, parse_spec(method, params), draft=str(draft))
        for bs in (1, 3):
            outs, st = eng.generate(prompts[:bs], SamplingParams(max_new_tokens=24))
            assert [o.tokens for o in outs] == ref[:bs], (method, bs)
        if method != "draft-model":
            assert st.rows.tau > 1.5, "the trained head should be accepted often"


def test_tree_mask_is_ancestor_closure():
    torch.manual_seed(0)
    B, V, H = 3, 20, 8

    def step(toks, hidden, level, off, mask):
        return torch.randn(*toks.shape, V), torch.randn(*toks.shape, H)

    trees = [grow_dynamic(torch.zeros(B, dtype=torch.long), torch.randn(B, V), torch.randn(B, H), step, 4, 5, 25),
             grow_static(torch.zeros(B, dtype=torch.long), torch.randn(B, V), torch.randn(B, H), step,
                         StaticShape.from_paths(DEFAULT_STATIC_TREE))]
    for tree in trees:
        anc = tree.ancestors()
        for b in range(B):
            par = tree.parents[b].tolist()
            for i in range(tree.size):
                want, j = {i}, i
                while j != 0:
                    j = par[j]
                    want.add(j)
                assert set(torch.nonzero(anc[b, i]).flatten().tolist()) == want
                assert tree.depth[b, i] == len(want) - 1
                assert par[i] < i or i == 0, "topological order"
            kids = {}
            for i in range(1, tree.size):  # siblings carry distinct tokens
                kids.setdefault(par[i], []).append(tree.tokens[b, i].item())
            assert all(len(set(v)) == len(v) for v in kids.values())


def test_kv_cache_after_compaction_equals_fresh_forward(setup):
    _, d, tgt = setup
    torch.manual_seed(1)
    B, P = 2, 6
    prefix = torch.randint(0, 24, (B, P))
    cache = tgt.new_cache(B, 32)
    tgt(prefix, torch.arange(P).expand(B, P), cache)
    cache.lens += P
    # a tree of 5 nodes: 0 -> 1 -> 3, 0 -> 2 -> 4 ; accept 0,2,4 in row 0 and 0,1 in row 1
    tree = DraftTree(tokens=torch.randint(0, 24, (B, 5)), parents=torch.tensor([[0, 0, 0, 1, 2]] * B),
                     depth=torch.tensor([[0, 1, 1, 2, 2]] * B), valid=torch.ones(B, 5, dtype=torch.bool), levels=2,
                     width=2)
    tgt(tree.tokens, tree.positions(cache.lens), cache, tree.ancestors())
    path = torch.tensor([[0, 2, 4], [0, 1, 0]])
    keep = torch.tensor([3, 2])
    cache.compact(path, keep)
    for b in range(B):
        seq = torch.cat([prefix[b], tree.tokens[b, path[b, : keep[b]]]])[None]
        fresh = tgt.new_cache(1, 32)
        tgt(seq, torch.arange(seq.shape[1])[None], fresh)
        n = seq.shape[1]
        assert cache.lens[b] == n
        assert torch.allclose(cache.kv[b, :n], fresh.kv[0, :n], atol=1e-12)


def test_loading_errors_name_the_problem(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    _, d, tgt = setup
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text((d / "head" / "config.json").read_text())
    sd = load_file(str(d / "head" / "model.safetensors"))
    sd.pop("fc.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing keys \['fc.weight'\].*unexpected keys \['extra.weight'\]"):
        DRAFTERS["eagle"](str(bad), tgt)
    wide = tmp_path / "wide"
    tiny.save(tiny.hf_model("llama", vocab=24, hidden=48), wide / "t")
    tiny.random_eagle_head(wide / "t", wide / "h")
    with pytest.raises(ModelLoadError, match="hidden_size 48 does not match the target's 32"):
        DRAFTERS["eagle"](str(wide / "h"), tgt)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_target(str(gpt))


def test_bin_weights_load_only_without_arbitrary_pickles(setup, tmp_path):
    from safetensors.torch import load_file

    _, d, tgt = setup
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "config.json").write_text((d / "head" / "config.json").read_text())
    torch.save(load_file(str(d / "head" / "model.safetensors")), ok / "pytorch_model.bin")
    DRAFTERS["eagle"](str(ok), tgt)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((d / "head" / "config.json").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"fc.weight": Boom()}, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused to unpickle"):
        DRAFTERS["eagle"](str(evil), tgt)


def test_eos_max_tokens_and_stop_callback(setup):
    hf, d, tgt = setup
    ref = hf_greedy(hf, [[5, 6, 7]], 12)[0]
    eos = ref[4]
    eng = build_engine(tgt, parse_spec("eagle2", {"top_k": 4, "depth": 4, "total_tokens": 12}), draft=str(d / "head"))
    outs, _ = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, eos_token_ids=(eos,)))
    assert outs[0].tokens == ref[: ref.index(eos) + 1] and outs[0].finish_reason == "stop"
    outs, _ = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=7))
    assert outs[0].tokens == ref[:7] and outs[0].finish_reason == "length"
    outs, _ = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12),
                           stop_fn=lambda b, t: 3 if len(t) >= 3 else None)
    assert outs[0].tokens == ref[:3] and outs[0].finish_reason == "stop"


def test_sampling_reproducible_per_row_whatever_the_batch(setup):
    _, d, tgt = setup
    sp = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=20)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    for method, params, draft in [("none", {}, None),
                                  ("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}, d / "head"),
                                  ("draft-model", {"k": 3}, d / "draft")]:
        eng = build_engine(tgt, parse_spec(method, params), draft=str(draft) if draft else None)
        a, _ = eng.generate(prompts, sp, seeds=[11, 12, 13, 14])
        b, _ = eng.generate(prompts[2:3], sp, seeds=[13])
        assert a[2].tokens == b[0].tokens


TREE_METHODS = [("eagle", {"k": 3}), ("eagle-tree", {}), ("eagle2", {"top_k": 4, "depth": 4, "total_tokens": 12}),
                ("eagle2", {"top_k": 2, "depth": 6, "total_tokens": 10})]


@pytest.mark.parametrize("method,params", TREE_METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(TREE_METHODS)])
def test_sampled_text_equals_plain_alone_and_in_any_batch(setup, method, params):
    """The coupled tree rule: a row's sampled text is `none`'s for its seed, token for token, whatever the draft
    tree and whichever rows share its batch (float32). draft-model keeps the chain rule at T > 0: not here."""
    _, d, _ = setup
    tgt = load_target(str(d / "target"), dtype="float32", device="cpu")
    accepted = assert_text_equals_plain(tgt, method, params, draft=d / "head")
    if method != "eagle":  # a random head's chain may accept nothing; branching trees do, so the comparison bites
        assert accepted > 0, "drafts must be accepted"


def test_a_draining_batch_shrinks_by_eights_above_16(setup):
    """Rows ending one after another: the fast path's batch drains 32 -> 24 -> 16 -> ... (multiples of 8 above 16,
    powers of two below), its tokens those of the eager path, where rows leave as they finish."""
    from adaspec_worker.decode.batch import Batch, shrunk

    assert [shrunk(n) for n in (1, 3, 9, 16, 17, 24, 25, 33, 64)] == [1, 4, 16, 16, 24, 24, 32, 40, 64]
    hf, d, tgt = setup
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (30,), generator=g)]
    sizes, real = [], Batch.select
    res = {}
    for fast in (False, True):
        spec = parse_spec("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8})
        eng = build_engine(tgt, spec, draft=str(d / "head"), fast=fast)
        sp = SamplingParams(max_new_tokens=48, temperature=0.8, eos_token_ids=(5,))  # rows end one by one
        Batch.select = lambda self, rows, fast=fast: (sizes.append(len(rows)) if fast else None, real(self, rows))[1]
        try:
            outs, _ = eng.generate(prompts, sp, seeds=list(range(30)), refill=False)
        finally:
            Batch.select = real
        res[fast] = [o.tokens for o in outs]
    assert res[True] == res[False]
    assert 24 in sizes and all(n == shrunk(n) for n in sizes), sizes


@pytest.mark.parametrize("method,params", [("none", {}), ("eagle2", {"top_k": 4, "depth": 4, "total_tokens": 12}),
                                           ("adaedl", {"k_max": 4})])
def test_fast_path_equals_eager_path(setup, method, params):
    """Static buckets (5 rows padded to 8, finished rows frozen until the batch fits a smaller bucket;
    CUDA graphs on top where there is CUDA) give the tokens the exact-compaction eager path gives."""
    hf, d, tgt = setup
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (5,), generator=g)]
    eos = hf_greedy(hf, prompts[:1], 6)[0][5]  # an EOS that ends rows at different times
    res = {}
    for fast in (False, True):
        draft = str(d / "head") if method != "none" else None
        eng = build_engine(tgt, parse_spec(method, params), draft=draft, fast=fast)
        for sp in (SamplingParams(max_new_tokens=14, eos_token_ids=(eos,)),
                   SamplingParams(max_new_tokens=14, temperature=0.8)):
            outs, _ = eng.generate(prompts, sp, seeds=[1, 2, 3, 4, 5])
            res.setdefault(fast, []).append([(o.tokens, o.finish_reason) for o in outs])
            # frozen rows never write past the cache (device asserts catch it on CUDA)
            cap = eng.workspace.cache.capacity
            assert int(eng.workspace.cache.lens.max()) + eng.proposer.max_nodes <= cap
        assert (eng.workspace.B_cap == 8) == fast
    assert res[True] == res[False]


def test_phase_clock_flushes_a_round_without_the_one_queued_behind_it():
    """With the next round launched before the host waits on this one, the flush attributes this round's phases up
    to where the next one's begin, and keeps the next round's marks for its own flush."""
    from adaspec_worker.decode.stats import EngineStats, PhaseClock

    clock = PhaseClock(torch.device("cpu"))
    clock.marks = [("draft", 0.0), ("verify", 1.0), ("other", 3.0)]  # round r
    upto = len(clock.marks)
    clock.marks += [("draft", 3.5), ("verify", 4.0)]  # round r + 1, still running
    spent = EngineStats()
    clock.flush(spent, upto)
    assert (spent.draft_seconds, spent.verify_seconds, spent.other_seconds) == (1.0, 2.0, 0.5)
    assert clock.marks == [("draft", 3.5), ("verify", 4.0)]
    later = EngineStats()
    clock.flush(later)  # the default: every interval up to the last mark, which stays
    assert (later.draft_seconds, later.verify_seconds) == (0.5, 0.0) and clock.marks == [("verify", 4.0)]


def test_a_shrinking_batch_moves_its_cache_rows_in_place():
    """A batch that shrinks keeps its live rows in order; its padding is chosen so that every kept row moves by one
    row copy with no temporary of the whole kept cache (a batch-16 call's memory peak on an H100 came from it)."""
    from adaspec_worker.decode.batch import padding, shrunk
    from adaspec_worker.decode.kv_cache import move_rows

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        B = shrunk(int(torch.randint(2, 65, (1,), generator=g)))  # a batch's sizes: 2, 4, 8, 16, 24, 32, ...
        A = int(torch.randint(1, B + 1, (1,), generator=g))
        alive = sorted(torch.randperm(B, generator=g)[:A].tolist())
        n = shrunk(A)
        if n >= B:
            continue
        order = alive + padding(alive, n, B)
        assert len(order) == n == len(set(order)) and order[:A] == alive
        assert not set(order[A:]) & set(alive), "padding slots are dead ones"
        buf = torch.randn(B, 3, generator=g)
        want = buf[torch.tensor(order)].clone()
        moved = move_rows(buf, order)
        assert moved or B > 16, (B, alive)  # to a power-of-two bucket always; above 16 slots it may fall back
        if moved:
            torch.testing.assert_close(buf[:n], want)
    # an order whose moves would read an overwritten row is refused, leaving the buffer as it was
    buf = torch.arange(4.0)[:, None]
    assert not move_rows(buf, [1, 0]) and buf.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert move_rows(buf, [2, 3]) and buf.flatten().tolist() == [2.0, 3.0, 2.0, 3.0]


def test_a_round_makes_its_trees_ancestry_once(monkeypatch):
    """The target pass's mask and the verification read one ancestry per round (it was made twice: `levels` gathers
    over [B, N, N] each time)."""
    from adaspec_worker.decode.trees import DraftTree

    made = []
    plain = DraftTree.ancestors

    def counting(self):
        if self.ancestry is None:
            made.append(self.size)
        return plain(self)

    monkeypatch.setattr(DraftTree, "ancestors", counting)
    from tests.helpers import TINY, TINY_HEAD

    tgt = load_target(str(TINY), dtype="float32", device="cpu")
    engine = build_engine(tgt, parse_spec("eagle2", {"depth": 3, "total_tokens": 10}), draft=str(TINY_HEAD))
    for temperature in (0.0, 0.8):
        made.clear()
        sampling = SamplingParams(max_new_tokens=12, temperature=temperature)
        _, st = engine.generate([[1, 2, 3, 4, 5], [6, 7, 8]], sampling)
        assert len(made) == st.target_passes > 0, (len(made), st.target_passes)
