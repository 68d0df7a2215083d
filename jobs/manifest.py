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
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields

import yaml

from .credentials import mask_secrets
from .specs import MethodSpec, SpecError, hashed_params, parse_spec


class ManifestError(ValueError):
    """A manifest problem; str() is one line naming the field."""


@dataclass
class InputCfg:
    path: str = ""
    prompt_column: str = "prompt"
    id_column: str = "id"
    limit: int | None = None
    allow_duplicate_ids: bool = False  # by default a repeated id is refused at planning (exit 2)
    # chat rows: a list<struct<role, content>> column rendered with the target's chat template; None =
    # auto-detect (used when prompt_column is absent or is such a list); system_prompt is prepended to them
    messages_column: str | None = None
    system_prompt: str | None = None
    keep_columns: list | None = None  # input columns carried to the output; None = all (but id/prompt/messages)
    row_settings: bool = True  # columns named like a decoding field (max_new_tokens, temperature, ...) set it per row


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
    n: int = 1  # samples per input row (output column sample_index); sample 0 keeps the n=1 seed
    # columns completion_logprobs (each completion token's log-probability under the target's raw distribution,
    # before temperature/top-k/top-p) and, with top_logprobs k > 0 (implies logprobs), each token's k most likely
    logprobs: bool = False
    top_logprobs: int = 0


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
    batch_size: int = 8  # rows decoded at once per worker (batch slots)
    continuous_batching: bool = True  # a finished row's slot takes the shard's next row at once


@dataclass
class ClusterCfg:
    address: str | None = None


@dataclass
class ShardingCfg:
    rows_per_shard: int = 256


@dataclass
class RetryCfg:
    max_attempts: int = 3  # per shard, for crashes (actor death, node loss, storage faults)
    backoff_s: float = 0.5
    max_error_fraction: float = 0.5  # the job exits 1 when more than this share of its rows are error rows


@dataclass
class CostCfg:
    gpu_hour_usd: float = 2.5
    cpu_hour_usd: float = 0.05
    # accelerator name substring -> $/hour per accelerator, e.g. {H100: 3.0, H200: 4.0}; others: gpu_hour_usd
    accelerator_hour_usd: dict = field(default_factory=dict)


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
        for (section, name), default in _ADDED_SINCE_HASH.items():
            if keep[section].get(name) == default:
                keep[section].pop(name, None)
        keep["speculative"]["params"] = hashed_params(keep["speculative"]["method"], keep["speculative"]["params"])
        tune = keep["speculative"].pop("autotune")
        if tune["enabled"]:
            keep["speculative"]["params"] = {
                **keep["speculative"]["params"],
                "autotune": True,
                "autotune_fraction": tune["fraction"],
            }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def to_record(self) -> dict:
        """What job.json records: the resolved manifest with the storage options' credentials masked."""
        d = self.to_dict()
        d["output"]["storage_options"] = mask_secrets(d["output"]["storage_options"])
        return d


# fields added after outputs were first written: they enter the config hash only when not at their default
_ADDED_SINCE_HASH = {
    ("input", "allow_duplicate_ids"): False,
    ("input", "messages_column"): None,
    ("input", "system_prompt"): None,
    ("input", "keep_columns"): None,
    ("input", "row_settings"): True,
    ("decoding", "n"): 1,
    ("decoding", "logprobs"): False,
    ("decoding", "top_logprobs"): 0,
}
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
    need(
        1 <= m.sharding.rows_per_shard <= 10_000_000,
        "sharding.rows_per_shard",
        f"must be in [1, 1e7], got {m.sharding.rows_per_shard}",
    )
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
