"""The controller: plan a job, record it, and drive Ray actors through the shards that are not committed.

Exactly once: a shard exists only when its commit marker does, so a rerun (or `adarun resume`)
plans the same shards, skips the committed ones and decodes the rest; a shard that was in flight
when a controller or actor died is simply decoded again (per-row seeds make it reproduce).

Dispatch is dynamic: each actor holds one shard at a time and gets the next as soon as it is done,
so a slow shard never idles the others. A dead actor's shard goes back on the queue (up to
`retry.max_attempts` attempts, after `retry.backoff_s`-based exponential backoff) and the actor is
replaced. When a shard exhausts its attempts the other shards still finish, then the job fails.

The controller never imports torch: workers are created from `adaspec_worker.worker.ShardWorker`,
whose module imports torch only inside the actor.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from . import __version__

from .manifest import Manifest
from .plan import Shard, input_storage_options, make_plan
from .storage import Store, shard_name


class JobConflict(ValueError):
    """The output holds another job's shards (exit 2 unless --force)."""


class JobFailed(RuntimeError):
    """Some shards exhausted their attempts (exit 1)."""


@dataclass
class JobState:
    plan: list[Shard]
    skipped: int = 0  # committed before this run started
    committed: int = 0  # committed by this run
    rows: int = 0
    error_rows: int = 0
    completion_tokens: int = 0
    retries: list[dict] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    first_commit_s: float | None = None


def job_hash(m: Manifest, plan: list[Shard]) -> str:
    body = json.dumps({"config": m.config_hash(), "plan": [s.to_dict() for s in plan]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def prepare(m: Manifest, force: bool = False) -> tuple[Store, list[Shard], dict]:
    """Plan the job and write job.json; refuse an output that holds a different job's shards."""
    store = Store(m.output.path, m.output.storage_options, m.retry.backoff_s)
    plan = make_plan(m.input, m.sharding.rows_per_shard, input_storage_options(m.input.path, m.output.path, m.output.storage_options))
    h = job_hash(m, plan)
    doc = {"adarun_version": __version__, "name": m.name, "job_hash": h, "config_hash": m.config_hash(),
           "manifest": m.to_dict(), "plan": [s.to_dict() for s in plan], "created_at": time.time()}
    old = store.read_json("job.json") if store.exists("job.json") else None
    if (old is None or old.get("job_hash") != h) and store.has_shard_files():
        if not force:
            what = f"job {old.get('name')!r} ({old.get('job_hash')})" if old else "shards of an unknown job"
            raise JobConflict(f"output.path: {m.output.path} holds {what} with a different config or input; "
                              "use another output, `adarun resume`, or --force to discard it")
        store.clear_job()
    if old and old.get("job_hash") == h:
        doc["created_at"] = old.get("created_at", doc["created_at"])
    store.write_json("job.json", doc)
    return store, plan, doc


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=addr, include_dashboard=False, log_to_driver=bool(os.environ.get("ADARUN_RAY_LOGS")),
             configure_logging=False, ignore_reinit_error=True)


def worker_env() -> dict:
    """ADARUN_* variables travel to the actors (e.g. the storage fault drill)."""
    return {k: v for k, v in os.environ.items() if k.startswith("ADARUN_")}


Listener = Callable[[str, dict], None]


def run_job(m: Manifest, force: bool = False, listener: Listener | None = None) -> JobState:
    """Run (or resume) a job to the end. `listener(event, data)` sees 'start', 'dispatch', 'commit', 'retry', 'fail'."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from adaspec_worker.worker import ShardWorker

    emit = listener or (lambda e, d: None)
    store, plan, doc = prepare(m, force)
    done = store.committed()
    state = JobState(plan=plan, skipped=sum(1 for s in plan if s.index in done))
    pending = [s for s in plan if s.index not in done]
    emit("start", {"plan": len(plan), "pending": len(pending), "skipped": state.skipped})
    if not pending:
        return state
    connect_ray(m.cluster.address)
    res = m.resources
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0, max_concurrency=1,
        scheduling_strategy="SPREAD", runtime_env={"env_vars": worker_env()} if worker_env() else None)
    manifest = m.to_dict()

    def new_actor():
        return actor_cls.remote(manifest, m.output.path)

    idle = deque(new_actor() for _ in range(min(res.workers, len(pending))))
    queue: deque[tuple[float, Shard, int]] = deque((0.0, s, 1) for s in pending)
    inflight: dict = {}
    while queue or inflight:
        now = time.time()
        while idle and queue and queue[0][0] <= now:
            _, shard, attempt = queue.popleft()
            actor = idle.popleft()
            inflight[actor.run_shard.remote(shard.to_dict(), attempt)] = (actor, shard, attempt, time.time())
            emit("dispatch", {"shard": shard.index, "attempt": attempt, "actor": actor})
        if not inflight:  # everything queued is backing off
            time.sleep(max(0.0, min(q[0] for q in queue) - time.time()))
            continue
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
        for ref in ready:
            actor, shard, attempt, t_dispatch = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                dead = isinstance(e, RayActorError)
                cause = _one_line(e)
                if dead:
                    ray.kill(actor, no_restart=True)
                    idle.append(new_actor())
                else:
                    idle.append(actor)
                if attempt < m.retry.max_attempts:
                    delay = m.retry.backoff_s * 2 ** (attempt - 1)
                    queue.append((time.time() + delay, shard, attempt + 1))
                    state.retries.append({"shard": shard.index, "attempt": attempt, "actor_died": dead, "cause": cause,
                                          "seconds": time.time() - t_dispatch})
                    emit("retry", {"shard": shard.index, "attempt": attempt, "cause": cause, "actor_died": dead})
                else:
                    state.retries.append({"shard": shard.index, "attempt": attempt, "actor_died": dead, "cause": cause,
                                          "seconds": time.time() - t_dispatch, "final": True})
                    state.failed[shard.index] = cause
                    emit("fail", {"shard": shard.index, "cause": cause})
                continue
            idle.append(actor)
            state.committed += 1
            state.rows += out["rows"]
            state.error_rows += out["error_rows"]
            state.completion_tokens += out["completion_tokens"]
            if state.first_commit_s is None:
                state.first_commit_s = time.time() - state.started
            emit("commit", out)
    for a in idle:
        ray.kill(a, no_restart=True)
    old = store.read_json("_job_run.json") if store.exists("_job_run.json") else {}
    old_runs = old.get("runs", [])
    store.write_json("_job_run.json", {"runs": old_runs + [{"started_at": state.started, "finished_at": time.time(),
                                                           "committed": state.committed, "skipped": state.skipped}],
                                        "finished_at": time.time(), "started_at": state.started,
                                        "retries": old.get("retries", []) + state.retries,
                                        "failed": {shard_name(k): v for k, v in state.failed.items()},
                                        "first_commit_seconds": state.first_commit_s})
    if state.failed:
        names = ", ".join(f"{shard_name(k)} ({v})" for k, v in sorted(state.failed.items()))
        raise JobFailed(f"{len(state.failed)} shard(s) failed after {m.retry.max_attempts} attempts: {names}")
    return state


def _one_line(e: BaseException) -> str:
    """The root cause of a Ray error in one line."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    last = [ln for ln in text if ln.strip()][-1:] or [type(cause).__name__]
    return f"{type(cause).__name__}: {last[0].strip()}"[:300]
