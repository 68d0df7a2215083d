"""The on-disk contract of a job's output: every name, every record, and the order files are written in.

    OUT/job.json                    JobRecord: resolved manifest, shard plan, config and job hashes, version
    OUT/shards/shard-NNNNN.parquet  OutputRow per decoded row
    OUT/errors/shard-NNNNN.parquet  ErrorRow per row that could not be decoded (only when there is one)
    OUT/stats/shard-NNNNN.json      ShardStats
    OUT/_commits/shard-NNNNN.json   Commit: written LAST; a shard without it does not exist
    OUT/_job_run.json               JobRun: one entry per controller run, retries, failed shards
    OUT/_lease.json                 the running controller's lease (jobs.lease): one writer at a time
    OUT/report/                     what `adarun report` writes

Exactly once rests on one rule: `ShardFiles.commit` writes a shard's files in the order above and the
commit marker last, and every reader (`committed`, status, report, resume) trusts only shards with a
marker. A shard interrupted before its marker is decoded again on the next run and its files are
overwritten whole (each write replaces an object, or renames a temporary file on local disks).

This module is the only one that spells these names. It does not define what a shard's stats hold or how
they add up: `ShardStats` and `total` live in `jobs.shard_stats` (re-exported here). Torch-free; storage is
a `jobs.storage.Store`.
"""

from __future__ import annotations

import dataclasses
import io
import time
import typing
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

from .shard_stats import ShardStats, total
from .storage import Store

JOB_FILE = "job.json"
RUN_FILE = "_job_run.json"
LEASE_FILE = "_lease.json"
REPORT_DIR = "report"
_SHARD_DIRS = ("_commits", "shards", "stats", "errors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_index(name: str) -> int | None:
    """'shard-00012.json' -> 12; None for anything else."""
    stem = name.split(".", 1)[0]
    if not stem.startswith("shard-") or not stem[6:].isdigit():
        return None
    return int(stem[6:])


# ------------------------------------------------------------------ rows


def _arrow_schema(cls, part: str | None = None) -> pa.Schema:
    """The Arrow schema of a row record's base fields (part None), or of those its fields' metadata marks
    with `part` ("appended": always written after the base; "logprobs": written only when requested)."""
    types, hints = {str: pa.string(), int: pa.int32()}, typing.get_type_hints(cls)
    chosen = [f for f in fields(cls) if f.metadata.get("part") == part]
    return pa.schema([(f.name, f.metadata.get("arrow") or types[hints[f.name]]) for f in chosen])


# one emitted token's k most likely tokens: (token_id, token text, raw log-probability), most likely first
TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
LOGPROBS, TOP_LOGPROBS = pa.list_(pa.float32()), pa.list_(pa.list_(TOP_LOGPROB))  # per completion token


@dataclass
class OutputRow:
    """One decoded row of shards/*.parquet; the field order is the Arrow schema's column order."""

    id: str
    prompt: str
    completion: str
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    # appended columns: written after the base six (old readers that select the base columns are unaffected)
    sample_index: int = field(default=0, metadata={"part": "appended"})  # 0..decoding.n-1
    # decoding.logprobs / top_logprobs (or an OpenAI batch line's): one entry per completion token (EOS and
    # stop-string tokens included); the columns exist only when asked (null for rows that did not ask)
    completion_logprobs: list | None = field(default=None, metadata={"part": "logprobs", "arrow": LOGPROBS})
    top_logprobs: list | None = field(default=None, metadata={"part": "logprobs", "arrow": TOP_LOGPROBS})


@dataclass
class ErrorRow:
    """One row of errors/*.parquet: a row that could not be decoded, and why (one line)."""

    id: str
    error: str


OUTPUT_SCHEMA = _arrow_schema(OutputRow)  # the base columns every adarun version writes, in this order
APPENDED_SCHEMA = _arrow_schema(OutputRow, "appended")  # then these (since 0.x: sample_index)
LOGPROB_SCHEMA = _arrow_schema(OutputRow, "logprobs")  # then these, when log-probabilities were asked for
ERROR_SCHEMA = _arrow_schema(ErrorRow)
OWN_COLUMNS = frozenset(OUTPUT_SCHEMA.names + APPENDED_SCHEMA.names + LOGPROB_SCHEMA.names)  # never carried
METADATA_PREFIX = "adarun."  # Parquet file metadata keys: adarun.model, adarun.method, adarun.job_hash, ...


def _parquet_bytes(
    rows: list, schema: pa.Schema, carried: pa.Table | None = None, metadata: dict[str, str] | None = None
) -> bytes:
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=schema)
    if carried is not None:  # input columns carried through: one value per row, after adarun's own columns
        assert carried.num_rows == table.num_rows, "one carried value per output row"
        for name in carried.column_names:
            if name not in OWN_COLUMNS:
                table = table.append_column(carried.schema.field(name), carried.column(name))
    if metadata:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **{f"{METADATA_PREFIX}{k}": str(v) for k, v in metadata.items()}}
        )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ------------------------------------------------------------------ markers and run records


@dataclass
class Commit:
    """_commits/shard-NNNNN.json: the shard's files are complete."""

    shard: int
    rows: int
    error_rows: int
    attempt: int
    config_hash: str
    committed_at: float = field(default_factory=time.time)

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        return cls(**{k: d[k] for k in (f.name for f in fields(cls)) if k in d})


@dataclass
class ActorStartup:
    """One actor's life as the controller saw it, and its constructor's phases as the actor timed them."""

    actor_id: str | None = None
    host: str | None = None
    accelerator: str | None = None
    created_at: float | None = None  # unix time the controller asked Ray for it
    ready_at: float | None = None  # its constructor returned (ready() answered)
    stopped_at: float | None = None  # the controller killed it (end of run, or death)
    first_commit_at: float | None = None  # its first and last shard committed (unix time)
    last_commit_at: float | None = None
    shards: int = 0  # committed by it
    idle_tail_seconds: float | None = None  # from its going idle with nothing left to the run's last commit
    scheduling_seconds: float = 0.0  # waiting for a place and a process (ready - created - constructor)
    phases: dict = field(default_factory=dict)  # constructor phase -> seconds (imports, tokenizer, model_load, ...)

    @property
    def held_seconds(self) -> float:
        if self.created_at is None:
            return 0.0
        return max((self.stopped_at or self.ready_at or self.created_at) - self.created_at, 0.0)


@dataclass
class JobRun:
    """_job_run.json: what each controller run did (a resume appends a run)."""

    runs: list = field(default_factory=list)  # {started_at, finished_at, committed, skipped, ray_start_seconds,
    #                                            workers, gpus_per_worker, cpus_per_worker}
    actors: list = field(default_factory=list)  # ActorStartup records (as dicts), every run's actors
    retries: list = field(default_factory=list)  # {shard, attempt, actor_died, cause, seconds[, final]}
    failed: dict = field(default_factory=dict)  # shard name -> cause, for the last run
    started_at: float | None = None  # of the last run
    finished_at: float | None = None
    first_commit_seconds: float | None = None  # of the last run, from its start

    @classmethod
    def from_json(cls, d: dict) -> JobRun:
        return cls(**{k: d[k] for k in (f.name for f in fields(cls)) if k in d})

    def add_run(
        self,
        started_at: float,
        committed: int,
        skipped: int,
        retries: list,
        failed: dict[int, str],
        first_commit_seconds: float | None,
        actors: list | None = None,
        **run_fields,
    ) -> JobRun:
        """A copy with this run appended; `run_fields` (ray_start_seconds, workers, gpus_per_worker,
        cpus_per_worker) go into the run's entry; `actors` are `ActorStartup` records."""
        now = time.time()
        entry = {"started_at": started_at, "finished_at": now, "committed": committed, "skipped": skipped}
        return dataclasses.replace(
            self,
            runs=self.runs + [{**entry, **run_fields}],
            actors=self.actors + [asdict(a) if dataclasses.is_dataclass(a) else a for a in actors or []],
            retries=self.retries + retries,
            failed={shard_name(k): v for k, v in failed.items()},
            started_at=started_at,
            finished_at=now,
            first_commit_seconds=first_commit_seconds,
        )


# ------------------------------------------------------------------ the files of one output


class ShardFiles:
    """Reads and writes one output's files by name, through a Store (which knows none of these names)."""

    def __init__(self, store: Store):
        self.store = store

    def commit(
        self,
        rows: list[OutputRow],
        errors: list[ErrorRow],
        stats: ShardStats,
        commit: Commit,
        carried: pa.Table | None = None,
        metadata: dict[str, str] | None = None,
        logprobs: bool = False,
    ) -> None:
        """Write shards/ -> errors/ (when any) -> stats/ -> _commits/: the marker last, so a reader that
        sees it sees complete files, and a shard cut short is simply decoded again. `carried` holds input
        columns (one row per output row) appended after adarun's own; `metadata` goes into the Parquet
        file metadata under `adarun.` keys; `logprobs` adds the log-probability columns."""
        name = shard_name(commit.shard)
        schema = pa.schema(list(OUTPUT_SCHEMA) + list(APPENDED_SCHEMA) + (list(LOGPROB_SCHEMA) if logprobs else []))
        self.store.write_bytes(f"shards/{name}.parquet", _parquet_bytes(rows, schema, carried, metadata))
        if errors:
            self.store.write_bytes(f"errors/{name}.parquet", _parquet_bytes(errors, ERROR_SCHEMA))
        self.store.write_json(f"stats/{name}.json", stats.to_json())
        self.store.write_json(f"_commits/{name}.json", asdict(commit))

    def committed(self) -> dict[int, Commit]:
        """Shard index -> commit marker, for every committed shard."""
        out = {}
        for name in self.store.list("_commits"):
            i = shard_index(name)
            if i is not None and name.endswith(".json"):
                out[i] = Commit.from_json(self.store.read_json(f"_commits/{name}"))
        return out

    def missing(self, planned: list[int], commits: dict[int, Commit] | None = None) -> list[str]:
        """Planned shards the store does not fully hold: no marker, or a marker without its shard or stats file."""
        commits = self.committed() if commits is None else commits
        shards, stats = set(self.store.list("shards")), set(self.store.list("stats"))
        out = []
        for i in planned:
            name = shard_name(i)
            if i not in commits or f"{name}.parquet" not in shards or f"{name}.json" not in stats:
                out.append(name)
        return out

    def stats(self, index: int) -> ShardStats | None:
        rel = f"stats/{shard_name(index)}.json"
        return ShardStats.from_json(self.store.read_json(rel)) if self.store.exists(rel) else None

    def committed_stats(self) -> list[ShardStats]:
        """Stats of committed shards, in shard order."""
        return [s for s in (self.stats(i) for i in sorted(self.committed())) if s is not None]

    def has_any(self) -> bool:
        return any(self.store.list(d) for d in _SHARD_DIRS)

    def clear(self) -> None:
        """Remove every shard file, the run record and the report (for --force)."""
        for d in (*_SHARD_DIRS, REPORT_DIR):
            self.store.remove(d)
        self.store.remove(RUN_FILE)

    # ---- job-level records
    def job(self) -> dict | None:
        return self.store.read_json(JOB_FILE) if self.store.exists(JOB_FILE) else None

    def write_job(self, doc: dict) -> None:
        self.store.write_json(JOB_FILE, doc)

    def run(self) -> JobRun:
        return JobRun.from_json(self.store.read_json(RUN_FILE)) if self.store.exists(RUN_FILE) else JobRun()

    def write_run(self, run: JobRun) -> None:
        self.store.write_json(RUN_FILE, asdict(run))

    def write_report_file(self, name: str, data: bytes) -> None:
        self.store.write_bytes(f"{REPORT_DIR}/{name}", data)

    def read_report_file(self, name: str) -> bytes:
        return self.store.read_bytes(f"{REPORT_DIR}/{name}")

    def report_path(self, name: str) -> str:
        return self.store.path(f"{REPORT_DIR}/{name}")


__all__ = ["ShardStats", "total"]  # re-exported from jobs.shard_stats: `from jobs.layout import total` keeps working
