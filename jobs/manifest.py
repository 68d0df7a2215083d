"""The job manifest read and checked: YAML and `--set` overrides in, a validated, resolved `Manifest` out.

`load_manifest(path, overrides)` reads YAML, applies `--set dotted.key=value` overrides, and returns a
validated `Manifest` or raises `ManifestError` whose message names the offending field
(e.g. `decoding.temperature: must be >= 0, got -1`). The CLI turns that into exit code 2.

Validation has no side effects; `resolve` then returns a copy whose `speculative.params` lists every
parameter explicitly (what job.json records). Method names and parameters are checked against
`jobs.specs`. The sections, their defaults and the config hash live in `jobs.manifest_schema` (every class
re-exported here); this module knows no default of its own. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import fields

import yaml

from .manifest_schema import (
    AutotuneCfg,
    BaselineCfg,
    ClusterCfg,
    CostCfg,
    DecodingCfg,
    InputCfg,
    Manifest,
    ModelCfg,
    OutputCfg,
    ResourcesCfg,
    RetryCfg,
    ShardingCfg,
    SpeculativeCfg,
)
from .specs import SpecError


class ManifestError(ValueError):
    """A manifest problem; str() is one line naming the field."""


MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs; larger k would multiply the output's size

# -------------------------------------------------------------- building from plain data


def _type_name(t) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
    }.get(t, str(t))


def _coerce(value, t, where: str):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: must be a mapping, got {value!r}")
        return _build(t, value, where + ".")
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ManifestError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: must be an integer, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            raise ManifestError(f"{where}: must be a string, got {value!r}")
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{where}: must be true or false, got {value!r}")
        return value
    if t in (dict, list) and not isinstance(value, t):
        raise ManifestError(f"{where}: must be {_type_name(t)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in data:
        if k not in known:
            raise ManifestError(f"{prefix}{k}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _check(m: Manifest) -> None:
    def need(cond, where, msg):
        if not cond:
            raise ManifestError(f"{where}: {msg}")

    need(m.name.strip() != "", "name", "must not be empty")
    need(m.input.path != "", "input.path", "is required")
    need(m.input.limit is None or m.input.limit >= 1, "input.limit", f"must be >= 1, got {m.input.limit}")
    need(m.output.path != "", "output.path", "is required (or pass --output)")
    need(m.model.target != "", "model.target", "is required")
    need(
        m.model.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype",
        f"must be auto|float32|bfloat16|float16, got {m.model.dtype!r}",
    )
    need(m.model.device in ("auto", "cpu", "cuda"), "model.device", f"must be auto|cpu|cuda, got {m.model.device!r}")
    d = m.decoding
    need(1 <= d.max_new_tokens <= 1_000_000, "decoding.max_new_tokens", f"must be in [1, 1e6], got {d.max_new_tokens}")
    need(0 <= d.temperature <= 100, "decoding.temperature", f"must be in [0, 100], got {d.temperature}")
    need(0 < d.top_p <= 1, "decoding.top_p", f"must be in (0, 1], got {d.top_p}")
    need(0 <= d.top_k <= 1_000_000, "decoding.top_k", f"must be in [0, 1e6], got {d.top_k}")
    need(0 <= d.seed < 2**63, "decoding.seed", f"must be in [0, 2^63), got {d.seed}")
    need(all(isinstance(s, str) and s for s in d.stop), "decoding.stop", "must be a list of non-empty strings")
    need(1 <= d.n <= 1024, "decoding.n", f"must be in [1, 1024], got {d.n}")
    top = d.top_logprobs
    need(0 <= top <= MAX_TOP_LOGPROBS, "decoding.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    kc = m.input.keep_columns
    need(kc is None or all(isinstance(c, str) and c for c in kc), "input.keep_columns", "must be a list of names")
    need(m.input.messages_column != "", "input.messages_column", "must not be empty (leave it out to auto-detect)")
    try:
        spec = m.speculative.spec()
    except SpecError as e:
        where = "speculative.method" if "unknown method" in str(e) else "speculative.params"
        raise ManifestError(f"{where}: {e}") from None
    for path, kind in spec.needs.items():
        need(getattr(m.model, path), f"model.{path}", f"method {spec.name!r} needs {_NEEDS[kind]}")
    need(
        0 < m.speculative.autotune.fraction <= 0.5,
        "speculative.autotune.fraction",
        f"must be in (0, 0.5], got {m.speculative.autotune.fraction}",
    )
    _check_limits(m, need)


def _check_limits(m: Manifest, need) -> None:
    """Resources, sharding, retry and cost: non-negative and within sane bounds."""
    r, rt = m.resources, m.retry
    need(1 <= r.workers <= 100_000, "resources.workers", f"must be in [1, 100000], got {r.workers}")
    need(0 <= r.gpus_per_worker <= 64, "resources.gpus_per_worker", f"must be in [0, 64], got {r.gpus_per_worker}")
    need(0 < r.cpus_per_worker <= 1024, "resources.cpus_per_worker", f"must be in (0, 1024], got {r.cpus_per_worker}")
    need(1 <= r.batch_size <= 65_536, "resources.batch_size", f"must be in [1, 65536], got {r.batch_size}")
    need(0 <= r.prefill_chunk <= 1_000_000, "resources.prefill_chunk",
         f"must be in [0, 1000000] (0: prompts prefill at once), got {r.prefill_chunk}")
    need(
        1 <= m.sharding.rows_per_shard <= 10_000_000,
        "sharding.rows_per_shard",
        f"must be in [1, 1e7], got {m.sharding.rows_per_shard}",
    )
    sh = m.sharding
    need(0 <= sh.tail_shards <= 100_000, "sharding.tail_shards", f"must be in [0, 100000], got {sh.tail_shards}")
    need(
        0 <= sh.min_rows_per_shard <= sh.rows_per_shard,
        "sharding.min_rows_per_shard",
        f"must be in [0, rows_per_shard {sh.rows_per_shard}], got {sh.min_rows_per_shard}",
    )
    need(1 <= r.shards_in_flight <= 16, "resources.shards_in_flight", f"must be in [1, 16], got {r.shards_in_flight}")
    need(1 <= rt.max_attempts <= 100, "retry.max_attempts", f"must be in [1, 100], got {rt.max_attempts}")
    need(0 <= rt.backoff_s <= 3600, "retry.backoff_s", f"must be in [0, 3600], got {rt.backoff_s}")
    need(
        0 <= rt.max_error_fraction <= 1,
        "retry.max_error_fraction",
        f"must be in [0, 1], got {rt.max_error_fraction}",
    )
    need(0 <= m.cost.gpu_hour_usd <= 10_000, "cost.gpu_hour_usd", f"must be in [0, 10000], got {m.cost.gpu_hour_usd}")
    need(0 <= m.cost.cpu_hour_usd <= 10_000, "cost.cpu_hour_usd", f"must be in [0, 10000], got {m.cost.cpu_hour_usd}")
    for k, v in m.cost.accelerator_hour_usd.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 10_000
        need(ok, f"cost.accelerator_hour_usd.{k}", f"must be a price in [0, 10000], got {v!r}")
    need(
        0 <= m.baseline.sample_fraction <= 1,
        "baseline.sample_fraction",
        f"must be in [0, 1], got {m.baseline.sample_fraction}",
    )


_NEEDS = {
    "eagle": "a draft head (an EAGLE head: adarun train-draft)",
    "draft-model": "a draft model (a small LM)",
    "early-exit": "an early-exit head (adarun train-draft --early-exit N)",
    "ldlp": "an LDLP (adarun fit-ldlp)",
}


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (so `adarun resume OUT` works from any directory); URLs unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve(m: Manifest) -> Manifest:
    """A copy of a validated manifest with every method parameter explicit and local paths absolute."""
    spec = m.speculative.spec()
    md = m.model
    return dataclasses.replace(
        m,
        input=dataclasses.replace(m.input, path=_absolute(m.input.path)),
        output=dataclasses.replace(m.output, path=_absolute(m.output.path)),
        model=dataclasses.replace(md, target=_absolute(md.target), draft=_absolute(md.draft), ldlp=_absolute(md.ldlp)),
        speculative=dataclasses.replace(m.speculative, params=spec.params()),
    )


def _migrate(data: dict) -> None:
    """Manifests (and job.json files) written before `speculative.autotune` kept its keys inside params."""
    spec = data.get("speculative")
    params = spec.get("params") if isinstance(spec, dict) else None
    if not isinstance(params, dict) or not ({"autotune", "autotune_fraction"} & set(params)):
        return
    tune = spec.setdefault("autotune", {})
    if isinstance(tune, dict):
        if "autotune" in params:
            tune.setdefault("enabled", params.pop("autotune"))
        if "autotune_fraction" in params:
            tune.setdefault("fraction", params.pop("autotune_fraction"))


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.c=value`: value parsed as YAML (so numbers, booleans, lists work)."""
    if "=" not in assignment:
        raise ManifestError(f"--set {assignment!r}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ManifestError(f"--set {assignment!r}: bad key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ManifestError(f"{key}: cannot set inside a non-mapping")
    node[parts[-1]] = value


def manifest_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Manifest:
    try:
        data = json.loads(json.dumps(data or {}))  # deep copy of plain data
    except (ValueError, RecursionError):
        raise ManifestError("manifest: recursive YAML anchors (an alias inside itself) are not supported") from None
    method_before = (data.get("speculative") or {}).get("method") if isinstance(data, dict) else None
    later = [o for o in overrides if o.startswith("speculative.params")]
    for o in overrides:
        if o not in later:
            apply_override(data, o)
    spec = data.get("speculative") if isinstance(data, dict) else None
    if isinstance(spec, dict) and spec.get("method") != method_before:
        spec.pop("params", None)  # --set speculative.method=X: the file's params belong to another method
    for o in later:
        apply_override(data, o)
    if not isinstance(data, dict):
        raise ManifestError("manifest: top level must be a mapping")
    _migrate(data)
    m = _build(Manifest, data)
    _check(m)
    return resolve(m)


def load_manifest(path: str, overrides: typing.Sequence[str] = ()) -> Manifest:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ManifestError(f"{path}: recursive YAML anchors are not supported") from None
    return manifest_from_dict(data or {}, overrides)


__all__ = [  # the schema's classes, re-exported: `from jobs.manifest import InputCfg` keeps working
    "AutotuneCfg",
    "BaselineCfg",
    "ClusterCfg",
    "CostCfg",
    "DecodingCfg",
    "InputCfg",
    "Manifest",
    "ModelCfg",
    "OutputCfg",
    "ResourcesCfg",
    "RetryCfg",
    "ShardingCfg",
    "SpeculativeCfg",
]
