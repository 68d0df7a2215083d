"""Chunked prefill (decode/prefill.py): a prompt prefilled a chunk of positions at a time leaves the caches, root,
LDLP feature and drafter opinion a whole prefill leaves; under continuous batching the chunks of a long prompt's
refill run between rounds while the other slots keep decoding."""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.drafters import load_draft_model, load_eagle_head
from adaspec_worker.decode.model import causal_tree, load_target
from adaspec_worker.decode.prefill import ChunkedPrefill, prefill_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import parse_spec
from tests.helpers import TINY, TINY_HEAD


@pytest.fixture(scope="module")
def tgt():
    return load_target(str(TINY), dtype="float32", device="cpu")


def padded(prompts):
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    return ids, torch.tensor([len(p) for p in prompts])


@pytest.mark.parametrize("drafter_kind", ["eagle", "draft-model", None])
@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_chunks_leave_what_a_whole_prefill_leaves(tgt, drafter_kind, chunk):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (17, 1, 9, 2, 12)]  # one-token rows too
    ids, lens = padded(prompts)
    drafter = {"eagle": lambda: load_eagle_head(str(TINY_HEAD), tgt), "draft-model": lambda: load_draft_model(
        str(TINY), tgt), None: lambda: None}[drafter_kind]()
    S = 64
    whole = tgt.new_cache(len(prompts), S)
    pre = prefill_target(tgt, drafter, ids, lens, whole)
    if drafter is not None:
        drafter.begin(len(prompts), S)
        ref_draft = drafter.prefill(ids, lens, pre.features)
        ref_cache = drafter.cache
        drafter.cache = drafter.new_cache(len(prompts), S)  # a cache of its own: the chunked prefill leaves it be
        drafter.cache.full_lens.fill_(-7)
    chunked = ChunkedPrefill(tgt, drafter, ids, lens, tgt.new_cache(len(prompts), S),
                             None if drafter is None else drafter.new_cache(len(prompts), S), chunk)
    while not chunked.done:
        chunked.step()
    assert chunked.steps == -(-(ids.shape[1] - 1) // chunk)
    got = chunked.prefilled
    assert torch.equal(got.root, pre.root)
    torch.testing.assert_close(got.ldlp_feat, pre.ldlp_feat)
    assert torch.equal(chunked.cache.lens, whole.lens)
    for b, n in enumerate(whole.lens.tolist()):  # the committed positions; past them a row's slots are scratch
        torch.testing.assert_close(chunked.cache.kv[b, :n], whole.kv[b, :n])
    if drafter is not None:
        assert torch.equal(chunked.draft_cache.lens, ref_cache.lens)
        for b, n in enumerate(ref_cache.lens.tolist()):
            torch.testing.assert_close(chunked.draft_cache.kv[b, :n], ref_cache.kv[b, :n])
        for mine, ref in zip(chunked.draft, ref_draft):
            assert (mine is None) == (ref is None)
            if ref is not None:
                torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)  # float rounding of other sums
        assert (drafter.cache.full_lens == -7).all()


@pytest.mark.parametrize("drafter_kind", ["eagle", "draft-model"])
def test_a_drafters_prefill_makes_logits_at_each_rows_last_entry_only(tgt, drafter_kind, monkeypatch):
    """No [B, T, V] block: the drafter's head maps one state per row (the peak memory of a batch's prefill), and its
    opinion equals the last entries' rows of the whole block's logits."""
    prompts = [[5, 9, 11, 13, 2, 7, 40], [3, 8], [6]]
    ids, lens = padded(prompts)
    drafter = (load_eagle_head(str(TINY_HEAD), tgt) if drafter_kind == "eagle" else load_draft_model(str(TINY), tgt))
    feats = prefill_target(tgt, drafter, ids, lens, tgt.new_cache(3, 32)).features
    drafter.begin(3, 32)
    mapped = []
    head = drafter.head
    monkeypatch.setattr(drafter, "head", lambda state: mapped.append(tuple(state.shape)) or head(state))
    logits, _ = drafter.prefill(ids, lens, feats)
    assert mapped == [(3, mapped[0][1])], mapped
    s = drafter.entry_shift
    drafter.begin(3, 32)
    drafter.cache.lens.zero_()
    W = ids.shape[1] - s
    block, _ = drafter.forward(ids[:, s:], drafter.lift(None if feats is None else feats[:, :W]),
                               torch.arange(W).expand(3, W), causal_tree(3, W, ids.device), 0)
    for b, n in enumerate((lens - s).tolist()):
        want = block[b, n - 1] if n > 0 else torch.zeros_like(logits[b])
        torch.testing.assert_close(logits[b], want)


def test_a_long_prompt_prefills_between_rounds_while_the_other_slots_decode(tgt):
    """Two slots; the second row's prompt of 30 tokens refills a freed slot in chunks of 4 positions: a round runs
    after every chunk (the other row keeps decoding), the refilled slot idles meanwhile, and no token changes."""
    eng = build_engine(tgt, parse_spec("eagle", {"k": 3}), draft=str(TINY_HEAD))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 6, 30, 5)]
    sp = SamplingParams(max_new_tokens=40)
    stop = lambda i, toks: [2, 40, 6, 5][i] if len(toks) >= [2, 40, 6, 5][i] else None  # noqa: E731
    ref = [c.tokens for c in eng.generate(prompts, sp, None, stop)[0]]
    events = []
    launch, load = eng._launch, eng._load_step
    eng._launch = lambda *a: (events.append("round"), launch(*a))[1]
    eng._load_step = lambda *a: (events.append("chunk"), load(*a))[1]
    outs, whole_prompts = eng.generate(prompts, sp, None, stop, slots=2, refill=True)
    events.clear()
    outs, chunked = eng.generate(prompts, sp, None, stop, slots=2, refill=True, prefill_chunk=4)
    assert [c.tokens for c in outs] == ref
    first, last = events.index("chunk"), len(events) - 1 - events[::-1].index("chunk")
    assert events[first:last + 1].count("chunk") == chunked.prefill_chunks == -(-29 // 4)  # the long one only
    assert all(events[i + 1] == "round" for i in range(first, last) if events[i] == "chunk")  # a round between
    assert chunked.busy_slot_rounds == whole_prompts.busy_slot_rounds  # the same work...
    idle = chunked.slot_rounds - chunked.busy_slot_rounds
    assert idle >= chunked.prefill_chunks - 1  # ...while the slot it refills idles in the rounds between its chunks


def test_a_chunked_refill_left_alone_finishes_without_rounds(tgt):
    """When every decoding row ends while a chunked refill loads, its remaining chunks run back to back."""
    eng = build_engine(tgt, parse_spec("none", {}))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (3, 40)]
    sp = SamplingParams(max_new_tokens=8)
    ref = [c.tokens for c in eng.generate(prompts, sp)[0]]
    stop = lambda i, toks: 1 if i == 0 and toks else None  # noqa: E731  the first row ends after one token
    ref[0] = ref[0][:1]
    outs, stats = eng.generate(prompts, sp, None, stop, slots=1, prefill_chunk=2)
    assert [c.tokens for c in outs] == ref
    assert stats.prefill_chunks == -(-39 // 2)


@pytest.mark.parametrize("method,params,draft", [("none", {}, None), ("eagle", {"k": 3}, TINY_HEAD),
                                                 ("draft-model", {"k": 3}, TINY)])
def test_a_first_batch_of_long_prompts_prefills_in_chunks(tgt, monkeypatch, method, params, draft):
    """The first batch's prompts too (every pass's mask [B, chunk, S], however long the prompts): same tokens."""
    eng = build_engine(tgt, parse_spec(method, params), draft=None if draft is None else str(draft))
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (25, 3, 1, 17)]
    for sp in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.8)):
        ref = [c.tokens for c in eng.generate(prompts, sp, [4, 5, 6, 7])[0]]
        steps, step = [], ChunkedPrefill.step
        monkeypatch.setattr(ChunkedPrefill, "step", lambda self, steps=steps, step=step: (steps.append(self.cursor),
                                                                                         step(self))[1])
        outs, stats = eng.generate(prompts, sp, [4, 5, 6, 7], prefill_chunk=5)
        monkeypatch.undo()
        assert [c.tokens for c in outs] == ref, (method, sp.temperature)
        assert steps == [0, 5, 10, 15, 20] and stats.prefill_chunks == 0  # before the first round: not a refill


def test_short_prompts_join_at_once_while_a_long_one_loads(tgt):
    """A refill splits: rows with short prompts take their slots at once, the long one loads in chunks; while it
    loads, rows with short prompts still refill freed slots. No token changes."""
    eng = build_engine(tgt, parse_spec("eagle", {"k": 3}), draft=str(TINY_HEAD))
    eng.refill_every = 2  # 4 slots: a refill waits for 2 free ones, so rows 4 (long) and 5 (short) come together
    g = torch.Generator().manual_seed(9)
    lengths = (3, 5, 4, 6, 40, 4, 4, 3)  # prompt tokens: only row 4 is long, its prefill 13 chunks of 3 positions
    stops = (2, 2, 9, 30, 6, 3, 5, 4)  # rows 0 and 1 end together; row 2 ends while row 4 loads
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in lengths]
    stop = lambda i, toks: stops[i] if len(toks) >= stops[i] else None  # noqa: E731
    sp = SamplingParams(max_new_tokens=32)
    ref = [c.tokens for c in eng.generate(prompts, sp, None, stop)[0]]
    events = []
    refill, begin, load = eng._refill, eng._begin_load, eng._load_step
    eng._refill = lambda b, slots, take, *a: (events.append(("refill", tuple(take))), refill(b, slots, take, *a))[1]
    eng._begin_load = lambda b, slots, take, *a: (events.append(("load", tuple(take))), begin(b, slots, take, *a))[1]
    eng._load_step = lambda *a: (events.append(("chunk",)), load(*a))[1]
    outs, stats = eng.generate(prompts, sp, None, stop, slots=4, prefill_chunk=3)
    assert [c.tokens for c in outs] == ref
    start = events.index(("load", (4,)))
    assert events[start - 1] == ("refill", (5,))  # the same refill: the short row seated at once
    seated = start + 1 + [i for i, e in enumerate(events[start + 1:]) if e == ("chunk",)][-1]
    assert any(e[0] == "refill" for e in events[start + 1: seated])  # a short row joined while row 4 loaded
    assert stats.prefill_chunks == 13


@pytest.mark.parametrize("method,params,draft", [("none", {}, None), ("eagle2", {"top_k": 3, "depth": 3,
                                                 "total_tokens": 8}, TINY_HEAD), ("draft-model", {"k": 3}, TINY)])
def test_a_first_batch_prefills_from_fixed_buffers_padded_to_its_width(tgt, monkeypatch, method, params, draft):
    """With CUDA graphs (`_run` stands in for capture and replay here), a batch's prefill reads its prompts padded to
    a multiple of 64 tokens from one fixed buffer per (batch size, width), the same buffer on the next call: the same
    tokens as prompts padded to the longest, greedy and sampled, one-token prompts included."""
    from adaspec_worker.decode.engine import Engine

    eng = build_engine(tgt, parse_spec(method, params), draft=None if draft is None else str(draft))
    g = torch.Generator().manual_seed(3)
    batches = [[torch.randint(5, 400, (n,), generator=g).tolist() for n in lens] for lens in ((25, 3, 1, 17), (70, 2))]
    for sp in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.8)):
        refs = [[c.tokens for c in eng.generate(prompts, sp, [4, 5, 6, 7][: len(prompts)])[0]] for prompts in batches]
        keys, buffers = [], set()
        monkeypatch.setattr(Engine, "graphs_on", property(lambda self: True))
        monkeypatch.setattr(eng, "_run", lambda key, fn, keys=keys: (keys.append(key), fn())[1])
        for _ in range(2):
            for prompts, ref in zip(batches, refs):
                outs, _ = eng.generate(prompts, sp, [4, 5, 6, 7][: len(prompts)])
                assert [c.tokens for c in outs] == ref, (method, sp.temperature, len(prompts))
                buffers |= {t.data_ptr() for t in eng.workspace.prompt_rows.values()}
        monkeypatch.undo()
        starts = [k for k in keys if k[0] == "prefill"]
        assert starts == [("prefill", 4, 64, draft is not None), ("prefill", 2, 128, draft is not None)] * 2, starts
        assert len(buffers) == 2  # (4, 64) and (2, 128): the second calls read the first ones' buffers
