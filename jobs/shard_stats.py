"""What one shard's decoding measured (`ShardStats`), and how many shards' measurements add up (`total`).

A `ShardStats` is plain data: counts, seconds, histograms and the identity of the actor that decoded the
shard, with `tau` and `occupancy` derived from them and a JSON form that round-trips (`to_json`,
`from_json`). `a + b` sums two shards; the report, the estimate and the CLI's status add a job's shards
with `total`. This module knows no file name and no store: where stats are written, and when, is
`jobs.layout`'s (which re-exports both names); what the numbers mean on the decoder's side is
`adaspec_worker`'s. Torch-free.
"""

from __future__ import annotations

import typing
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

_IDENTITY = (  # fields that name a shard's decoder, not measure it: kept by `+` only when equal
    *("shard", "attempt", "method", "params", "autotune", "cost_model"),
    *("actor_id", "node_id", "host", "pid", "accelerator", "device"),
)


@dataclass
class ShardStats:
    """What one shard's decoding measured (its stats file: `jobs.layout`). `a + b` adds two shards' stats
    (counts and seconds summed, histograms merged, time span widened; identity fields kept when equal)."""

    shard: int | None = None
    attempt: int | None = None
    rows: int = 0  # output rows decoded (in shards/): samples (input rows decoded = planned rows - error_rows)
    error_rows: int = 0  # rows rejected (in errors/)
    errors: list = field(default_factory=list)  # the first error messages (at most 20)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0  # the device's time on the shard (reading and writing overlap other shards)
    started_at: float | None = None  # unix time the device began the shard
    finished_at: float | None = None  # and handed it to the writer
    gpu_seconds: float = 0.0  # wall x GPUs held
    cpu_seconds: float = 0.0  # wall x CPUs held
    method: str | None = None
    params: dict | None = None
    rounds: int = 0  # per-row rounds summed over rows (a row's round = one target pass it took part in)
    drafted_tokens: int = 0  # draft tokens put before the target (tree nodes, root excluded)
    accepted_tokens: int = 0  # draft tokens the target kept (bonus tokens excluded)
    accepted_by_depth: dict = field(default_factory=dict)  # depth -> rounds that accepted >= depth tokens
    draft_lengths: dict = field(default_factory=dict)  # deepest draft level offered -> rounds
    draft_seconds: float = 0.0  # the time split: proposing,
    verify_seconds: float = 0.0  # the target pass and verification,
    other_seconds: float = 0.0  # and everything else (prefill, host work)
    target_passes: int = 0  # batch rounds (one target forward each)
    slot_rounds: int = 0  # batch slots x rounds, idle slots included
    busy_slot_rounds: int = 0  # of those, slots whose row was still decoding
    prefill_chunks: int = 0  # chunked refills' passes for this shard's rows (resources.prefill_chunk)
    baseline: list = field(default_factory=list)  # rows decoded both ways: {id, spec_seconds, spec_tokens, plain_...}
    energy_kwh: float | None = None
    stages: dict = field(default_factory=dict)  # seconds: read (rows read, tokenized), queued (to the device), decode
    autotune: dict | None = None  # this actor's autotune measurement and choice, when enabled
    cost_model: dict | None = None  # this actor's measured cost model (adaspec_worker/decode/cost.py CostModel)
    actor_id: str | None = None
    node_id: str | None = None
    host: str | None = None
    pid: int | None = None
    accelerator: str | None = None
    device: str | None = None

    @property
    def tau(self) -> float:
        """Tokens emitted per target pass, bonus included (plain decoding = 1.0); 0 with no rounds."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def occupancy(self) -> float | None:
        """Share of batch slot-rounds that did useful work (continuous batching keeps it near 1); None when
        not measured (stats written before it existed)."""
        return self.busy_slot_rounds / self.slot_rounds if self.slot_rounds else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["tau"] = self.tau
        d["occupancy"] = self.occupancy
        d["accepted_by_depth"] = dict(sorted(self.accepted_by_depth.items()))
        d["draft_lengths"] = dict(sorted(self.draft_lengths.items()))
        return d

    @classmethod
    def from_json(cls, d: dict) -> ShardStats:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("accepted_by_depth", "draft_lengths"):
            kw[k] = {int(x): int(n) for x, n in (d.get(k) or {}).items()}
        return cls(**kw)

    def __add__(self, o: ShardStats) -> ShardStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(o, f.name)
            if f.name in _IDENTITY:
                out[f.name] = a if a == b else None
            elif f.name in ("accepted_by_depth", "draft_lengths", "stages"):
                out[f.name] = dict(Counter(a) + Counter(b))
            elif f.name in ("errors", "baseline"):
                out[f.name] = a + b
            elif f.name == "started_at":
                out[f.name] = min((x for x in (a, b) if x is not None), default=None)
            elif f.name == "finished_at":
                out[f.name] = max((x for x in (a, b) if x is not None), default=None)
            elif f.name == "energy_kwh":
                out[f.name] = a + b if a is not None and b is not None else None
            else:
                out[f.name] = a + b
        return ShardStats(**out)


def total(stats: typing.Iterable[ShardStats]) -> ShardStats:
    """The sum of many shards' stats (the empty sum is ShardStats())."""
    items = list(stats)
    if not items:
        return ShardStats()
    acc = items[0]
    for s in items[1:]:
        acc = acc + s
    return acc
