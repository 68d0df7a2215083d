"""The Triton log-softmax + top-k kernel (the draft trees' top-k on CUDA) run by Triton's CPU interpreter: equal to
`torch.log_softmax(...).topk(...)` for float32 and bfloat16 logits, vocabularies that are and are not powers of two,
rows of -inf, k of 1 to 32, and tied logits (the smallest index first), rows in one program and vocabulary-sized rows
in chunks merged by a second kernel; the plain top-k of a float64 rerank key
equals `torch.topk`; and the check breaks when a row's values are read at the wrong stride. Runs in a subprocess:
the interpreter is chosen when Triton is imported."""
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
    from adaspec_worker.decode import topk_kernel
    assert topk_kernel.available()
    torch.manual_seed(0)
    op = lambda x, k: topk_kernel._topk_op(x, k, True)  # noqa: E731

    def check(x, k):
        values, indices = op(x, k)
        want = torch.log_softmax(x.float(), -1)
        ref = want.topk(k, dim=-1).values
        torch.testing.assert_close(values, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.gather(want, 1, indices), ref, rtol=1e-5, atol=1e-5)  # the values' ids
        return indices

    assert topk_kernel._chunks(8192) == (1024, 8) and topk_kernel._chunks(3000) == (1024, 4)
    assert topk_kernel._chunks(128256) == (4096, 32) and topk_kernel._chunks(2048) is None
    for split in (True, False):  # vocabulary-sized rows in chunks and merged, and in one program
        topk_kernel._SPLIT = split
        for R, V, k, dtype in [(5, 1000, 10, torch.float32), (3, 8192, 4, torch.bfloat16), (1, 64, 1, torch.float32),
                               (7, 300, 16, torch.bfloat16), (2, 3000, 32, torch.float32), (3, 8192, 10, torch.float32),
                               (2, 20000, 5, torch.bfloat16)]:
            check(torch.randn(R, V, dtype=dtype) * 4, k)

        for V in (50, 5000):  # ties within and across chunks; a row of -inf but for one entry in the last chunk
            x = torch.zeros(2, V)
            x[0, [V - 43, 3, V // 2]] = 5.0  # a three-way tie: the smallest index first
            x[1] = float("-inf")
            x[1, V - 9] = 0.0
            idx = check(x, 3)
            assert idx[0].tolist() == sorted([V - 43, 3, V // 2]), idx
            assert idx[1, 0].item() == V - 9, idx

        for C in (310, 4100):
            key = torch.randn(3, C, dtype=torch.float64)
            key[:, 5] = key[:, 6] - 1e-9  # the rerank's depth tie-break survives: float64 all the way
            values, indices = topk_kernel._topk_op(key, 30, False)
            assert values.dtype == torch.float64
            assert torch.equal(values, key.topk(30).values) and torch.equal(indices, key.topk(30).indices)
    topk_kernel._SPLIT = True

    empty = op(torch.randn(0, 40), 3)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)

    wide = torch.randn(4, 2 * 500)
    values, _ = op(wide[:, :500], 5)  # a strided view: rows 1000 apart
    torch.testing.assert_close(values, torch.log_softmax(wide[:, :500], -1).topk(5).values, rtol=1e-5, atol=1e-5)
    if len(sys.argv) == 2:  # the broken kernel: rows read 500 apart, as if the view were contiguous
        bad = topk_kernel._KERNEL
        out_v, out_i = torch.empty(4, 5), torch.empty(4, 5, dtype=torch.long)
        bad[(4,)](wide, out_v, out_i, 500, 500, K=5, BLOCK=512, LOG_SOFTMAX=True)
        torch.testing.assert_close(out_v, torch.log_softmax(wide[:, :500], -1).topk(5).values, rtol=1e-5, atol=1e-5)
    if len(sys.argv) > 2:  # whole engine runs: the kernel in the trees against the plain ops
        from adaspec_worker.decode.build import build_engine, load_drafter
        from adaspec_worker.decode.model import load_target
        from adaspec_worker.decode.sampling import SamplingParams
        from jobs.specs import parse_spec
        prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
        eagle2, opt_tree = {"top_k": 3, "depth": 3, "total_tokens": 8}, {"n": 3, "max_depth": 4}
        for method, params in [("eagle2", eagle2), ("opt-tree", opt_tree)]:
            for temperature in (0.0, 0.8):
                runs = []
                for kernel in (False, True):
                    target = load_target(sys.argv[1], dtype="float32", device="cpu")
                    spec = parse_spec(method, params)
                    engine = build_engine(target, spec, draft=load_drafter(target, spec, sys.argv[2]))
                    calls = []
                    fits = topk_kernel._fits
                    topk_kernel._fits = lambda x, k: calls.append(k) or (kernel and fits(x, k))
                    sp = SamplingParams(max_new_tokens=10, temperature=temperature)
                    runs.append([c.tokens for c in engine.generate(prompts, sp, seeds=[1, 2, 3], slots=3)[0]])
                    topk_kernel._fits = fits
                    assert calls, "the trees asked for no top-k"
                assert runs[0] == runs[1], (method, temperature, runs)
    print("ok")
''')


def _run(*args):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def test_kernel_equals_plain_log_softmax_topk():
    done = _run()
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_check_sees_a_wrong_stride():
    done = _run("broken")
    assert done.returncode != 0 and "Mismatched elements" in done.stderr, done.stderr[-3000:]


def test_engine_with_the_kernel_decodes_the_same_tokens(tmp_path):
    """`eagle2` and `opt-tree`, greedy and T=0.8: the same tokens with the kernel as without (the kernel inside
    compiled rounds runs in every GPU bench cell: a CPU inductor compile of it here cost 80 s of CI)."""
    from tests import tiny

    tiny.save(tiny.hf_model("llama", vocab=64, hidden=64, layers=2, seed=1), tmp_path / "target")
    tiny.random_eagle_head(tmp_path / "target", tmp_path / "head", seed=3)
    done = _run(str(tmp_path / "target"), str(tmp_path / "head"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
