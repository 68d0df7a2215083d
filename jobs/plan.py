"""The shard plan: a pure function of the input (sorted files, row ranges), never of the worker count.

A shard is (index, file, first row, row count). Shards never span files, so a worker reads one
row range of one Parquet file (`read_rows`). `input.limit` truncates the plan after that many rows in file order.
Row ids come from `input.id_column`, or, when a file lacks it, from "<file name>:<row>".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

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
    """A Parquet file, a directory of them, or a glob -> sorted file URLs."""
    fs, root = url_to_fs(path, **(storage_options or {}))
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if any(c in root for c in "*?["):
        files = fs.glob(root)
    elif fs.isdir(root):
        files = [f for f in fs.find(root) if f.endswith(".parquet")]
    elif fs.exists(root):
        files = [root]
    else:
        raise PlanError(f"input.path: {path} does not exist")
    files = sorted(files)
    if not files:
        raise PlanError(f"input.path: no Parquet files under {path}")
    return [f if proto in ("file", "local") else f"{proto}://{f}" for f in files]


def make_plan(inp: InputCfg, rows_per_shard: int, storage_options: dict | None = None) -> list[Shard]:
    shards: list[Shard] = []
    remaining = inp.limit
    for f in list_inputs(inp.path, storage_options):
        fs, p = url_to_fs(f, **(storage_options or {}))
        try:
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh)
                n, names = meta.metadata.num_rows, meta.schema_arrow.names
        except Exception as e:  # a non-Parquet or corrupt file
            raise PlanError(f"input.path: cannot read {f} as Parquet ({type(e).__name__}: {e})") from None
        if inp.prompt_column not in names:
            raise PlanError(
                f"input.prompt_column: {f} has no column {inp.prompt_column!r} (columns: {', '.join(names)})"
            )
        ptype = meta.schema_arrow.field(inp.prompt_column).type
        if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype)):
            raise PlanError(
                f"input.prompt_column: column {inp.prompt_column!r} of {f} has type {ptype}, expected string"
            )
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
        rows = [s for s in plan if s.file == f]
        n = max(s.start + s.rows for s in rows)
        fs, p = url_to_fs(f, **(storage_options or {}))
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if inp.id_column not in pf.schema_arrow.names:
                continue  # ids derived from file and row: unique by construction
            ids = pf.read(columns=[inp.id_column]).column(inp.id_column).slice(0, n).to_pylist()
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


def read_rows(shard: Shard, inp: InputCfg, storage_options: dict | None = None) -> tuple[list[str | None], list]:
    """(ids, prompts) for the shard's row range, reading only the row groups that overlap it.
    A null id stays None (the worker turns that row into an error row)."""
    fs, p = url_to_fs(shard.file, **(storage_options or {}))
    start, n = shard.start, shard.rows
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        cols = [inp.prompt_column] + ([inp.id_column] if inp.id_column in names else [])
        groups, first, acc = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            gn = pf.metadata.row_group(g).num_rows
            if acc + gn > start and acc < start + n:
                groups.append(g)
                first = acc if first is None else first
            acc += gn
        table = pf.read_row_groups(groups, columns=cols).slice(start - first, n)
    prompts = table.column(inp.prompt_column).to_pylist()
    if inp.id_column in names:
        ids = [None if x is None else str(x) for x in table.column(inp.id_column).to_pylist()]  # null: an error row
    else:
        base = shard.file.rsplit("/", 1)[-1]
        ids = [f"{base}:{start + i}" for i in range(n)]
    return ids, prompts
