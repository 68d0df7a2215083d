"""Dispatch: a pool of Ray actors pulling shards from a queue, with placement checks and failure classes.

- Placement: before creating actors, the cluster's nodes are checked for room for one worker
  (`resources.*`); none → `Unplaceable` (exit 2). Shards go only to actors whose constructor has
  finished (`ready()`); actors still pending after `PENDING_NOTICE_S` are reported and the job carries
  on with the rest (they join when resources free up).
- Failure classes: an actor that dies (crash, OOM, node loss: `RayActorError`) is replaced and its
  shard retried with backoff up to `retry.max_attempts`. An exception raised by the application
  (`RayTaskError`) is retried at most once for the same shard, and the same error on
  `SAME_ERROR_SHARDS` shards stops the job early, naming the error and the input file. An actor whose
  constructor fails (bad checkpoint, out of memory at load) stops the job at once: every actor would.

Torch-free; the worker class arrives from the caller.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .layout import ActorStartup, shard_name
from .manifest import Manifest
from .plan import Shard

log = logging.getLogger("adarun.dispatch")

APPLICATION_ATTEMPTS = 2  # an application exception: the first attempt and one retry
SAME_ERROR_SHARDS = 3  # the same application error on this many shards fails the job early
PENDING_NOTICE_S = 30.0

Listener = Callable[[str, dict], None]


class Unplaceable(ValueError):
    """No node of the cluster can hold one worker (exit 2, naming resources.*)."""


class FailFast(RuntimeError):
    """A failure every further attempt would repeat (exit 1)."""


def worker_env() -> dict:
    """ADARUN_* variables travel to the actors (e.g. the storage fault drill)."""
    return {k: v for k, v in os.environ.items() if k.startswith("ADARUN_")}


def placeable_workers(m: Manifest) -> int:
    """How many workers the cluster's live nodes can hold at once, by their total CPUs and GPUs."""
    import ray

    res = m.resources
    total, cpus, gpus = 0, 0.0, 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        cpus, gpus = cpus + have.get("CPU", 0.0), gpus + have.get("GPU", 0.0)
        by_cpu = math.floor(have.get("CPU", 0.0) / res.cpus_per_worker + 1e-9)
        by_gpu = math.floor(have.get("GPU", 0.0) / res.gpus_per_worker + 1e-9) if res.gpus_per_worker else by_cpu
        total += min(by_cpu, by_gpu)
    if total == 0:
        field = (
            "resources.gpus_per_worker"
            if res.gpus_per_worker and gpus < res.gpus_per_worker
            else "resources.cpus_per_worker"
        )
        raise Unplaceable(
            f"{field}: a worker needs {res.cpus_per_worker:g} CPU(s) and {res.gpus_per_worker:g} GPU(s), "
            f"and no node of the cluster has that (cluster: {cpus:g} CPUs, {gpus:g} GPUs)"
        )
    return total


class Dispatcher:
    def __init__(self, m: Manifest, worker_cls: type, state, emit: Listener, should_stop: Callable[[], str | None]):
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
        self.m, self.state, self.emit, self.should_stop = m, state, emit, should_stop
        self.manifest = m.to_dict()
        self.actors: list = []  # every actor made, for the final kill
        self.starting: dict[Any, tuple[Any, float]] = {}  # ready() ref -> (actor, created at)
        self.idle: deque = deque()
        self.queue: deque[tuple[float, Shard, int]] = deque()  # (not before, shard, attempt)
        self.inflight: dict[Any, tuple[Any, Shard, int, float]] = {}  # ref -> (actor, shard, attempt, dispatched at)
        self.app_errors: Counter = Counter()  # one-line cause -> shards it happened on
        self.noticed_pending = False
        self.startups: list[tuple[Any, ActorStartup]] = []  # (actor, its record): state.actors at the end

    def new_actor(self) -> None:
        actor = self.actor_cls.remote(self.manifest, self.m.output.path)
        self.actors.append(actor)
        now = time.time()
        self.startups.append((actor, ActorStartup(created_at=now)))
        self.state.actors.append(self.startups[-1][1])
        self.starting[actor.ready.remote()] = (actor, now)

    def _record(self, actor) -> ActorStartup:
        return next(rec for a, rec in self.startups if a is actor)

    def run(self, pending: list[Shard]) -> None:
        import ray

        want = min(self.m.resources.workers, len(pending))
        room = placeable_workers(self.m)
        if room < want:
            log.warning(
                "resources.workers: %d requested, the cluster can hold %d; starting %d (the rest wait for resources)",
                want,
                room,
                want,
            )
        for _ in range(want):
            self.new_actor()
        self.queue.extend((0.0, s, 1) for s in pending)
        try:
            while self.queue or self.inflight:
                reason = self.should_stop()
                if reason:
                    raise FailFast(reason)
                self._dispatch()
                refs = list(self.inflight) + list(self.starting)
                if not refs:  # everything queued is backing off
                    time.sleep(max(0.0, min(q[0] for q in self.queue) - time.time()))
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._collect(ref)
                self._notice_pending()
        finally:
            now = time.time()
            for _, rec in self.startups:
                rec.stopped_at = rec.stopped_at or now
            for a in self.actors:
                ray.kill(a, no_restart=True)

    def _started(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        actor, t0 = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            log.error("a worker failed to start: %s", _one_line(e))
            raise FailFast(f"a worker failed to start: {_one_line(e)}") from None
        rec, now = self._record(actor), time.time()
        phases = {k: round(v, 3) for k, v in (info.get("phases") or {}).items()}
        rec.actor_id, rec.host, rec.accelerator = info.get("actor_id"), info.get("host"), info.get("accelerator")
        rec.ready_at, rec.phases = now, phases
        rec.scheduling_seconds = max((info.get("started_at") or t0) - t0, 0.0)
        log.info(
            "worker ready on %s (%s) after %.1fs: %s",
            info.get("host"),
            info.get("accelerator"),
            now - t0,
            ", ".join([f"ray scheduling {rec.scheduling_seconds:.1f}s"] + [f"{k} {v:.1f}s" for k, v in phases.items()]),
        )
        self.emit("worker", {"info": info, "start_seconds": time.time() - t0})
        self.idle.append(actor)

    def _notice_pending(self) -> None:
        if self.noticed_pending or not self.starting or not (self.idle or self.inflight):
            return
        oldest = min(t for _, t in self.starting.values())
        if time.time() - oldest > PENDING_NOTICE_S:
            self.noticed_pending = True
            log.warning(
                "%d worker(s) still waiting for resources after %.0fs; carrying on with %d",
                len(self.starting),
                time.time() - oldest,
                len(self.idle) + len(self.inflight),
            )

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
        except RayActorError as e:
            self._failed(actor, shard, attempt, t_dispatch, e, dead=True)
            return
        except RayTaskError as e:
            self._failed(actor, shard, attempt, t_dispatch, e, dead=False)
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
            self._record(actor).stopped_at = time.time()
            ray.kill(actor, no_restart=True)
            self.new_actor()
        else:
            self.idle.append(actor)
            self.app_errors[cause] += 1
            if self.app_errors[cause] >= SAME_ERROR_SHARDS:
                raise FailFast(
                    f"the same error on {self.app_errors[cause]} shards (last: shard {shard.index} of "
                    f"{shard.file}): {cause}"
                )
        limit = self.m.retry.max_attempts if dead else min(APPLICATION_ATTEMPTS, self.m.retry.max_attempts)
        record = {
            "shard": shard.index,
            "attempt": attempt,
            "actor_died": dead,
            "cause": cause,
            "seconds": time.time() - t_dispatch,
        }
        kind = "its worker died" if dead else "the worker raised"
        if attempt < limit:
            delay = self.m.retry.backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s attempt %d failed (%s): %s; retrying in %.1fs", shard_name(shard.index), attempt, kind, cause, delay
            )
            self.queue.append((time.time() + delay, shard, attempt + 1))
            self.state.retries.append(record)
            self.emit("retry", {"shard": shard.index, "attempt": attempt, "cause": cause, "actor_died": dead})
        else:
            log.error("%s failed after %d attempt(s) (%s): %s", shard_name(shard.index), attempt, kind, cause)
            self.state.retries.append({**record, "final": True})
            self.state.failed[shard.index] = cause
            self.emit("fail", {"shard": shard.index, "cause": cause})


def _one_line(e: BaseException) -> str:
    """The root cause of a Ray error in one line."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    last = [ln for ln in text if ln.strip()][-1:] or [type(cause).__name__]
    return f"{type(cause).__name__}: {last[0].strip()}"[:300]
