"""Dispatch: a pool of Ray actors pulling shards from a queue, with placement checks and failure classes.

- Placement: before creating actors, the cluster's nodes are checked for room for one worker
  (`resources.*`); none → `Unplaceable` (exit 2). Every actor is asked for at once, so they start and
  load in parallel. Shards go only to actors whose constructor has finished (`ready()`), up to
  `resources.shards_in_flight` each (the actor reads the next while it decodes one and writes the last);
  actors still pending after `PENDING_NOTICE_S` are reported and the job carries on with the rest (they
  join when resources free up).
- Records: per actor its start-up, first and last commit and idle tail (`ActorStartup`); per run the tail
  (from the first worker left with nothing to do to the last commit).
- Failure classes: an actor that dies (crash, OOM, node loss: `RayActorError`) is replaced and its
  shard retried with backoff up to `retry.max_attempts` (the shards queued behind it on that actor go
  back to the queue without losing an attempt). An exception raised by the application
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
from dataclasses import dataclass, field
from typing import Any

from .layout import ActorStartup, shard_name
from .manifest_schema import Manifest
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


@dataclass(eq=False)
class _Worker:
    """One actor as the dispatcher drives it: its record and the refs of its shards in flight."""

    actor: Any
    rec: ActorStartup
    refs: list = field(default_factory=list)
    sent: int = 0  # shards sent to it: the next one's seq
    drained_at: float | None = None  # it went idle with nothing left to hand it

    def undecoded(self, inflight: dict) -> int:
        return sum(1 for r in self.refs if not inflight[r].decoded)


@dataclass(eq=False)
class _Sent:
    """A shard on an actor: first its run_shard ref (until decoded), then its committed ref."""

    worker: _Worker
    shard: Shard
    attempt: int
    seq: int
    sent_at: float
    decoded: bool = False


class Dispatcher:
    def __init__(self, m: Manifest, worker_cls: type, state, emit: Listener, should_stop: Callable[[], str | None]):
        import ray

        res = m.resources
        env = worker_env()
        self.actor_cls = ray.remote(worker_cls).options(
            num_cpus=res.cpus_per_worker,
            num_gpus=res.gpus_per_worker,
            max_restarts=0,
            max_concurrency=2 * res.shards_in_flight + 1,  # its shards' two calls each, and ready() beside them
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": env} if env else None,
        )
        self.m, self.state, self.emit, self.should_stop = m, state, emit, should_stop
        self.depth = res.shards_in_flight
        self.manifest = m.to_dict()
        self.workers: list[_Worker] = []  # every actor made, for the final kill
        self.starting: dict[Any, tuple[_Worker, float]] = {}  # ready() ref -> (worker, created at)
        self.ready: list[_Worker] = []  # started and alive
        self.queue: deque[tuple[float, Shard, int]] = deque()  # (not before, shard, attempt)
        self.inflight: dict[Any, _Sent] = {}  # run_shard or committed ref -> its shard
        self.app_errors: Counter = Counter()  # one-line cause -> shards it happened on
        self.noticed_pending = False

    def new_actor(self) -> None:
        """Ask Ray for one more actor; all are asked for at once, so they start and load in parallel."""
        actor = self.actor_cls.remote(self.manifest, self.m.output.path)
        now = time.time()
        w = _Worker(actor, ActorStartup(created_at=now))
        self.workers.append(w)
        self.state.actors.append(w.rec)
        self.starting[actor.ready.remote()] = (w, now)

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
                    elif ref in self.inflight:  # not already taken with a dead actor's other shards
                        self._collect(ref)
                self._notice_pending()
        finally:
            self._finish()

    def _finish(self) -> None:
        """Stop every actor; the tail: from the first worker left with nothing to do to the last commit."""
        import ray

        now = time.time()
        end = max((w.rec.last_commit_at for w in self.workers if w.rec.last_commit_at), default=None)
        drained = [w for w in self.ready if w.drained_at is not None and end is not None]
        for w in drained:
            w.rec.idle_tail_seconds = max(end - w.drained_at, 0.0)
        if drained:
            self.state.tail_seconds = max(end - min(w.drained_at for w in drained), 0.0)
        for w in self.workers:
            w.rec.stopped_at = w.rec.stopped_at or now
            ray.kill(w.actor, no_restart=True)

    def _started(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        w, t0 = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            log.error("a worker failed to start: %s", _one_line(e))
            raise FailFast(f"a worker failed to start: {_one_line(e)}") from None
        rec, now = w.rec, time.time()
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
        self.ready.append(w)

    def _notice_pending(self) -> None:
        if self.noticed_pending or not self.starting or not self.ready:
            return
        oldest = min(t for _, t in self.starting.values())
        if time.time() - oldest > PENDING_NOTICE_S:
            self.noticed_pending = True
            log.warning(
                "%d worker(s) still waiting for resources after %.0fs; carrying on with %d",
                len(self.starting),
                time.time() - oldest,
                len(self.ready),
            )

    def _dispatch(self) -> None:
        """Keep `shards_in_flight` shards not yet decoded on every ready actor (the one decoding and the next
        ones being read), the least loaded first, so that none waits a round trip between shards; shards being
        written count apart, up to as many again."""
        now = time.time()
        while self.queue and self.queue[0][0] <= now:
            open_ = [
                w
                for w in self.ready
                if w.undecoded(self.inflight) < self.depth and len(w.refs) < 2 * self.depth
            ]
            if not open_:
                return
            w = min(open_, key=lambda x: x.undecoded(self.inflight))
            _, shard, attempt = self.queue.popleft()
            ref = w.actor.run_shard.remote(shard.to_dict(), attempt, w.sent)
            self.inflight[ref] = _Sent(w, shard, attempt, w.sent, time.time())
            w.sent += 1
            w.refs.append(ref)
            w.drained_at = None
            self.emit("dispatch", {"shard": shard.index, "attempt": attempt, "actor": w.actor})

    def _collect(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        f = self.inflight.pop(ref)
        f.worker.refs.remove(ref)
        try:
            out = ray.get(ref)
        except RayActorError as e:
            self._died(f.worker, [(f, e)])
            return
        except RayTaskError as e:
            self._failed(f.worker, f.shard, f.attempt, f.sent_at, e, dead=False)
            return
        if not f.decoded:  # decoded: now its commit, while the actor decodes the next
            f.decoded = True
            cref = f.worker.actor.committed.remote(f.seq)
            self.inflight[cref] = f
            f.worker.refs.append(cref)
        else:
            self._committed(f.worker, out)

    def _committed(self, w: _Worker, out: dict) -> None:
        st, now = self.state, time.time()
        st.committed += 1
        st.rows += out["rows"]
        st.error_rows += out["error_rows"]
        st.completion_tokens += out["completion_tokens"]
        if st.first_commit_s is None:
            st.first_commit_s = now - st.started
        w.rec.first_commit_at = w.rec.first_commit_at or now
        w.rec.last_commit_at, w.rec.shards = now, w.rec.shards + 1
        if not w.refs and not self.queue and w in self.ready:
            w.drained_at = now
        self.emit("commit", out)

    def _died(self, w: _Worker, lost: list) -> None:
        """An actor died with shards in flight. Its other calls settle first (a commit may have landed just
        before). Of the shards left, the first not yet decoded (the actor takes them in `seq` order) is the one
        it was working on: it is charged an attempt; the others (being written, or read ahead) go back to the
        front of the queue as they were. Died with none undecoded: the first being written is charged."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        others = list(w.refs)
        if others:
            ray.wait(others, num_returns=len(others), timeout=30)
        for ref in others:
            f = self.inflight.pop(ref)
            w.refs.remove(ref)
            try:
                out = ray.get(ref, timeout=0)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                lost.append((f, e))
                continue
            if f.decoded:
                self._committed(w, out)
            else:  # decoded, but its commit call can no longer be made
                f.decoded = True
                lost.append((f, lost[0][1]))
        lost.sort(key=lambda x: (x[0].decoded, x[0].seq))
        charged, e = lost[0]
        for f, _ in reversed(lost[1:]):
            self.queue.appendleft((0.0, f.shard, f.attempt))
            record = {"shard": f.shard.index, "attempt": f.attempt, "actor_died": True, "requeued": True}
            self.state.retries.append({**record, "cause": _one_line(e), "seconds": time.time() - f.sent_at})
            cause = f"requeued, its worker died: {_one_line(e)}"
            self.emit("retry", {"shard": f.shard.index, "attempt": f.attempt, "cause": cause, "actor_died": True})
        self._failed(w, charged.shard, charged.attempt, charged.sent_at, e, dead=True)

    def _failed(self, w: _Worker, shard: Shard, attempt: int, t_dispatch: float, e: BaseException, dead: bool) -> None:
        import ray

        cause = _one_line(e)
        if dead:
            w.rec.stopped_at = time.time()
            if w in self.ready:
                self.ready.remove(w)
            ray.kill(w.actor, no_restart=True)
            self.new_actor()
        else:
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
