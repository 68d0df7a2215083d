"""The fast path's model changes are exact: fused QKV / gate|up weights and the grouped SDPA give the same
logits, hidden states and KV cache as the plain path (compile off: CPU), for the target and the EAGLE head,
and a whole engine run on fused models is token-identical to one on plain models."""
from __future__ import annotations

import copy

import pytest
import torch

from adaspec_worker.decode.build import build_engine, load_drafter
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import parse_spec
from tests import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fused")
    tiny.save(tiny.hf_model("llama", vocab=64, hidden=32, layers=2, seed=1), d / "target")
    tiny.save(tiny.hf_model("qwen2", vocab=64, hidden=32, layers=2, seed=2), d / "qwen")
    tiny.random_eagle_head(d / "target", d / "head", seed=3)
    return d


def _tree_pass(model, cache, B=3, T=5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (B, T), generator=g)
    pos = cache.lens[:, None] + torch.arange(T)[None]
    mask = (torch.rand(B, T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
    mask = mask.tril()
    return model(ids, pos, cache, mask)


@pytest.mark.parametrize("name", ["target", "qwen"])
def test_fused_target_equals_plain(models, name):
    plain = load_target(str(models / name), dtype="float64", device="cpu")
    fused = copy.deepcopy(plain).fuse(compile=False)
    assert fused.fused and fused._compiled is None
    caches = [m.new_cache(3, 32) for m in (plain, fused)]
    for c in caches:
        c.lens.copy_(torch.tensor([0, 4, 9]))
        c.kv.normal_(generator=torch.Generator().manual_seed(5))
    (lp, hp, _), (lf, hf, _) = _tree_pass(plain, caches[0]), _tree_pass(fused, caches[1])
    torch.testing.assert_close(lf, lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hf, hp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(caches[1].kv, caches[0].kv, rtol=1e-10, atol=1e-10)
    assert sorted(fused.state_dict()) == sorted(plain.state_dict())  # names unchanged: heads still save/load


@pytest.mark.parametrize("method,params", [("none", {}), ("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}),
                                           ("eagle", {"k": 3})])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_on_fused_models_equals_plain(models, method, params, temperature):
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    sp = SamplingParams(max_new_tokens=12, temperature=temperature)
    outs = []
    for fuse in (False, True):
        target = load_target(str(models / "target"), dtype="float64", device="cpu")
        spec = parse_spec(method, params)
        drafter = load_drafter(target, spec, str(models / "head"))
        if fuse:
            target.fuse(compile=False)
            if drafter is not None:
                drafter.fuse(compile=False)
        res, _ = build_engine(target, spec, draft=drafter).generate(prompts, sp, seeds=[1, 2, 3])
        outs.append([r.tokens for r in res])
    assert outs[0] == outs[1]


def test_compiled_pass_writes_the_cache_in_place(models):
    """Inductor's code for a decode pass allocates nothing the size of a cache layer: the KV write goes into the
    cache itself (a write through a per-layer view was compiled into a layer-sized copy per layer plus a copy
    back, which made batch-64 decoding on an H100 several times slower), and attention reads the cache in place.
    The same pass is compiled with a write through a view to show the check sees such a copy."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    from adaspec_worker.decode import kv_cache

    model = load_target(str(models / "target"), dtype="float32", device="cpu").fuse(compile=False)
    B, S = 2, 1000
    cache = model.new_cache(B, S)
    cache.lens.copy_(torch.tensor([7, 30]))
    layer_numel = B * S * 2 * model.cfg.num_kv_heads * model.cfg.head_dim

    def biggest_buffer() -> int:
        torch._dynamo.reset()
        ids, pos = torch.tensor([[3], [5]]), cache.lens[:, None].clone()
        tree = torch.ones(B, 1, 1, dtype=torch.bool)
        with torch.inference_mode():
            _, codes = run_and_get_code(torch.compile(model._body, dynamic=False), ids, pos, cache.kv, cache.lens,
                                        tree, 0)
        sizes = re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", "\n".join(codes))
        return max(math.prod(int(n) for n in s.split(",") if n.strip()) for s in sizes)

    assert biggest_buffer() < layer_numel // 8
    through_view = kv_cache.LayerCache.write

    def write_through_view(self, slots, new):  # the old write: into the layer's view
        rows = torch.arange(slots.shape[0])[:, None]
        self.kv[:, :, self.index][rows, slots] = new.to(self.kv.dtype)

    kv_cache.LayerCache.write = write_through_view
    try:
        assert biggest_buffer() >= layer_numel
    finally:
        kv_cache.LayerCache.write = through_view
        torch._dynamo.reset()


def test_compiled_round_equals_the_plain_ops(models):
    """A round's small ops (`Engine.compile_round`: the tree building of a traceable proposer's `propose`, the tree's
    positions and mask, the bookkeeping after the target pass in `settle.py`, the drafter's catch-up, the outcome's
    packing), compiled by inductor as the engine runs them where the target is compiled (CUDA), decode the same
    tokens as the plain ops: greedy and sampled dynamic trees, a greedy chain, a static tree and an adaptive tree
    (AdaEDL's, per-row lambda)."""
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    cases = [("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}, 0.0),
             ("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}, 0.8), ("eagle", {"k": 3}, 0.0),
             ("eagle-tree", {"tree": ((0,), (1,), (0, 0))}, 0.0),
             ("adaedl", {"top_k": 2, "k_max": 3}, 0.8)]  # adaptive: the call's shape and per-row state (lambda)
    torch._dynamo.reset()
    try:
        for method, params, temperature in cases:
            sp = SamplingParams(max_new_tokens=10, temperature=temperature)
            outs = []
            for whole in (False, True):
                target = load_target(str(models / "target"), dtype="float32", device="cpu")
                spec = parse_spec(method, params)
                engine = build_engine(target, spec, draft=load_drafter(target, spec, str(models / "head")))
                assert engine.proposer.traceable
                drafting = [v.key for v in engine.proposer.variants() if v.key is not None and v.key.drafts]
                if drafting:  # an adaptive menu: its deepest shape, whatever the policy would choose
                    engine.proposer.force(max(drafting, key=lambda shape: shape.depth))
                if whole:
                    engine.compile_round()
                res, stats = engine.generate(prompts, sp, seeds=[1, 2, 3], slots=3)
                outs.append(([r.tokens for r in res], stats.rows.accepted))
            assert outs[0] == outs[1], (method, temperature)
    finally:
        torch._dynamo.reset()


def test_compiled_settle_after_a_plain_ranked_tree(models):
    """The compiled `settle` alone (the proposer's ops plain) over an adaptive method's ranked trees at each depth of
    its menu decodes the same tokens as the plain ops. It once read the KV cache out of bounds on the CPU (a fatal
    error in the worker): the path's node per level came from an argmax over a one-hot, which inductor's vectorised
    CPU code got wrong."""
    from adaspec_worker.decode import settle

    prompts = [[1, 2, 3, 4], [5, 6]]
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    torch._dynamo.reset()
    try:
        outs = []
        for whole in (False, True):
            target = load_target(str(models / "target"), dtype="float32", device="cpu")
            spec = parse_spec("opt-tree", {"max_depth": 2})
            engine = build_engine(target, spec, draft=load_drafter(target, spec, str(models / "head")))
            if whole:
                engine._settle = settle.compiled_settle()
            for variant in engine.proposer.variants():
                engine.proposer.force(variant.key)
                res, _ = engine.generate(prompts, sp, seeds=[1, 2], slots=2)
                outs.append((whole, variant.key, [r.tokens for r in res]))
        half = len(outs) // 2
        assert [o[1:] for o in outs[:half]] == [o[1:] for o in outs[half:]]
    finally:
        torch._dynamo.reset()


def test_compiled_settle_compacts_the_cache_in_place(models):
    """Inductor's code for `settle` allocates nothing near the cache's size: the compaction moves the accepted
    entries inside the cache (a functionalised copy of the whole cache per round would cost batch-64 decoding
    most of its speed)."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    from adaspec_worker.decode import settle
    from adaspec_worker.decode.settle import SlotState
    from adaspec_worker.decode.trees import chain_tree

    model = load_target(str(models / "target"), dtype="float32", device="cpu")
    B, S, N, V, H = 2, 1000, 4, model.cfg.vocab_size, model.cfg.hidden_size
    cache = model.new_cache(B, S)
    cache.lens.copy_(torch.tensor([7, 30]))
    tree = chain_tree(torch.tensor([3, 4]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    slots = SlotState(kv=cache.kv, lens=cache.lens, alive=torch.ones(B, dtype=torch.bool), root=torch.zeros(B).long(),
                      seed=torch.zeros(B).long(), counter=torch.zeros(B).long(), ldlp_feat=torch.zeros(B, 2 * H),
                      embed=model.embed_tokens.weight)
    logits, hidden = torch.randn(B, N, V), torch.randn(B, N, H)

    def biggest_buffer() -> int:
        torch._dynamo.reset()
        with torch.inference_mode():
            _, codes = run_and_get_code(torch.compile(settle.settle, dynamic=False), tree, logits, hidden,
                                        SamplingParams(temperature=0.0), slots)
        sizes = re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", "\n".join(codes))
        return max(math.prod(int(n) for n in s.split(",") if n.strip()) for s in sizes)

    def per_layer_compact(kv, lens, src, n_keep):  # a compaction through each layer's view of the cache
        bi = torch.arange(src.shape[0])[:, None]
        moved = kv[bi, lens[:, None] + src]  # [B, P, L, 2, Hkv, D]
        dst = lens[:, None] + torch.arange(src.shape[1])[None, :]
        for layer in range(kv.shape[2]):
            kv[:, :, layer][bi, dst] = moved[:, :, layer]
        lens += n_keep

    in_place = settle.compact
    try:
        assert biggest_buffer() < cache.kv.numel() // 100
        settle.compact = per_layer_compact
        assert biggest_buffer() >= cache.kv.numel() // model.cfg.num_layers  # the check sees a layer-sized copy
    finally:
        settle.compact = in_place
        torch._dynamo.reset()
