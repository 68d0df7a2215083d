"""The shard plan: a pure function of the input (sorted files, row ranges), never of the worker count.

A shard is (index, file, first row, row count). Shards never span files, so a worker reads one
row range of one Parquet file, or one line range of one JSONL file (`read_rows`; files: `jobs.inputs`).
`input.limit` truncates the plan after that many rows in file order.

The tail (`sharding.tail_shards`): the last rows of the job, counted across files in file order, are cut
into smaller shards, so that the workers finish together instead of waiting on one worker's last big
shard. Going back from the end: `tail_shards` shards of `min_rows_per_shard` rows, then `tail_shards` of
twice that, doubling while below `rows_per_shard`. This is planning, not splitting at run time: the plan
stays a pure function of the input and the manifest, so a resume plans (and names) the same shards.
Row ids come from `input.id_column`, or, when a file lacks it, from "<file name>:<row>".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fsspec.core import url_to_fs

from .inputs import InputError, ShardInput, inspect_file, is_jsonl, read_ids, read_shard
from .manifest_schema import InputCfg, ShardingCfg


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


def make_plan(inp: InputCfg, sharding: ShardingCfg, storage_options: dict | None = None) -> list[Shard]:
    counts: list[tuple[str, int]] = []
    remaining = inp.limit
    for f in list_inputs(inp.path, storage_options):
        try:
            n = inspect_file(f, inp, storage_options).rows
        except InputError as e:
            raise PlanError(str(e)) from None
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        counts.append((f, n))
        if remaining == 0:
            break
    return cut_plan(counts, sharding)


def tail_sizes(total_rows: int, sharding: ShardingCfg) -> list[int]:
    """Sizes of the tail's shards in plan order (largest first), covering at most `total_rows` rows."""
    if not sharding.tail_shards:
        return []
    size, from_end, left = max(1, sharding.min_rows_per_shard or sharding.rows_per_shard // 8), [], total_rows
    while size < sharding.rows_per_shard and left > 0:
        for _ in range(sharding.tail_shards):
            if left <= 0:
                break
            from_end.append(min(size, left))
            left -= from_end[-1]
        size *= 2
    return from_end[::-1]


def cut_plan(counts: list[tuple[str, int]], sharding: ShardingCfg) -> list[Shard]:
    """(file, rows) in file order -> shards: every `rows_per_shard` rows from each file's start, the tail's
    cuts (`tail_sizes`) on the job's row axis, and every file boundary; a pure function of its arguments."""
    total_rows = sum(n for _, n in counts)
    sizes = tail_sizes(total_rows, sharding)
    tail_start = total_rows - sum(sizes)
    cuts, at = set(), tail_start
    for k in sizes:
        cuts.add(at)
        at += k
    shards: list[Shard] = []
    offset = 0  # the file's first row on the job's row axis
    for f, n in counts:
        head_end = min(n, max(tail_start - offset, 0))
        starts = set(range(0, head_end, sharding.rows_per_shard)) | ({0} if n else set())
        starts = sorted(starts | {c - offset for c in cuts if offset <= c < offset + n})
        for a, b in zip(starts, starts[1:] + [n]):
            shards.append(Shard(len(shards), f, a, b - a))
        offset += n
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
