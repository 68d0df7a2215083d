"""Multi-GPU scaling and fault run for `adarun submit` (one actor per GPU), results as JSON + Markdown.

    python scripts/multi_gpu.py --prompts code-prompts.parquet --workers 1,2,4 --fault --out OUTDIR

Builds a job of >= 2,000 rows by repeating the prompts with distinct ids, runs the same job with each
worker count (one GPU per worker, fresh output each), and measures completion tokens/s, scaling
efficiency = throughput(N) / (N x throughput(1)), time from submit to the first committed shard, and
the controller overhead (time actors sat idle between shards, from the shard stats). The fault run
kills one worker actor from a side thread after the first commit and checks every row exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from adaspec_worker.worker import ShardWorker
from jobs.controller import run_job
from jobs.layout import ShardFiles
from jobs.manifest import manifest_from_dict
from jobs.report import load_run, summarize
from jobs.storage import Store


def build_prompts(src: str, dst: str, rows: int) -> list[str]:
    t = pq.read_table(src).to_pylist()
    out, k = [], 0
    while len(out) < rows:
        out += [{"id": f"{r['id']}-r{k}", "prompt": r["prompt"]} for r in t]
        k += 1
    pq.write_table(pa.Table.from_pylist(out), dst)
    return [r["id"] for r in out]


def job(prompts: str, out: str, workers: int, gpus: float, args) -> dict:
    return {
        "name": f"scale-{workers}",
        "input": {"path": prompts},
        "output": {"path": out},
        "model": {"target": args.target, "draft": args.draft, "ldlp": args.ldlp, "dtype": args.dtype, "device": "auto"},
        "decoding": {"max_new_tokens": args.new_tokens, "seed": 0},
        "speculative": {"method": args.method, "params": {}},
        "resources": {"workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": 1, "batch_size": args.batch_size},
        "sharding": {"rows_per_shard": args.rows_per_shard},
        "retry": {"max_attempts": 3, "backoff_s": 0.5},
        "baseline": {"sample_fraction": 0.0},
    }


def idle_between_shards(stats: list) -> float:
    """Seconds actors sat between finishing one shard and starting the next (controller overhead)."""
    by = {}
    for s in stats:
        by.setdefault(s.actor_id, []).append(s)
    idle = 0.0
    for ss in by.values():
        ss.sort(key=lambda s: s.started_at)
        idle += sum(max(0.0, b.started_at - a.finished_at) for a, b in zip(ss, ss[1:]))
    return idle


def output_ids(out: str) -> list[str]:
    ok = pq.read_table(os.path.join(out, "shards")).column("id").to_pylist()
    err = (
        pq.read_table(os.path.join(out, "errors")).column("id").to_pylist()
        if os.path.isdir(os.path.join(out, "errors"))
        else []
    )
    return ok + err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--gpus-per-worker", type=float, default=1)
    ap.add_argument("--target", default="models/pycoder-tiny")
    ap.add_argument("--draft", default="models/pycoder-tiny-eagle")
    ap.add_argument("--ldlp", default="models/pycoder-tiny-ldlp")
    ap.add_argument("--method", default="ldlp-tree")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--work", default="/tmp/adarun-mg")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    prompts = os.path.join(args.work, "prompts.parquet")
    ids = build_prompts(args.prompts, prompts, args.rows)
    gpus = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()
        if args.gpus_per_worker
        else []
    )
    results = {
        "command": "python scripts/multi_gpu.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "git_commit": os.environ.get("ADARUN_GIT_COMMIT", "unknown"),
        "gpus": gpus,
        "rows": len(ids),
        "runs": [],
    }
    base = None
    for w in [int(x) for x in args.workers.split(",")]:
        out = os.path.join(args.work, f"w{w}")
        t0 = time.time()
        state = run_job(manifest_from_dict(job(prompts, out, w, args.gpus_per_worker, args)), ShardWorker)
        wall = time.time() - t0
        run = load_run(ShardFiles(Store(out)))
        rep = summarize(run)
        got = output_ids(out)
        r = {
            "workers": w,
            "submit_wall_seconds": wall,
            "first_commit_seconds": state.first_commit_s,
            "job_seconds": rep["wall_seconds"],
            "completion_tokens": rep["completion_tokens"],
            "tokens_per_second": rep["completion_tokens_per_second"],
            "tau": rep["tau"],
            "controller_idle_seconds": idle_between_shards(run.stats),
            "idle_tail_seconds": rep["idle_tail_seconds"],
            "shards": len(run.stats),
            "nodes": len({s.node_id for s in run.stats}),
            "accelerators": rep["accelerators"],
            "exactly_once": sorted(got) == sorted(ids),
        }
        base = base or r["tokens_per_second"] / w
        r["scaling_efficiency"] = r["tokens_per_second"] / (w * base)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
    if args.fault:
        import ray

        out = os.path.join(args.work, "fault")
        actors, killed = [], {}
        first = threading.Event()

        def listener(event, d):
            if event == "dispatch":
                actors.append((d["shard"], d["actor"]))
            if event == "commit":
                first.set()

        def killer():
            first.wait()
            shard, actor = actors[-1]  # the actor just handed a new shard
            killed["shard"] = shard
            ray.kill(actor, no_restart=True)

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        t0 = time.time()
        state = run_job(
            manifest_from_dict(job(prompts, out, 2, args.gpus_per_worker, args)), ShardWorker, listener=listener
        )
        got = output_ids(out)
        f = {
            "workers": 2,
            "killed_during_shard": killed.get("shard"),
            "retries": state.retries,
            "rows_out": len(got),
            "rows_in": len(ids),
            "unique_rows_out": len(set(got)),
            "exactly_once": sorted(got) == sorted(ids),
            "wall_seconds": time.time() - t0,
        }
        results["fault"] = f
        print(json.dumps(f, default=str), flush=True)
    with open(os.path.join(args.out, "multi_gpu.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    lines = [
        f"# adarun multi-GPU run ({', '.join(gpus) or 'CPU'})",
        "",
        f"`{results['command']}`, commit `{results['git_commit']}`, {len(ids)} rows",
        "",
        "| workers | tok/s | scaling efficiency | submit->first commit s | job s | controller idle s | idle tail s "
        "| tau | exactly once |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        cols = [f"{r['workers']}", f"{r['tokens_per_second']:.0f}", f"{r['scaling_efficiency']:.3f}",
                f"{r['first_commit_seconds']:.1f}", f"{r['job_seconds']:.1f}", f"{r['controller_idle_seconds']:.2f}",
                f"{r['idle_tail_seconds']:.1f}", f"{r['tau']:.2f}", f"{r['exactly_once']}"]
        lines.append("| " + " | ".join(cols) + " |")
    if "fault" in results:
        f = results["fault"]
        lines += [
            "",
            f"Fault run (2 workers): killed the actor running shard {f['killed_during_shard']}; retries: "
            f"{[(r['shard'], r['cause'][:60]) for r in f['retries']]}; rows out {f['rows_out']} / in {f['rows_in']}, "
            f"unique {f['unique_rows_out']}; exactly once: {f['exactly_once']}.",
        ]
    with open(os.path.join(args.out, "multi_gpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
