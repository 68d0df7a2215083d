"""The job manifest: typed dataclasses that are the one source of every default, and their validation.

`load_manifest(path, overrides)` reads YAML, applies `--set dotted.key=value` overrides, and returns a
validated `Manifest` or raises `ManifestError` whose message names the offending field
(e.g. `decoding.temperature: must be >= 0, got -1`). The CLI turns that into exit code 2.

Validation has no side effects; `resolve` then returns a copy whose `speculative.params` lists every
parameter explicitly (what job.json records). Method names and parameters are checked against
`jobs.specs`. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields

import yaml

from .specs import MethodSpec, SpecError, parse_spec


class ManifestError(ValueError):
    """A manifest problem; str() is one line naming the field."""


@dataclass
class InputCfg:
    path: str = ""
    prompt_column: str = "prompt"
    id_column: str = "id"
    limit: int | None = None


@dataclass
class OutputCfg:
    path: str = ""
    storage_options: dict = field(default_factory=dict)


@dataclass
class ModelCfg:
    target: str = ""
    draft: str | None = None
    ldlp: str | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class DecodingCfg:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list = field(default_factory=list)


@dataclass
class AutotuneCfg:
    enabled: bool = False  # each actor measures the spec's autotune grid on a slice of its first shard
    fraction: float = 0.02  # share of that shard's rows used (at least one batch)


@dataclass
class SpeculativeCfg:
    method: str = "none"
    params: dict = field(default_factory=dict)
    autotune: AutotuneCfg = field(default_factory=AutotuneCfg)

    def spec(self) -> MethodSpec:
        """The parsed method spec (validated manifests only)."""
        return parse_spec(self.method, self.params)


@dataclass
class ResourcesCfg:
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    batch_size: int = 8


@dataclass
class ClusterCfg:
    address: str | None = None


@dataclass
class ShardingCfg:
    rows_per_shard: int = 256


@dataclass
class RetryCfg:
    max_attempts: int = 3
    backoff_s: float = 0.5


@dataclass
class CostCfg:
    gpu_hour_usd: float = 2.5
    cpu_hour_usd: float = 0.05


@dataclass
class BaselineCfg:
    sample_fraction: float = 0.02


@dataclass
class Manifest:
    name: str = "adarun-job"
    input: InputCfg = field(default_factory=InputCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    decoding: DecodingCfg = field(default_factory=DecodingCfg)
    speculative: SpeculativeCfg = field(default_factory=SpeculativeCfg)
    resources: ResourcesCfg = field(default_factory=ResourcesCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    sharding: ShardingCfg = field(default_factory=ShardingCfg)
    retry: RetryCfg = field(default_factory=RetryCfg)
    cost: CostCfg = field(default_factory=CostCfg)
    baseline: BaselineCfg = field(default_factory=BaselineCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what decides the output rows; resources, retry, cost and names may change on resume."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("input", "model", "decoding", "speculative", "sharding")}
        # the hash predates `speculative.autotune`: autotune keys hash as they did inside params, so
        # outputs written before the field existed still resume
        tune = keep["speculative"].pop("autotune")
        if tune["enabled"]:
            keep["speculative"]["params"] = {
                **keep["speculative"]["params"],
                "autotune": True,
                "autotune_fraction": tune["fraction"],
            }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where}: must be a number, got {value!r}")
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
    need(d.max_new_tokens >= 1, "decoding.max_new_tokens", f"must be >= 1, got {d.max_new_tokens}")
    need(d.temperature >= 0, "decoding.temperature", f"must be >= 0, got {d.temperature}")
    need(0 < d.top_p <= 1, "decoding.top_p", f"must be in (0, 1], got {d.top_p}")
    need(d.top_k >= 0, "decoding.top_k", f"must be >= 0, got {d.top_k}")
    need(all(isinstance(s, str) and s for s in d.stop), "decoding.stop", "must be a list of non-empty strings")
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
    r = m.resources
    need(r.workers >= 1, "resources.workers", f"must be >= 1, got {r.workers}")
    need(r.gpus_per_worker >= 0, "resources.gpus_per_worker", f"must be >= 0, got {r.gpus_per_worker}")
    need(r.cpus_per_worker > 0, "resources.cpus_per_worker", f"must be > 0, got {r.cpus_per_worker}")
    need(r.batch_size >= 1, "resources.batch_size", f"must be >= 1, got {r.batch_size}")
    need(m.sharding.rows_per_shard >= 1, "sharding.rows_per_shard", f"must be >= 1, got {m.sharding.rows_per_shard}")
    need(m.retry.max_attempts >= 1, "retry.max_attempts", f"must be >= 1, got {m.retry.max_attempts}")
    need(m.retry.backoff_s >= 0, "retry.backoff_s", f"must be >= 0, got {m.retry.backoff_s}")
    need(m.cost.gpu_hour_usd >= 0, "cost.gpu_hour_usd", f"must be >= 0, got {m.cost.gpu_hour_usd}")
    need(m.cost.cpu_hour_usd >= 0, "cost.cpu_hour_usd", f"must be >= 0, got {m.cost.cpu_hour_usd}")
    need(
        0 <= m.baseline.sample_fraction <= 1,
        "baseline.sample_fraction",
        f"must be in [0, 1], got {m.baseline.sample_fraction}",
    )


_NEEDS = {
    "eagle": "a draft head (an EAGLE head: adarun train-draft)",
    "draft-model": "a draft model (a small LM)",
    "ldlp": "an LDLP (adarun fit-ldlp)",
}


def resolve(m: Manifest) -> Manifest:
    """A copy of a validated manifest with every method parameter explicit (what job.json records)."""
    spec = m.speculative.spec()
    return dataclasses.replace(m, speculative=dataclasses.replace(m.speculative, params=spec.params()))


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
    data = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for o in overrides:
        apply_override(data, o)
    if not isinstance(data, dict):
        raise ManifestError("manifest: top level must be a mapping")
    _migrate(data)
    m = _build(Manifest, data)
    _check(m)
    return resolve(m)


def load_manifest(path: str, overrides: typing.Sequence[str] = ()) -> Manifest:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return manifest_from_dict(data or {}, overrides)
