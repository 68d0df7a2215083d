"""Where each method's peak device memory goes, as `adarun bench` measures it (fixed workload, one batch):
allocated after the engine is built, after its warm-up (workspace, caches, captured graphs' outputs), at the peak
of a generate() call and after it; the allocations live at that peak and those still live at the end, grouped by the
first adaspec_worker frame that made them (torch.cuda.memory's history, Python stacks).

    ADARUN_GIT_COMMIT=$(cat .kit/commit) python3 scripts/gpu_memory_phases.py --target .kit/pycoder-22m \
        --draft heads/pycoder-22m-eagle --prompts .kit/code-prompts.parquet --batch 16 \
        --methods none,eagle2:depth=4:total_tokens=30 --out $OUT/mem.json

On CPU (a dry run of the script itself) the memory figures are absent.
"""
import argparse
import collections
import gc
import json
import os
import sys

import torch

from adaspec_worker.bench import BenchConfig, load_prompts, method_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.warmup import warm

MiB = 2**20


def where(frames) -> str:
    """The first frame in this repository's code (the innermost), else the innermost frame."""
    for f in frames or []:
        if "adaspec_worker" in f.get("filename", ""):
            return f"{f['filename'].split('adaspec_worker/')[-1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']}" if frames else "?"


def top(groups: dict, n: int = 10) -> list:
    return [[k, round(v / MiB, 2)] for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:n]]


def analyse(snap: dict, since: int) -> dict:
    """Live allocations at the trace's peak (of those made after event `since`) and the active blocks at the end."""
    trace = snap["device_traces"][0] if snap["device_traces"] else []
    live, cur, best, best_i = {}, 0, 0, -1
    for i, ev in enumerate(trace):
        a = ev["action"]
        if a == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
        elif a in ("free_requested", "free_completed") and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
        if i >= since and cur > best:
            best, best_i = cur, i
    at_peak, live = collections.Counter(), {}
    for i, ev in enumerate(trace[: best_i + 1]):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (i, ev)
        elif ev["action"] in ("free_requested", "free_completed"):
            live.pop(ev["addr"], None)
    for i, ev in live.values():
        if i >= since:
            at_peak[where(ev.get("frames"))] += ev["size"]
    end = collections.Counter()
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                end[where(blk.get("frames"))] += blk["size"]
    return {"made_in_generate_live_at_peak": top(at_peak), "active_at_end": top(end, 14)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--methods", default="none,eagle2:depth=4:total_tokens=30")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    from transformers import AutoTokenizer

    cfg = BenchConfig(target=a.target, draft=a.draft, prompts=a.prompts, batch_sizes=(a.batch,), n_prompts=a.batch,
                      device=a.device, dtype="auto" if cuda else "float32")
    prompts = load_prompts(cfg, AutoTokenizer.from_pretrained(a.target))[: a.batch]
    target = load_target(a.target, cfg.dtype, a.device)
    sampling = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
    mem = (lambda: torch.cuda.memory_allocated() / MiB) if cuda else (lambda: None)
    report = {"command": " ".join(sys.argv), "git_commit": os.environ.get("ADARUN_GIT_COMMIT", "unknown"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "methods": {}}
    for label in a.methods.split(","):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        row = {"before_engine": mem()}
        _, engine = method_engine(cfg, target, label)
        row["engine_built"] = mem()
        warm(engine, a.batch, sampling, max(map(len, prompts)))
        engine.generate(prompts, sampling, seeds=list(range(a.batch)))  # bench's untimed run
        gc.collect()
        row["warmed"] = mem()
        since = 0
        if cuda:
            since = len(torch.cuda.memory._snapshot()["device_traces"][0])
            torch.cuda.reset_peak_memory_stats()
        engine.generate(prompts, sampling, seeds=list(range(a.batch)))
        if cuda:
            row["peak"] = torch.cuda.max_memory_allocated() / MiB
            row["after"] = mem()
            row.update(analyse(torch.cuda.memory._snapshot(), since))
            torch.cuda.memory._record_memory_history(enabled=None)
        report["methods"][label] = row
        print(label, json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                                 if not isinstance(v, list)}))
        for k in ("made_in_generate_live_at_peak", "active_at_end"):
            for name, mib in row.get(k, []):
                print(f"   {k[:12]:12s} {mib:8.2f} MiB  {name[:110]}")
        del engine
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
