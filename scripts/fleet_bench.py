"""The fleet benchmark (issue #15): the same job with 1, 2 and 4 workers, then a fault run; JSON + Markdown.

    python scripts/fleet_bench.py --prompts code-prompts.parquet --target T --draft HEAD --workers 1,2,4 \\
        --seconds 200 --fault --out OUTDIR
    python scripts/fleet_bench.py --smoke --prompts P --target T --draft HEAD --out OUTDIR   # CPU, seconds

The job: the prompts repeated with distinct ids (so distinct seeds) to `--rows` rows, or, with `--rows 0`, to
as many rows as one worker decodes in about `--seconds` (sized from the warm-up job's measured rate). Every
run is a controller process of its own (`--controller`, which is `run_job`, what `adarun submit` runs) on one
Ray cluster (RAY_ADDRESS, or one this script starts), so a run's wall is what a user waits from submit.

Per run: completion tokens/s over the decode window (first shard started to last shard finished: start-up
excluded, the tail included) and over the whole submit; scaling efficiency of each = tokens/s(N) / (N x
tokens/s(1)); per actor its time to first commit from submit, split into controller start (imports,
preflight), Ray start, actor start (scheduling, process, imports), model load, warm-up (compile, graph
capture) and its first shard; the tail (first worker left with nothing to do -> last commit) and each
worker's idle tail; exactly once (every input id in exactly one committed shard's rows or error rows).
The fault run: the actor decoding shard k ends itself (ADARUN_CHAOS_KILL_SHARDS, as a crash), the controller
is SIGKILLed once 40% of the shards are committed, the same controller command resumes, exactly once checked.

The GPU machine has Ray from the device kit (`source .kit/device-kit/setup.sh`); this script assumes
`import ray` works. `--merge FILE` adds the runs of an earlier invocation (e.g. `--workers 1` in one call,
`--workers 2,4 --fault` in the next: one device call is at most 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.controller import plan_job  # noqa: E402
from jobs.layout import ShardFiles  # noqa: E402
from jobs.manifest import manifest_from_dict  # noqa: E402
from jobs.storage import Store  # noqa: E402

LOAD_PHASES = ("tokenizer", "model_load", "draft_load")


def build_prompts(src: str, dst: str, rows: int) -> list[str]:
    t = [r for r in pq.read_table(src, columns=["id", "prompt"]).to_pylist() if r["prompt"]]
    out, k = [], 0
    while len(out) < rows:
        out += [{"id": f"{r['id']}-r{k}", "prompt": r["prompt"]} for r in t[: rows - len(out)]]
        k += 1
    pq.write_table(pa.Table.from_pylist(out), dst)
    return [r["id"] for r in out]


def manifest(args, prompts: str, out: str, workers: int, rows_per_shard: int) -> dict:
    return {
        "name": f"fleet-{os.path.basename(out)}",
        "input": {"path": prompts},
        "output": {"path": out},
        "model": {"target": args.target, "draft": args.draft or None, "ldlp": args.ldlp or None,
                  "dtype": args.dtype, "device": args.device},
        "decoding": {"max_new_tokens": args.new_tokens, "temperature": args.temperature, "seed": 0},
        "speculative": {"method": args.method, "params": json.loads(args.params)},
        "resources": {"workers": workers, "gpus_per_worker": args.gpus_per_worker, "cpus_per_worker": 1,
                      "batch_size": args.batch_size, "shards_in_flight": args.shards_in_flight},
        "sharding": {"rows_per_shard": rows_per_shard, "tail_shards": args.tail_shards,
                     "min_rows_per_shard": min(args.min_rows_per_shard, rows_per_shard)},
        "retry": {"max_attempts": 3, "backoff_s": 0.5},
        "baseline": {"sample_fraction": 0.0},
    }  # fmt: skip


def controller(path: str) -> None:
    """One controller run (what `adarun submit` runs, without the CLI's packages): exit 0 done, 1 failed."""
    from adaspec_worker.worker import ShardWorker
    from jobs.controller import run_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(path) as f:
        run_job(manifest_from_dict(json.load(f)), ShardWorker)


def start_controller(work: str, m: dict, tag: str, env: dict) -> tuple[subprocess.Popen, float]:
    path = os.path.join(work, f"{tag}.json")
    with open(path, "w") as f:
        json.dump(m, f)
    log = open(os.path.join(work, f"{tag}.log"), "ab")
    cmd = [sys.executable, os.path.abspath(__file__), "--controller", path]
    t0 = time.time()
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True), t0


def committed_ids(out: str) -> list[str]:
    """Ids in committed shards only (rows and error rows): a shard without its marker does not exist."""
    ids = []
    for name in os.listdir(os.path.join(out, "_commits")):
        stem = name.removesuffix(".json")
        for d in ("shards", "errors"):
            p = os.path.join(out, d, f"{stem}.parquet")
            if os.path.exists(p):
                ids += pq.read_table(p, columns=["id"]).column("id").to_pylist()
    return ids


def exactly_once(out: str, ids: list[str]) -> dict:
    got = Counter(committed_ids(out))
    dup = sum(n - 1 for n in got.values() if n > 1)
    missing = len(set(ids) - set(got))
    return {"exactly_once": dup == 0 and missing == 0 and set(got) == set(ids), "duplicates": dup, "missing": missing}


def measure(out: str, t_submit: float, wall: float, workers: int, ids: list[str]) -> dict:
    files = ShardFiles(Store(out))
    stats, run = files.committed_stats(), files.run()
    entry = run.runs[-1]
    tokens = sum(s.completion_tokens for s in stats)
    window = max(s.finished_at for s in stats) - min(s.started_at for s in stats)
    by_actor: dict[str, list] = {}
    for s in stats:
        by_actor.setdefault(s.actor_id, []).append(s)
    gaps = 0.0
    for ss in by_actor.values():
        ss.sort(key=lambda s: s.started_at)
        gaps += sum(max(0.0, b.started_at - a.finished_at) for a, b in zip(ss, ss[1:]))
    actors = []
    for a in run.actors:
        if a.get("created_at", 0) < entry["started_at"] or not a.get("first_commit_at"):
            continue
        ph = a.get("phases") or {}
        actors.append({
            "host": a.get("host"), "accelerator": a.get("accelerator"), "shards": a.get("shards"),
            "first_commit_seconds": a["first_commit_at"] - t_submit,
            "controller_start_seconds": entry["started_at"] - t_submit - entry.get("ray_start_seconds", 0.0),
            "ray_start_seconds": entry.get("ray_start_seconds", 0.0),
            "actor_start_seconds": a.get("scheduling_seconds", 0.0) + ph.get("imports", 0.0),
            "model_load_seconds": sum(ph.get(k, 0.0) for k in LOAD_PHASES),
            "warmup_seconds": ph.get("warmup", 0.0),
            "first_shard_seconds": a["first_commit_at"] - a["ready_at"],
            "idle_tail_seconds": a.get("idle_tail_seconds"),
        })  # fmt: skip
    return {
        "workers": workers,
        "submit_wall_seconds": wall,
        "decode_window_seconds": window,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / window,
        "tokens_per_second_with_startup": tokens / wall,
        "first_commit_seconds": min((a["first_commit_seconds"] for a in actors), default=None),
        "actors": actors,
        "tail_seconds": entry.get("tail_seconds"),
        "device_gaps_between_shards_seconds": gaps,
        "shards": len(stats),
        "retries": len(run.retries),
        **exactly_once(out, ids),
    }


def scaling(runs: list[dict]) -> None:
    one = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        for key, rate in (("scaling_efficiency", "tokens_per_second"),
                          ("scaling_efficiency_with_startup", "tokens_per_second_with_startup")):  # fmt: skip
            r[key] = r[rate] / (r["workers"] * one[rate]) if one else None


def fault_run(args, prompts: str, ids: list[str], rps: int, env: dict) -> dict:
    out = os.path.join(args.work, "fault")
    m = manifest(args, prompts, out, args.fault_workers, rps)
    plan = plan_job(manifest_from_dict(m)).shards
    victim = plan[len(plan) // 5].index
    env = dict(env, ADARUN_CHAOS_KILL_SHARDS=str(victim))
    proc, t0 = start_controller(args.work, m, "fault-1", env)
    commits, killed, at_kill = os.path.join(out, "_commits"), False, 0
    while proc.poll() is None:
        at_kill = len(os.listdir(commits)) if os.path.isdir(commits) else 0
        if at_kill >= max(2, int(0.4 * len(plan))):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    resume, t1 = start_controller(args.work, m, "fault-2", env)  # the same command again: resume = rerun
    rc = resume.wait()
    run = ShardFiles(Store(out)).run().runs[-1] if rc == 0 else {}
    with open(os.path.join(commits, f"shard-{victim:05d}.json")) as f:
        attempt = json.load(f)["attempt"]
    return {
        "workers": args.fault_workers,
        "shards": len(plan),
        "killed_shard": victim,
        "killed_shard_attempt": attempt,
        "controller_killed": killed,
        "committed_before_controller_kill": at_kill,
        "resume_exit_code": rc,
        "resume_skipped": run.get("skipped"),
        "resume_committed": run.get("committed"),
        "wall_seconds": time.time() - t0,
        "resume_seconds": time.time() - t1,
        **exactly_once(out, ids),
    }


def run_one(args, prompts: str, ids: list[str], workers: int, rps: int, tag: str, env: dict) -> dict:
    out = os.path.join(args.work, tag)
    proc, t0 = start_controller(args.work, manifest(args, prompts, out, workers, rps), tag, env)
    if proc.wait() != 0:
        sys.exit(f"fleet_bench: the {tag} run failed; see {os.path.join(args.work, tag + '.log')}")
    return measure(out, t0, time.time() - t0, workers, ids)


def device(gpus: float) -> str:
    if gpus:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        names = q.stdout.strip().splitlines()
        return f"{len(names)} x {names[0]}" if names else "unknown GPU"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def commit() -> str:
    if os.environ.get("ADARUN_GIT_COMMIT"):
        return os.environ["ADARUN_GIT_COMMIT"]
    q = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    return q.stdout.strip() or "unknown"


def ray_address() -> str:
    """RAY_ADDRESS, or a cluster this process starts (and holds until it exits) for the controllers to join."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray.get_runtime_context().gcs_address


def markdown(res: dict) -> str:
    lines = [f"# adarun fleet benchmark ({res['device']})", "", f"`{res['command']}`, commit `{res['commit']}`, "
             f"{res['rows']} rows, {res['shards']} shards", "",
             "| workers | tok/s | scaling eff. | tok/s with start-up | eff. with start-up | first commit s "
             "| tail s | device gaps s | exactly once |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["runs"]:
        cells = [r["workers"], f"{r['tokens_per_second']:.0f}", f"{r['scaling_efficiency'] or 0:.3f}",
                 f"{r['tokens_per_second_with_startup']:.0f}", f"{r['scaling_efficiency_with_startup'] or 0:.3f}",
                 f"{r['first_commit_seconds']:.1f}", f"{r['tail_seconds'] or 0:.1f}",
                 f"{r['device_gaps_between_shards_seconds']:.2f}", r["exactly_once"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Start-up per actor (seconds from submit to its first commit, and its parts):", ""]
    for r in res["runs"]:
        for a in r["actors"]:
            parts = ", ".join(f"{k.removesuffix('_seconds')} {a[k]:.1f}" for k in a if k.endswith("_seconds")
                              and k not in ("first_commit_seconds", "idle_tail_seconds"))  # fmt: skip
            lines.append(f"- {r['workers']} workers, {a['host']}: first commit {a['first_commit_seconds']:.1f} "
                         f"({parts}); idle tail {a['idle_tail_seconds'] or 0:.1f}")  # fmt: skip
    if res.get("fault"):
        f = res["fault"]
        lines += ["", f"Fault run ({f['workers']} workers, {f['shards']} shards): the actor decoding shard "
                  f"{f['killed_shard']} ended (committed at attempt {f['killed_shard_attempt']}); controller "
                  f"SIGKILLed: {f['controller_killed']} after {f['committed_before_controller_kill']} commits; "
                  f"resume exit {f['resume_exit_code']}, skipped {f['resume_skipped']}, committed "
                  f"{f['resume_committed']}; exactly once: {f['exactly_once']} (duplicates {f['duplicates']}, "
                  f"missing {f['missing']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controller", help=argparse.SUPPRESS)
    ap.add_argument("--prompts")
    ap.add_argument("--rows", type=int, default=0, help="rows of the job; 0: sized by --seconds")
    ap.add_argument("--seconds", type=float, default=200, help="with --rows 0: one worker's decode time")
    ap.add_argument("--workers", default=None, help="worker counts (default 1,2,4; --smoke: 1,2)")
    ap.add_argument("--gpus-per-worker", type=float, default=1)
    ap.add_argument("--target")
    ap.add_argument("--draft", default="")
    ap.add_argument("--ldlp", default="")
    ap.add_argument("--method", default="eagle2")
    ap.add_argument("--params", default="{}", help="speculative.params as JSON")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows-per-shard", type=int, default=0, help="0: rows / 64 (16 shards per worker of 4)")
    ap.add_argument("--tail-shards", type=int, default=8, help="sharding.tail_shards (about twice the workers)")
    ap.add_argument("--min-rows-per-shard", type=int, default=0, help="0: --batch-size")
    ap.add_argument("--shards-in-flight", type=int, default=2)
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--fault-workers", type=int, default=0, help="0: the largest worker count")
    ap.add_argument("--no-warm", action="store_true", help="skip the unmeasured warm-up job (compile caches)")
    ap.add_argument("--merge", help="an earlier fleet_bench.json of the same job whose other runs to keep")
    ap.add_argument("--smoke", action="store_true", help="CPU workers, a tiny job: 1 and 2 workers and the fault run")
    ap.add_argument("--work", default="/tmp/adarun-fleet")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.smoke:
        args.workers, args.gpus_per_worker, args.dtype, args.device = args.workers or "1,2", 0, "float32", "cpu"
        args.rows, args.new_tokens, args.batch_size, args.fault, args.no_warm = args.rows or 24, 8, 4, True, True
        args.rows_per_shard, args.min_rows_per_shard = args.rows_per_shard or 4, 2
    args.tail_shards = 2 if args.smoke else args.tail_shards
    counts = [int(x) for x in (args.workers or "1,2,4").split(",")]
    args.worker_counts = counts
    args.min_rows_per_shard = args.min_rows_per_shard or args.batch_size
    args.fault_workers = args.fault_workers or max(counts)
    if not args.controller and not (args.prompts and args.target and args.out):
        ap.error("--prompts, --target and --out are required")
    return args


JOB_KEYS = ("rows", "rows_per_shard", "tail_shards", "min_rows_per_shard", "new_tokens", "batch_size",
            "shards_in_flight", "target", "draft", "method", "params", "temperature", "dtype")  # fmt: skip


def main(argv=None) -> None:
    import shutil

    args = parse(argv)
    if args.controller:
        return controller(args.controller)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, RAY_ADDRESS=ray_address(), PYTHONPATH=path)
    merged = {}
    if args.merge:
        with open(args.merge) as f:
            merged = json.load(f)
        args.rows = args.rows or merged["job"]["rows"]
        args.rows_per_shard = args.rows_per_shard or merged["job"]["rows_per_shard"]
    for tag in ["warm", "fault"] + [f"w{w}" for w in args.worker_counts]:
        shutil.rmtree(os.path.join(args.work, tag), ignore_errors=True)
    if not args.no_warm or not args.rows:  # compile caches filled, and the rate that sizes the job
        warm_prompts = os.path.join(args.work, "warm.parquet")
        warm_ids = build_prompts(args.prompts, warm_prompts, 8 * args.batch_size)
        warm = run_one(args, warm_prompts, warm_ids, 1, 4 * args.batch_size, "warm", env)
        print(json.dumps({"warm": {k: warm[k] for k in ("tokens_per_second", "submit_wall_seconds")}}), flush=True)
        if not args.rows:
            per_row = warm["completion_tokens"] / len(warm_ids)
            args.rows = max(int(args.seconds * warm["tokens_per_second"] / per_row), 8 * args.batch_size)
    by_batch = args.rows // 64 // args.batch_size * args.batch_size  # 16 shards per worker of 4, whole batches
    args.rows_per_shard = args.rows_per_shard or max(args.batch_size, by_batch)
    job = {k: getattr(args, k) for k in JOB_KEYS}
    if merged and merged["job"] != job:
        sys.exit(f"fleet_bench: --merge {args.merge} ran another job: {merged['job']} (this one: {job})")
    prompts = os.path.join(args.work, "prompts.parquet")
    ids = build_prompts(args.prompts, prompts, args.rows)
    runs = [r for r in merged.get("runs", []) if r["workers"] not in args.worker_counts]
    for w in args.worker_counts:
        runs.append(run_one(args, prompts, ids, w, args.rows_per_shard, f"w{w}", env))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "actors"}), flush=True)
    runs.sort(key=lambda r: r["workers"])
    scaling(runs)
    res = {
        "command": "python scripts/fleet_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit(),
        "device": device(args.gpus_per_worker),
        "job": job,
        "rows": args.rows,
        "shards": len(plan_job(manifest_from_dict(manifest(args, prompts, "/tmp/x", 1, args.rows_per_shard))).shards),
        "runs": runs,
        "scaling_efficiency": {str(r["workers"]): r["scaling_efficiency"] for r in runs},
        "exactly_once": all(r["exactly_once"] for r in runs),
        "fault": merged.get("fault"),
    }
    if args.fault:
        res["fault"] = fault_run(args, prompts, ids, args.rows_per_shard, env)
        print(json.dumps(res["fault"]), flush=True)
    res["exactly_once"] = res["exactly_once"] and (res["fault"] or {}).get("exactly_once", True)
    with open(os.path.join(args.out, "fleet_bench.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    with open(os.path.join(args.out, "fleet_bench.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
