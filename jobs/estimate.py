"""What `adarun submit --dry-run` estimates: completion tokens, GPU hours and dollars, and how.

Tokens come from the manifest and the plan: input rows x `decoding.n` x `decoding.max_new_tokens`
(an upper bound: rows stop early at EOS or a stop string; per-row `n`/`max_new_tokens` columns are not
read). Time comes from a measurement, never a guess: the busy tokens/s per worker of an earlier run
(`--calibration OUTPUT`, or the shards this output already holds) and its completion tokens per row
(capped by `max_new_tokens`); start-up per worker from that run's `_job_run.json`. Without
a measurement only the tokens are estimated. Torch-free.
"""

from __future__ import annotations

from .layout import ShardFiles
from .manifest_schema import Manifest
from .shard_stats import total
from .storage import Store


def _measured(files: ShardFiles) -> dict | None:
    """Busy tokens/s per worker, tokens per row and start-up seconds per worker of a run, or None."""
    stats = files.committed_stats()
    t = total(stats)
    busy = sum(s.wall_seconds for s in stats)
    if not stats or not busy or not t.rows:
        return None
    actors = files.run().actors
    startup = [(a.get("ready_at") or 0) - (a.get("created_at") or 0) for a in actors if a.get("ready_at")]
    return {
        "tokens_per_second_per_worker": t.completion_tokens / busy,
        "completion_tokens_per_row": t.completion_tokens / t.rows,
        "startup_seconds_per_worker": sum(startup) / len(startup) if startup else 0.0,
        "source": files.store.path(""),
    }


def estimate(m: Manifest, plan, files: ShardFiles | None = None, calibration: str | None = None) -> dict:
    rows = sum(s.rows for s in plan.shards)
    samples = rows * m.decoding.n
    bound = samples * m.decoding.max_new_tokens
    out = {
        "input_rows": rows,
        "samples": samples,
        "completion_tokens_upper_bound": bound,
        "how": "completion tokens <= input rows x decoding.n x decoding.max_new_tokens (rows may stop early)",
    }
    meas = None
    if calibration:
        meas = _measured(ShardFiles(Store(calibration, m.output.storage_options)))
    elif files is not None and files.committed():
        meas = _measured(files)
    if meas is None:
        out["how"] += "; no time or cost estimate without a measured run (pass --calibration OUTPUT)"
        return out
    res, cost = m.resources, m.cost
    tokens = samples * min(meas["completion_tokens_per_row"], m.decoding.max_new_tokens)
    busy_s = tokens / meas["tokens_per_second_per_worker"]  # summed over workers
    wall_s = busy_s / res.workers + meas["startup_seconds_per_worker"]
    gpu_h = wall_s * res.workers * res.gpus_per_worker / 3600
    cpu_h = wall_s * res.workers * res.cpus_per_worker / 3600
    out.update(
        completion_tokens_estimate=round(tokens),
        wall_seconds_estimate=wall_s,
        gpu_hours_estimate=gpu_h,
        cpu_hours_estimate=cpu_h,
        usd_estimate=gpu_h * cost.gpu_hour_usd + cpu_h * cost.cpu_hour_usd,
        calibration=meas,
    )
    out["how"] = (
        f"tokens = input rows x n x the completion tokens per row measured in {meas['source']} (capped by "
        f"max_new_tokens); time = tokens / its busy tokens/s per worker "
        f"({meas['tokens_per_second_per_worker']:.1f}) / resources.workers, plus its start-up per worker; "
        "GPU hours = that wall time x workers x gpus_per_worker (the reserved basis); dollars at cost.*"
    )
    return out
