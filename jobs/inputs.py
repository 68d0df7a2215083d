"""Input files and their rows: Parquet and OpenAI batch JSONL, prompt or chat columns, per-row settings,
carried columns. `jobs.plan` asks it how many rows a file has and whether its columns fit the manifest
(`inspect_file`); the worker asks it for one shard's rows (`read_shard`).

- Parquet: the prompt is `input.prompt_column` (string), or a chat column of type
  list<struct<role, content>> (`input.messages_column`, or detected: the prompt column itself, or the
  one such column when the prompt column is absent). Ids from `input.id_column`, else "<file>:<row>".
- OpenAI batch JSONL (`*.jsonl`): one request per non-blank line; `custom_id` -> id, `body.messages`
  (chat) or `body.prompt`, and `body.max_tokens` (or `max_completion_tokens`), `temperature`,
  `top_p`, `seed`, `n`, `stop`, `logprobs`, `top_logprobs` as per-row settings (a completions body's integer
  `logprobs` is its top-k count, as in OpenAI's legacy API). A line that is not JSON becomes an error row.
- Per-row settings (`input.row_settings`, on by default): Parquet columns named `max_new_tokens`,
  `temperature`, `top_p`, `top_k`, `seed`, `stop`, `n`; a null keeps the job's `decoding` value.
- Carried columns: every Parquet column but the id, prompt and chat columns (or `input.keep_columns`).

Knows nothing of tokenizers, chat templates or decoding: it hands over plain values. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .manifest_schema import InputCfg

SETTING_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n")
_NUMERIC = {"max_new_tokens": "int", "top_k": "int", "seed": "int", "n": "int", "temperature": "num", "top_p": "num"}
_JSONL_SETTINGS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "n": "n",
    "stop": "stop",
    "logprobs": "logprobs",
    "top_logprobs": "top_logprobs",
}


class InputError(ValueError):
    """A file whose columns do not fit the manifest; the message names the field (a PlanError upstream)."""


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz"))


def is_messages_type(t: pa.DataType) -> bool:
    """list<struct<role: string, content: string, ...>>, the chat column's type."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    if not pa.types.is_struct(v):
        return False
    names = {v.field(i).name: v.field(i).type for i in range(v.num_fields)}
    return all(k in names and _string(names[k]) for k in ("role", "content"))


@dataclass(frozen=True)
class Columns:
    """Which columns of a Parquet file play which part."""

    prompt: str  # the prompt column, or the chat column when `chat`
    chat: bool
    settings: tuple[str, ...]  # per-row setting columns present
    carried: tuple[str, ...]  # columns carried to the output


@dataclass(frozen=True)
class FileInfo:
    rows: int
    columns: Columns | None  # None for JSONL (a line names its own prompt kind and settings)


@dataclass
class ShardInput:
    """One shard's rows as plain values, in input order."""

    ids: list  # str, or None for a null id (an error row)
    prompts: list  # str (plain prompt), list of {role, content} (chat), or None
    settings: list[dict] = field(default_factory=list)  # per row: setting name -> value (nulls left out)
    problems: dict[int, str] = field(default_factory=dict)  # row -> why it cannot be decoded (bad JSON line)
    carried: pa.Table | None = None  # carried columns, one row per input row


def _string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def columns_of(schema: pa.Schema, inp: InputCfg, where: str) -> Columns:
    names = schema.names
    if inp.messages_column:
        if inp.messages_column not in names:
            raise InputError(f"input.messages_column: {where} has no column {inp.messages_column!r}")
        t = schema.field(inp.messages_column).type
        if not is_messages_type(t):
            raise InputError(
                f"input.messages_column: column {inp.messages_column!r} of {where} has type {t}, "
                "expected list<struct<role: string, content: string>>"
            )
        prompt, chat = inp.messages_column, True
    elif inp.prompt_column in names:
        t = schema.field(inp.prompt_column).type
        if not (_string(t) or is_messages_type(t)):
            raise InputError(
                f"input.prompt_column: column {inp.prompt_column!r} of {where} has type {t}, expected string "
                "(or a chat column: list<struct<role, content>>)"
            )
        prompt, chat = inp.prompt_column, is_messages_type(t)
    else:
        found = [n for n in names if is_messages_type(schema.field(n).type)]
        if len(found) != 1:
            raise InputError(
                f"input.prompt_column: {where} has no column {inp.prompt_column!r} "
                f"(columns: {', '.join(names)}); name a chat column with input.messages_column"
            )
        prompt, chat = found[0], True
    settings = tuple(c for c in SETTING_COLUMNS if inp.row_settings and c in names)
    for c in settings:
        t = schema.field(c).type
        ok = (
            (pa.types.is_integer(t) if _NUMERIC[c] == "int" else pa.types.is_integer(t) or pa.types.is_floating(t))
            if c in _NUMERIC
            else _string(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _string(t.value_type))
        )
        ok = ok or pa.types.is_null(t)
        if not ok:
            raise InputError(
                f"input.row_settings: column {c!r} of {where} has type {t}, which cannot set decoding.{c} "
                "per row (rename the column, or set input.row_settings: false)"
            )
    own = {inp.id_column, prompt}
    if inp.keep_columns is None:
        carried = tuple(n for n in names if n not in own)
    else:
        missing = [c for c in inp.keep_columns if c not in names]
        if missing:
            raise InputError(f"input.keep_columns: {where} has no column {missing[0]!r} (columns: {', '.join(names)})")
        carried = tuple(c for c in inp.keep_columns if c not in own)
    return Columns(prompt, chat, settings, carried)


def _open(url: str, storage_options: dict | None):
    fs, p = url_to_fs(url, **(storage_options or {}))
    return fs.open(p, "rb", compression="infer")


def _jsonl_lines(url: str, storage_options: dict | None) -> list[str]:
    with _open(url, storage_options) as fh:
        text = fh.read().decode("utf-8", errors="replace")
    return [ln for ln in text.splitlines() if ln.strip()]


def inspect_file(url: str, inp: InputCfg, storage_options: dict | None = None) -> FileInfo:
    """Row count and column roles of one input file; InputError naming the field when it does not fit."""
    if is_jsonl(url):
        try:
            return FileInfo(len(_jsonl_lines(url, storage_options)), None)
        except Exception as e:
            raise InputError(f"input.path: cannot read {url} as JSONL ({type(e).__name__}: {e})") from None
    try:
        with _open(url, storage_options) as fh:
            meta = pq.ParquetFile(fh)
            n, schema = meta.metadata.num_rows, meta.schema_arrow
    except Exception as e:  # a non-Parquet or corrupt file
        raise InputError(f"input.path: cannot read {url} as Parquet ({type(e).__name__}: {e})") from None
    return FileInfo(n, columns_of(schema, inp, url))


def read_ids(url: str, inp: InputCfg, n: int, storage_options: dict | None = None) -> list | None:
    """The first n ids of a file (None when ids are derived from file and row)."""
    if is_jsonl(url):
        return [_parse_line(ln)[0] for ln in _jsonl_lines(url, storage_options)[:n]]
    with _open(url, storage_options) as fh:
        pf = pq.ParquetFile(fh)
        if inp.id_column not in pf.schema_arrow.names:
            return None
        return pf.read(columns=[inp.id_column]).column(inp.id_column).slice(0, n).to_pylist()


def _parse_line(line: str) -> tuple[str | None, object, dict, str | None]:
    """(custom_id, prompt or messages, settings, problem) of one OpenAI batch line."""
    try:
        req = json.loads(line)
    except ValueError as e:
        return None, None, {}, f"not a JSON line ({e})"
    if not isinstance(req, dict):
        return None, None, {}, "not a JSON object"
    rid = req.get("custom_id")
    body = req.get("body") if isinstance(req.get("body"), dict) else {}
    settings = {ours: body[k] for k, ours in _JSONL_SETTINGS.items() if body.get(k) is not None}
    if isinstance(settings.get("stop"), str):
        settings["stop"] = [settings["stop"]]
    if type(settings.get("logprobs")) is int:  # /v1/completions: logprobs k = the token's and its k most likely
        settings.setdefault("top_logprobs", settings["logprobs"])
        settings["logprobs"] = True
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not all(isinstance(x, dict) for x in msgs):
            return rid, None, settings, "body.messages: must be a list of {role, content}"
        return rid, [{"role": x.get("role"), "content": _text(x.get("content"))} for x in msgs], settings, None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is not None and not isinstance(prompt, str):
        return rid, None, settings, "body.prompt: must be a string"
    return rid, prompt, settings, None if prompt is not None else "no body.messages or body.prompt"


def _text(content) -> str:
    """OpenAI message content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def read_shard(url: str, start: int, n: int, inp: InputCfg, storage_options: dict | None = None) -> ShardInput:
    """Rows [start, start + n) of one file, reading only the Parquet row groups that overlap them."""
    if is_jsonl(url):
        out = ShardInput(ids=[], prompts=[])
        for i, line in enumerate(_jsonl_lines(url, storage_options)[start : start + n]):
            rid, prompt, settings, problem = _parse_line(line)
            out.ids.append(None if rid is None else str(rid))
            out.prompts.append(prompt)
            out.settings.append(settings)
            if problem:
                out.problems[i] = problem
        return out
    with _open(url, storage_options) as fh:
        pf = pq.ParquetFile(fh)
        cols = columns_of(pf.schema_arrow, inp, url)
        names = pf.schema_arrow.names
        wanted = [cols.prompt, *cols.settings, *cols.carried] + ([inp.id_column] if inp.id_column in names else [])
        groups, first, acc = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            gn = pf.metadata.row_group(g).num_rows
            if acc + gn > start and acc < start + n:
                groups.append(g)
                first = acc if first is None else first
            acc += gn
        table = pf.read_row_groups(groups, columns=list(dict.fromkeys(wanted))).slice(start - (first or 0), n)
    prompts = table.column(cols.prompt).to_pylist()
    if inp.id_column in names:
        ids = [None if x is None else str(x) for x in table.column(inp.id_column).to_pylist()]  # null: an error row
    else:
        base = url.rsplit("/", 1)[-1]
        ids = [f"{base}:{start + i}" for i in range(len(prompts))]
    values = {c: table.column(c).to_pylist() for c in cols.settings}
    settings = [{c: values[c][i] for c in cols.settings if values[c][i] is not None} for i in range(len(prompts))]
    carried = table.select(list(cols.carried)) if cols.carried else None
    return ShardInput(ids=ids, prompts=prompts, settings=settings, carried=carried)
