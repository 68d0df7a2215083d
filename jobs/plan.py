"""The shard plan: a pure function of the input (sorted files, row ranges), never of the worker count.

A shard is (index, file, first row, row count). Shards never span files, so a worker reads one
row range of one Parquet file, or one line range of one JSONL file (`read_rows`; files: `jobs.inputs`).
`input.limit` truncates the plan after that many rows in file order.
Row ids come from `input.id_column`, or, when a file lacks it, from "<file name>:<row>".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fsspec.core import url_to_fs

from .inputs import InputError, ShardInput, inspect_file, is_jsonl, read_ids, read_shard
from .manifest import InputCfg


class PlanError(ValueError):
    """The input cannot be planned (missing files, missing columns); the message names it."""


@dataclass(frozen=True)
class Shard:
    index: int
    file: str  # full URL or local path
    start: int
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def list_inputs(path: str, storage_options: dict | None = None) -> list[str]:
    """A Parquet or JSONL file, a directory of them, or a glob -> sorted file URLs."""
    fs, root = url_to_fs(path, **(storage_options or {}))
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if any(c in root for c in "*?["):
        files = fs.glob(root)
    elif fs.isdir(root):
        files = [f for f in fs.find(root) if f.endswith(".parquet") or is_jsonl(f)]
    elif fs.exists(root):
        files = [root]
    else:
        raise PlanError(f"input.path: {path} does not exist")
    files = sorted(files)
    if not files:
        raise PlanError(f"input.path: no Parquet or JSONL files under {path}")
    return [f if proto in ("file", "local") else f"{proto}://{f}" for f in files]


def make_plan(inp: InputCfg, rows_per_shard: int, storage_options: dict | None = None) -> list[Shard]:
    shards: list[Shard] = []
    remaining = inp.limit
    for f in list_inputs(inp.path, storage_options):
        try:
            n = inspect_file(f, inp, storage_options).rows
        except InputError as e:
            raise PlanError(str(e)) from None
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        for start in range(0, n, rows_per_shard):
            shards.append(Shard(len(shards), f, start, min(rows_per_shard, n - start)))
        if remaining == 0:
            break
    return shards


def check_ids(plan: list[Shard], inp: InputCfg, storage_options: dict | None = None) -> None:
    """Refuse repeated ids (each would be written twice) unless `input.allow_duplicate_ids`; reads the id
    column of every planned file. Null ids are not refused here: they become error rows."""
    if inp.allow_duplicate_ids:
        return
    seen: dict[str, str] = {}
    for f in sorted({s.file for s in plan}):
        n = max(s.start + s.rows for s in plan if s.file == f)
        ids = read_ids(f, inp, n, storage_options)
        if ids is None:
            continue  # ids derived from file and row: unique by construction
        for i, rid in enumerate(ids):
            if rid is None:
                continue
            key = str(rid)
            if key in seen:
                raise PlanError(
                    f"input.id_column: id {key!r} appears twice ({seen[key]} and {f} row {i}); "
                    "make ids unique or set input.allow_duplicate_ids: true"
                )
            seen[key] = f"{f} row {i}"


def input_storage_options(input_path: str, output_path: str, output_options: dict) -> dict:
    """The manifest has one set of storage options: the input uses them when it lives on the output's store."""
    proto = lambda u: u.split("://", 1)[0] if "://" in u else "file"  # noqa: E731
    return dict(output_options) if proto(input_path) == proto(output_path) else {}


def read_rows(shard: Shard, inp: InputCfg, storage_options: dict | None = None) -> ShardInput:
    """The shard's rows (ids, prompts or chat messages, per-row settings, carried columns): `jobs.inputs`."""
    return read_shard(shard.file, shard.start, shard.rows, inp, storage_options)
