"""The controller: plan a job, record it, and drive Ray actors through the shards that are not committed.

Exactly once: a shard exists only when its commit marker does (`jobs.layout`), so a rerun (or
`adarun resume`) plans the same shards, skips the committed ones and decodes the rest; a shard that
was in flight when a controller or actor died is simply decoded again (per-row seeds make it reproduce).

Dispatch is dynamic: each actor holds one shard at a time and gets the next as soon as it is done,
so a slow shard never idles the others. A failed shard goes back on the queue (up to
`retry.max_attempts` attempts, after `retry.backoff_s`-based exponential backoff); a dead actor is
replaced. When a shard exhausts its attempts the other shards still finish, then the job fails.

The controller never imports torch or the decoder: the caller hands it the worker class (the CLI
passes `adaspec_worker.worker.ShardWorker`, whose module imports torch only inside the actor).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .layout import ShardFiles, shard_name
from .manifest import Manifest
from .plan import Shard, input_storage_options, make_plan
from .storage import Store


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


@dataclass(frozen=True)
class Plan:
    """The shards of a job and the hash that identifies job + input layout (what --dry-run prints)."""

    shards: list[Shard]
    job_hash: str

    def describe(self, m: Manifest) -> dict:
        return {
            "name": m.name,
            "job_hash": self.job_hash,
            "config_hash": m.config_hash(),
            "rows": sum(s.rows for s in self.shards),
            "shards": [s.to_dict() for s in self.shards],
        }


def plan_job(m: Manifest) -> Plan:
    shards = make_plan(
        m.input, m.sharding.rows_per_shard, input_storage_options(m.input.path, m.output.path, m.output.storage_options)
    )
    body = json.dumps({"config": m.config_hash(), "plan": [s.to_dict() for s in shards]}, sort_keys=True)
    return Plan(shards, hashlib.sha256(body.encode()).hexdigest()[:16])


def open_output(m: Manifest) -> ShardFiles:
    return ShardFiles(Store(m.output.path, m.output.storage_options, m.retry.backoff_s))


def prepare(m: Manifest, force: bool = False) -> tuple[ShardFiles, Plan]:
    """Plan the job and write job.json; refuse an output that holds a different job's shards."""
    files = open_output(m)
    plan = plan_job(m)
    doc = {
        "adarun_version": __version__,
        "name": m.name,
        "job_hash": plan.job_hash,
        "config_hash": m.config_hash(),
        "manifest": m.to_dict(),
        "plan": [s.to_dict() for s in plan.shards],
        "created_at": time.time(),
    }
    old = files.job()
    if (old is None or old.get("job_hash") != plan.job_hash) and files.has_any():
        if not force:
            what = f"job {old.get('name')!r} ({old.get('job_hash')})" if old else "shards of an unknown job"
            raise JobConflict(
                f"output.path: {m.output.path} holds {what} with a different config or input; "
                "use another output, `adarun resume`, or --force to discard it"
            )
        files.clear()
    if old and old.get("job_hash") == plan.job_hash:
        doc["created_at"] = old.get("created_at", doc["created_at"])
    files.write_job(doc)
    return files, plan


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=addr,
        include_dashboard=False,
        log_to_driver=bool(os.environ.get("ADARUN_RAY_LOGS")),
        configure_logging=False,
        ignore_reinit_error=True,
    )


def worker_env() -> dict:
    """ADARUN_* variables travel to the actors (e.g. the storage fault drill)."""
    return {k: v for k, v in os.environ.items() if k.startswith("ADARUN_")}


Listener = Callable[[str, dict], None]


class Dispatcher:
    """A pool of actors pulling shards from a queue; failed shards are retried with backoff."""

    def __init__(self, m: Manifest, worker_cls: type, state: JobState, emit: Listener):
        import ray

        res = m.resources
        env = worker_env()
        self.actor_cls = ray.remote(worker_cls).options(
            num_cpus=res.cpus_per_worker,
            num_gpus=res.gpus_per_worker,
            max_restarts=0,
            max_concurrency=1,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": env} if env else None,
        )
        self.m, self.state, self.emit = m, state, emit
        self.manifest = m.to_dict()
        self.idle: deque = deque()
        self.queue: deque[tuple[float, Shard, int]] = deque()  # (not before, shard, attempt)
        self.inflight: dict[Any, tuple[Any, Shard, int, float]] = {}  # ref -> (actor, shard, attempt, dispatched at)

    def new_actor(self):
        return self.actor_cls.remote(self.manifest, self.m.output.path)

    def run(self, pending: list[Shard]) -> None:
        import ray

        self.idle.extend(self.new_actor() for _ in range(min(self.m.resources.workers, len(pending))))
        self.queue.extend((0.0, s, 1) for s in pending)
        while self.queue or self.inflight:
            self._dispatch()
            if not self.inflight:  # everything queued is backing off
                time.sleep(max(0.0, min(q[0] for q in self.queue) - time.time()))
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                self._collect(ref)
        for a in self.idle:
            ray.kill(a, no_restart=True)

    def _dispatch(self) -> None:
        now = time.time()
        while self.idle and self.queue and self.queue[0][0] <= now:
            _, shard, attempt = self.queue.popleft()
            actor = self.idle.popleft()
            self.inflight[actor.run_shard.remote(shard.to_dict(), attempt)] = (actor, shard, attempt, time.time())
            self.emit("dispatch", {"shard": shard.index, "attempt": attempt, "actor": actor})

    def _collect(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        actor, shard, attempt, t_dispatch = self.inflight.pop(ref)
        try:
            out = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            self._failed(actor, shard, attempt, t_dispatch, e, dead=isinstance(e, RayActorError))
            return
        self.idle.append(actor)
        st = self.state
        st.committed += 1
        st.rows += out["rows"]
        st.error_rows += out["error_rows"]
        st.completion_tokens += out["completion_tokens"]
        if st.first_commit_s is None:
            st.first_commit_s = time.time() - st.started
        self.emit("commit", out)

    def _failed(self, actor, shard: Shard, attempt: int, t_dispatch: float, e: BaseException, dead: bool) -> None:
        import ray

        cause = _one_line(e)
        if dead:
            ray.kill(actor, no_restart=True)
            self.idle.append(self.new_actor())
        else:
            self.idle.append(actor)
        record = {
            "shard": shard.index,
            "attempt": attempt,
            "actor_died": dead,
            "cause": cause,
            "seconds": time.time() - t_dispatch,
        }
        if attempt < self.m.retry.max_attempts:
            self.queue.append((time.time() + self.m.retry.backoff_s * 2 ** (attempt - 1), shard, attempt + 1))
            self.state.retries.append(record)
            self.emit("retry", {"shard": shard.index, "attempt": attempt, "cause": cause, "actor_died": dead})
        else:
            self.state.retries.append({**record, "final": True})
            self.state.failed[shard.index] = cause
            self.emit("fail", {"shard": shard.index, "cause": cause})


def run_job(m: Manifest, worker_cls: type, force: bool = False, listener: Listener | None = None) -> JobState:
    """Run (or resume) a job to the end with actors of `worker_cls`.
    `listener(event, data)` sees 'start', 'dispatch', 'commit', 'retry', 'fail'."""
    emit = listener or (lambda e, d: None)
    files, plan = prepare(m, force)
    done = files.committed()
    state = JobState(plan=plan.shards, skipped=sum(1 for s in plan.shards if s.index in done))
    pending = [s for s in plan.shards if s.index not in done]
    emit("start", {"plan": len(plan.shards), "pending": len(pending), "skipped": state.skipped})
    if not pending:
        return state
    connect_ray(m.cluster.address)
    Dispatcher(m, worker_cls, state, emit).run(pending)
    files.write_run(
        files.run().add_run(
            state.started, state.committed, state.skipped, state.retries, state.failed, state.first_commit_s
        )
    )
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
