"""The manifest's schema: typed dataclasses, one per section, that are the one source of every default.

`Manifest` holds the sections and says what identifies a job's output: `config_hash` (what decides the
output rows, stable across adarun versions through `_ADDED_SINCE_HASH`) and `to_record` (what job.json
records, credentials masked). This module does not read YAML, apply overrides, validate values or make
paths absolute: that is `jobs.manifest`, which re-exports every class here. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .credentials import mask_secrets
from .specs import MethodSpec, hashed_params, parse_spec


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
    shards_in_flight: int = 2  # per worker: the next shard is read and tokenized, the last written, while one decodes
    continuous_batching: bool = True  # a finished row's slot takes the shard's next row at once
    # prompts with more positions prefill this many per pass: a refill's a chunk per round while the other slots keep
    # decoding (its slots idle until the last), a first batch's back to back; each pass's mask is [rows, chunk, cache]
    # (0: whole prompts at once). Larger keeps slots busier, smaller bounds a round's stall and the mask's memory; a
    # refill's chunk passes run uncaptured (about 3.8 ms each on an H100: bench/results/h100-chunked-prefill)
    prefill_chunk: int = 512


@dataclass
class ClusterCfg:
    address: str | None = None


@dataclass
class ShardingCfg:
    rows_per_shard: int = 256
    tail_shards: int = 0  # the plan's tail: this many shards of each smaller size (jobs.plan); ~2x the workers
    min_rows_per_shard: int = 0  # the tail's smallest shards (0: rows_per_shard // 8); about resources.batch_size


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
    ("sharding", "tail_shards"): 0,
    ("sharding", "min_rows_per_shard"): 0,
}
