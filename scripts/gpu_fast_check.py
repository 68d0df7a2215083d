"""GPU check of the fast path: the fused, compiled, graph-replayed engine against the plain eager engine.

For a few methods at batch 1 and 4 (greedy), decodes the same prompts with both and reports how many
rows are token-identical and the mean common prefix (bf16: a near-tie may flip one token), plus the
fast engine's warm-up (compile + capture) seconds. Writes fast_check.json under --out; prints one line
per method.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    from transformers import AutoTokenizer

    from adaspec_worker.bench import BenchConfig, load_prompts
    from adaspec_worker.decode.build import build_engine
    from adaspec_worker.decode.model import load_target
    from adaspec_worker.decode.sampling import SamplingParams
    from jobs.specs import parse_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--methods", default="none,eagle:k=4,eagle2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="float32: a mismatch is a bug; bf16 near-ties flip tokens")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from adaspec_worker.bench import parse_method

    prompts = load_prompts(BenchConfig(target=a.target, prompts=a.prompts, batch_sizes=(4,), n_prompts=4),
                           AutoTokenizer.from_pretrained(a.target))
    plain_target = load_target(a.target, a.dtype)  # never fused: the reference path
    fast_target = load_target(a.target, a.dtype)
    sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
    rows = []
    for label in a.methods.split(","):
        name, params, _ = parse_method(label)
        spec = parse_spec(name, params)
        ref_engine = build_engine(plain_target, spec, draft=a.draft, fast=False)
        fast_engine = build_engine(fast_target, spec, draft=a.draft, fast=True)
        for B in [int(b) for b in a.batches.split(",")]:
            ref, fast = [], []
            t0 = time.perf_counter()
            warm = 0.0
            for i in range(0, 4, B):
                ref += [c.tokens for c in ref_engine.generate(prompts[i:i + B], sp)[0]]
                outs, stats = fast_engine.generate(prompts[i:i + B], sp)
                fast += [c.tokens for c in outs]
                warm += stats.warmup_seconds
            torch.cuda.synchronize()
            row = {"method": label, "batch": B, "identical": sum(x == y for x, y in zip(ref, fast)), "rows": len(ref),
                   "mean_common_prefix": sum(common_prefix(x, y) for x, y in zip(ref, fast)) / len(ref),
                   "warmup_seconds": warm, "wall_seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fast_check.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
