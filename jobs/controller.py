"""The controller: preflight, plan, record and lease an output, then drive Ray actors through the shards
that are not committed (`jobs.dispatch`), and check the output before calling the job done.

Exactly once: a shard exists only when its commit marker does (`jobs.layout`), so a rerun (or
`adarun resume`) plans the same shards, skips the committed ones and decodes the rest; a shard that
was in flight when a controller or actor died is simply decoded again (per-row seeds make it reproduce).
A rerun is the same job only when the config (the fields that decide rows), the plan and the
fingerprints of the input files and model directories (`jobs.fingerprint`) all match; otherwise it
exits 2 naming what differs, unless `--force` starts over. One controller writes an output at a time
(`jobs.lease`).

The controller never imports torch or the decoder: the caller hands it the worker class (the CLI
passes `adaspec_worker.worker.ShardWorker`, whose module imports torch only inside the actor), and
the class's `preflight(manifest)` checks the models before any actor starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from .dispatch import Dispatcher, FailFast
from .fingerprint import diff as fingerprint_diff
from .fingerprint import job_fingerprint
from .layout import ShardFiles, shard_name
from .lease import Lease
from .manifest import Manifest, manifest_from_dict
from .plan import Shard, check_ids, input_storage_options, make_plan
from .storage import StorageError, Store, describe_storage_error

log = logging.getLogger("adarun.controller")


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
    fatal: str | None = None  # a failure that stopped the job early (every further attempt would repeat it)
    started: float = field(default_factory=time.time)
    first_commit_s: float | None = None
    actors: list = field(default_factory=list)  # ActorStartup records of this run's actors
    ray_start_seconds: float = 0.0  # connecting to (or starting) Ray
    tail_seconds: float | None = None  # from the first worker left with nothing to do to the last commit


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
    opts = input_storage_options(m.input.path, m.output.path, m.output.storage_options)
    shards = make_plan(m.input, m.sharding, opts)
    body = json.dumps({"config": m.config_hash(), "plan": [s.to_dict() for s in shards]}, sort_keys=True)
    return Plan(shards, hashlib.sha256(body.encode()).hexdigest()[:16])


def open_output(m: Manifest) -> ShardFiles:
    return ShardFiles(Store(m.output.path, m.output.storage_options, m.retry.backoff_s))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Manifest, new: Manifest) -> list[str]:
    """The dotted fields that decide rows and differ between two manifests, as 'field (old -> new)'."""
    sections = ("input", "model", "decoding", "speculative", "sharding")
    a = _flat({k: old.to_dict()[k] for k in sections})
    b = _flat({k: new.to_dict()[k] for k in sections})
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def preflight(m: Manifest, worker_cls: type | None = None) -> tuple[ShardFiles, Plan]:
    """Everything checked before any actor starts (and by --dry-run): input, ids, models, output store."""
    plan = plan_job(m)
    check_ids(plan.shards, m.input, input_storage_options(m.input.path, m.output.path, m.output.storage_options))
    if worker_cls is not None and hasattr(worker_cls, "preflight"):
        worker_cls.preflight(m)
    files = open_output(m)
    probe = Store(m.output.path, m.output.storage_options, backoff_s=0.2, attempts=2)  # an unreachable store: seconds
    probe.chaos = 0.0  # reachability only: the chaos drill (ADARUN_CHAOS_WRITE_FAILURE_RATE) is for the job's writes
    try:
        probe.write_bytes("_adarun_probe", b"ok")
        probe.remove("_adarun_probe")
    except Exception as e:
        raise describe_storage_error(e, m.output.path) from None
    return files, plan


def _same_job(old: dict, m: Manifest, plan: Plan) -> tuple[bool, str]:
    """Whether job.json describes this job; else the one-line reason. Local paths recorded relative
    (before they were made absolute) compare by their absolute form."""
    if old.get("job_hash") == plan.job_hash:
        return True, ""
    try:
        was = manifest_from_dict(old["manifest"])
    except Exception as e:  # an unreadable record: say so rather than guess
        return False, f"its job.json cannot be read ({e})"
    changed = config_diff(was, m)
    if changed:
        return False, "a different config: " + "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
    was_plan = [
        (os.path.abspath(s["file"]) if "://" not in s["file"] else s["file"], s["start"], s["rows"])
        for s in old.get("plan", [])
    ]
    now_plan = [(s.file, s.start, s.rows) for s in plan.shards]
    if was_plan != now_plan:
        return False, "a different input (the shard plan differs: files or row counts changed)"
    return True, ""


def prepare(m: Manifest, force: bool = False, worker_cls: type | None = None) -> tuple[ShardFiles, Plan, Lease]:
    """Preflight, take the output's lease, refuse another job's output, write job.json."""
    files, plan = preflight(m, worker_cls)
    lease = Lease(files.store).acquire(force=force)
    try:
        opts = input_storage_options(m.input.path, m.output.path, m.output.storage_options)
        fingerprint = job_fingerprint(
            [s.file for s in plan.shards],
            opts,
            {"model.target": m.model.target, "model.draft": m.model.draft, "model.ldlp": m.model.ldlp},
        )
        old = files.job()
        if old is not None and files.has_any():
            same, why = _same_job(old, m, plan)
            why = why or (fingerprint_diff(old.get("fingerprint", {}), fingerprint) or "")
            if why:
                if not force:
                    raise JobConflict(
                        f"output.path: {m.output.path} holds job {old.get('name')!r} "
                        f"({old.get('job_hash')}) with {why}; use another output, or --force to discard it"
                        if same is False
                        else f"{why}; rerun with --force to start over"
                    )
                files.clear()
                old = None
        elif files.has_any() and not force:
            raise JobConflict(
                f"output.path: {m.output.path} holds shards of an unknown job; use another output, "
                "or --force to discard them"
            )
        elif files.has_any():
            files.clear()
        doc = {
            "adarun_version": __version__,
            "name": m.name,
            "job_hash": plan.job_hash,
            "config_hash": m.config_hash(),
            "manifest": m.to_record(),
            "fingerprint": fingerprint,
            "plan": [s.to_dict() for s in plan.shards],
            "created_at": (old or {}).get("created_at", time.time()),
        }
        files.write_job(doc)
    except BaseException:
        lease.release()
        raise
    return files, plan, lease


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or None
    quiet_ray()
    ray.init(
        address=addr,
        include_dashboard=False,
        log_to_driver=bool(os.environ.get("ADARUN_RAY_LOGS")),
        configure_logging=False,
        ignore_reinit_error=True,
    )


def quiet_ray() -> None:
    """Ray's start-up banners and its token-authentication notice go to the debug log, not the user's terminal
    (RAY_AUTH_MODE is left as the user set it; a local cluster Ray starts here keeps Ray's default)."""
    if log.isEnabledFor(logging.DEBUG):
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray._private.worker", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)


Listener = Callable[[str, dict], None]


def run_job(m: Manifest, worker_cls: type, force: bool = False, listener: Listener | None = None) -> JobState:
    """Run (or resume) a job to the end with actors of `worker_cls`.
    `listener(event, data)` sees 'start', 'worker', 'dispatch', 'commit', 'retry', 'fail'."""
    emit = listener or (lambda e, d: None)
    files, plan, lease = prepare(m, force, worker_cls)
    with lease:
        done = files.committed()
        state = JobState(plan=plan.shards, skipped=sum(1 for s in plan.shards if s.index in done))
        pending = [s for s in plan.shards if s.index not in done]
        emit("start", {"plan": len(plan.shards), "pending": len(pending), "skipped": state.skipped})
        if pending:
            t_ray = time.time()
            connect_ray(m.cluster.address)
            state.ray_start_seconds = time.time() - t_ray
            lost = lambda: "output.path: another adarun took over this output's lease" if lease.lost else None
            try:
                Dispatcher(m, worker_cls, state, emit, lost).run(pending)
            except FailFast as e:
                state.fatal = str(e)
            files.write_run(
                files.run().add_run(
                    state.started,
                    state.committed,
                    state.skipped,
                    state.retries,
                    state.failed,
                    state.first_commit_s,
                    actors=state.actors,
                    ray_start_seconds=state.ray_start_seconds,
                    tail_seconds=state.tail_seconds,
                    shards_in_flight=m.resources.shards_in_flight,
                    workers=m.resources.workers,
                    gpus_per_worker=m.resources.gpus_per_worker,
                    cpus_per_worker=m.resources.cpus_per_worker,
                )
            )
        finish(m, files, plan, state)
    return state


def finish(m: Manifest, files: ShardFiles, plan: Plan, state: JobState) -> None:
    """Call the job done only when the store holds every shard's files and marker and rows mostly decoded."""
    if state.fatal:
        raise JobFailed(state.fatal)
    if state.failed:
        names = ", ".join(f"{shard_name(k)} ({v})" for k, v in sorted(state.failed.items()))
        raise JobFailed(f"{len(state.failed)} shard(s) failed after their attempts: {names}")
    try:
        commits = files.committed()
        missing = files.missing([s.index for s in plan.shards], commits)
    except Exception as e:
        raise describe_storage_error(e, m.output.path) from None
    if missing:
        raise JobFailed(
            f"the store lacks files of {len(missing)} committed shard(s) after the run "
            f"({', '.join(missing[:5])}); rerun to decode them again"
        )
    rows = sum(c.rows for c in commits.values())
    errors = sum(c.error_rows for c in commits.values())
    if rows + errors and errors / (rows + errors) > m.retry.max_error_fraction:
        raise JobFailed(
            f"{errors} of {rows + errors} rows are error rows (more than retry.max_error_fraction "
            f"{m.retry.max_error_fraction:g}); first causes in {m.output.path}/errors/"
        )


__all__ = ["JobConflict", "JobFailed", "JobState", "Plan", "StorageError", "plan_job", "prepare", "run_job"]
