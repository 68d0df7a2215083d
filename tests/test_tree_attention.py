"""The Triton tree-attention kernel (CUDA's attention in the fast path) run by Triton's CPU interpreter: equal to
SDPA over the dense mask for tree masks, offsets, strided cache views, empty rows and grouped heads, in one pass
and with a row's live slots split over several programs and merged (ADARUN_ATTN_SPLITS); sensitive to
the tree mask; and a whole engine run with it is token-identical to one without (greedy and sampled, `none` and
`eagle2`, continuous batching on, its refills' prompts prefilled in chunks); compiled, the pass writes the cache in
place. Runs in a subprocess: the interpreter is chosen when Triton is imported."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from adaspec_worker.decode.model import LayerCache, attention_mask, load_target
    from adaspec_worker.decode.tree_attention import available, span, tree_attention
    from adaspec_worker.decode.build import build_engine, load_drafter
    from adaspec_worker.decode.sampling import SamplingParams
    from jobs.specs import parse_spec
    assert available()
    torch.manual_seed(0)

    def reference(q, kv, lens, tm):
        mask = attention_mask(lens, tm, kv.shape[1])  # [B, T, S]
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                                               enable_gqa=True)
        return out.transpose(1, 2)

    import itertools
    import os
    cases = [(3, 5, 6, 2, 64, 150, 2), (2, 1, 4, 4, 16, 70, 0), (1, 40, 8, 2, 32, 200, 0)]
    for splits, (B, T, H, Hkv, D, S, off) in itertools.product(("1", "4", "auto"), cases):
        os.environ["ADARUN_ATTN_SPLITS"] = splits  # flash-decoding's split of the live slots, merged after
        q = torch.randn(B, T, H, D)
        cache = LayerCache(torch.randn(B, S, 3, 2, Hkv, D), 1)  # layer 1 of 3: a strided slice, as in the cache
        kv = cache.view
        lens = torch.randint(0, S - off - T, (B,))
        lens[0] = 0
        tm = torch.rand(B, T, off + T) < 0.5
        tm[:, torch.arange(T), off + torch.arange(T)] = True  # every token sees itself
        got = tree_attention(q, cache, span(lens, tm), None)
        err = (got - reference(q, kv, lens, tm)).abs().max().item()
        assert err < 1e-5, (splits, B, T, H, Hkv, D, err)
        if T > 1:  # the comparison sees the tree mask: the kernel handed an all-True tree differs
            wrong = tree_attention(q, cache, span(lens, torch.ones_like(tm)), None)
            assert (wrong - reference(q, kv, lens, tm)).abs().max().item() > 1e-3
    os.environ["ADARUN_ATTN_SPLITS"] = "1"  # whole engines in one pass: the split (the default, auto) is the same op,
    # checked above; with up to 8x the programs, which the interpreter runs in turn, it doubles this test's time

    from adaspec_worker.decode.layers import apply_rope
    from adaspec_worker.decode import rope_kernel
    from adaspec_worker.decode.rope_kernel import rope_qkv
    assert rope_kernel.available()
    for H, Hkv, D, R, att in [(6, 2, 64, 64, 1.0), (4, 4, 16, 8, 1.3)]:  # R < D: partial rotary; att: YaRN-like
        B, T = 2, 3
        x = torch.randn(B, T, (H + 2 * Hkv) * D)
        positions = torch.randint(0, 500, (B, T))
        inv = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos() * att, emb.sin() * att
        full = torch.randn(B + 1, 40, 3, 2, Hkv, D)  # a cache's rows [:B] (a view), layer 1 of 3
        cache, before = LayerCache(full[:B], 1), full.clone()
        slots = torch.tensor([[3, 7, 8], [30, 0, 39]])  # any slots, in any order
        q = rope_qkv(x, rope_kernel.Angles(positions, inv, att), cache, slots, H, Hkv, D)
        qr, kr, vr = x.split((H * D, Hkv * D, Hkv * D), -1)
        assert torch.allclose(q, apply_rope(qr.view(B, T, H, D), cos, sin), atol=1e-4)
        want = before.clone()  # the plain path's write: only those slots of that layer change
        LayerCache(want[:B], 1).write(slots, torch.stack((apply_rope(kr.view(B, T, Hkv, D), cos, sin),
                                                         vr.view(B, T, Hkv, D)), dim=2))
        assert torch.allclose(full, want, atol=1e-4) and not torch.equal(full, before)

    plain = load_target(sys.argv[1], dtype="float32", device="cpu").fuse(compile=False, kernel=False)
    fast = load_target(sys.argv[1], dtype="float32", device="cpu").fuse(compile=False, kernel=True)
    assert fast.kernel_attention and not plain.kernel_attention and fast.layers[0].self_attn.rope_kernel

    # compiled by inductor, the kernels' pass writes the cache in place: no buffer near a cache layer's size (a
    # functionalised copy of the cache the RoPE kernel writes would be one per layer), and the eager pass's result
    import math
    import re
    from torch._inductor.utils import run_and_get_code
    B, S = 2, 1000
    cache = fast.new_cache(B, S)
    cache.lens.copy_(torch.tensor([7, 30]))
    ids, pos, tree = torch.tensor([[3], [5]]), cache.lens[:, None].clone(), torch.ones(B, 1, 1, dtype=torch.int8)
    kv = cache.kv.clone()
    want = fast._body(ids, pos, kv, cache.lens, tree, 0)[0]
    with torch.inference_mode():
        got, codes = run_and_get_code(torch.compile(fast._body, dynamic=False), ids, pos, cache.kv, cache.lens, tree, 0)
    sizes = re.findall(r"empty_strided_cpu\\(\\(([0-9, ]*)\\)", "\\n".join(codes))
    biggest = max(math.prod(int(n) for n in size.split(",") if n.strip()) for size in sizes)
    assert biggest < B * S * 2 * fast.cfg.num_kv_heads * fast.cfg.head_dim // 8, biggest
    assert torch.allclose(got[0], want, atol=1e-5) and torch.allclose(cache.kv, kv, atol=1e-5) and kv.any()
    torch._dynamo.reset()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9], [7]]
    for method in ("none", "eagle2"):
        spec = parse_spec(method, {"depth": 3, "total_tokens": 8} if method == "eagle2" else {})
        for temperature in (0.0, 0.8):
            s = SamplingParams(max_new_tokens=12, temperature=temperature)
            runs = []
            for m in (plain, fast):
                drafter = load_drafter(m, spec, sys.argv[2])
                if drafter is not None and m is fast:  # the head's attention through the kernel too
                    drafter.fuse(compile=False)
                    assert drafter.kernel_attention
                engine = build_engine(m, spec, draft=drafter)
                chunk = 3 if m is fast else 0  # the kernel's refills in chunks of 3 positions (prefill.py)
                runs.append(engine.generate(prompts, s, seeds=[1, 2, 3, 4], slots=2, prefill_chunk=chunk)[0])
            a, b = ([c.tokens for c in run] for run in runs)
            assert a == b, (method, temperature, a, b)
    print("ok")
''')


def test_kernel_equals_dense_attention(tmp_path):
    from tests import tiny

    tiny.save(tiny.hf_model("llama", vocab=64, hidden=64, layers=2, seed=1), tmp_path / "target")  # head_dim 16
    tiny.random_eagle_head(tmp_path / "target", tmp_path / "head", seed=3)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "target"), str(tmp_path / "head")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
