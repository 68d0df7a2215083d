"""Measurements an actor makes on its own rows: per-job autotune and the measured baseline.

- `autotune`: decode a slice of rows with each setting of the method's autotune grid (the spec's
  `autotune_grid`, merged over the manifest's parameters) and with a few fixed and adaptive alternatives
  the actor's models can run (`ALTERNATIVES`: none, an EAGLE chain, an EAGLE-2 tree, OPT-Tree, ldlp-tree),
  and keep the one of most tokens/s predicted by the actor's measured cost model from each candidate's own
  counters (rounds, nodes, depth: `predicted_seconds`), robust to one run's timing noise; without a cost
  model, the measured tokens/s. The choice and every candidate's evidence (measured and predicted tokens/s,
  tau, rounds) go into the shard stats.
- `baseline`: decode a sample of rows both ways, one at a time, with the job's method and with plain
  decoding; the report's measured speedup comes from these pairs. It runs while the job's engine streams
  (between its rounds), so it has engines of its own: the method's with its own proposer and drafter
  state (a second copy of the drafter) and a plain one; neither touches the streaming engine's slots.

Both use `timing` (warm-up, then synchronised timing). Knows nothing of Ray or storage.
"""

from __future__ import annotations

import math
import time

from jobs.specs import MethodSpec, autotune_candidates, parse_spec

from .decode.build import build_engine
from .decode.engine import bucket
from .decode.policy import Shape, round_seconds
from .decode.sampling import SamplingParams
from .decode.warmup import warm
from .rows import Row, in_baseline_sample
from .timing import measure, time_call

ALTERNATIVES = (
    ("none", {}),
    ("eagle", {"k": 4}),
    ("eagle2", {"depth": 5, "total_tokens": 40}),
    ("opt-tree", {}),
    ("ldlp-tree", {}),
)


def candidates(engine) -> list[MethodSpec]:
    """The spec's own grid, then the alternatives whose models this actor holds (an EAGLE head, an LDLP). Not for
    draft-model jobs: their sampled text follows their drafts, so a switch of method would change it."""
    out = autotune_candidates(engine.spec)
    if engine.spec.drafter_kind == "draft-model":
        return out
    head = engine.spec.drafter_kind == "eagle"
    for name, params in ALTERNATIVES:
        spec = parse_spec(name, params)
        usable = spec.drafter_kind is None or (head and ("ldlp" not in spec.needs or engine.ldlp is not None))
        if usable and all(type(spec) is not type(c) for c in out):
            out.append(spec)
    return out


def predicted_seconds(cost, engine, stats, B: int) -> float:
    """The cost model's time for the rounds a candidate ran: each batch round a target pass over the shape it
    verifies, its draft levels and the drafter's catch-up (`policy.round_seconds`)."""
    rows = stats.rows
    if not rows.rounds or engine.drafter is None:
        return stats.target_passes * cost.target(B, 1)
    shape = getattr(engine.proposer, "shape", None)
    if shape is None:  # fixed shapes: the verified width is the proposer's tree, the depth as drafted
        depth = max(round(sum(d * n for d, n in rows.draft_lengths.items()) / rows.rounds), 1)
        nodes = engine.proposer.max_nodes - 1
        shape = Shape(depth, nodes, max(nodes // depth, 1))
    return stats.target_passes * round_seconds(cost, B, shape)


def autotune(
    engine, rows: list[Row], sp: SamplingParams, fraction: float, batch_size: int, cost=None
) -> tuple[object, dict]:
    """(the chosen engine, the record for the shard stats) over the candidate settings."""
    n = max(batch_size, math.ceil(fraction * len(rows)))
    prompts, seeds = [r.tokens for r in rows[:n]], [r.seed for r in rows[:n]]
    device, B = engine.target.device, bucket(min(batch_size, n))
    tried, engines, t0 = [], [], time.perf_counter()
    for spec in candidates(engine):
        cand = build_engine(engine.target, spec, draft=engine.drafter, ldlp=engine.ldlp, cost=cost)
        run = measure(lambda eng=cand: _decode(eng, prompts, sp, seeds, batch_size), device, warmup=1, repeats=1)
        tokens, stats = run.result
        rec = {
            "method": spec.name,
            "params": spec.params(),
            "tokens_per_second": tokens / run.seconds,
            "tau": stats.rows.tau,
            "rounds": stats.target_passes,
        }
        if cost is not None:
            rec["predicted_tokens_per_second"] = tokens / predicted_seconds(cost, cand, stats, B)
        tried.append(rec)
        engines.append(cand)
    key = "predicted_tokens_per_second" if cost is not None else "tokens_per_second"
    best = max(range(len(tried)), key=lambda i: tried[i][key])
    record = {
        "rows": n,
        "seconds": time.perf_counter() - t0,
        "candidates": tried,
        "chosen_by": key,
        "chosen": {"method": tried[best]["method"], "params": tried[best]["params"]},
    }
    return engines[best], record


def _decode(engine, prompts, sp, seeds, batch_size: int):
    """(completion tokens, summed EngineStats) of the prompts in batches of batch_size."""
    tokens, total = 0, None
    for i in range(0, len(prompts), batch_size):
        outs, stats = engine.generate(prompts[i : i + batch_size], sp, seeds[i : i + batch_size])
        tokens += sum(len(c.tokens) for c in outs)
        total = stats if total is None else total + stats
    return tokens, total


class Baseline:
    """Times sampled rows with the job's method and with plain decoding, on the same actor, on engines of its own."""

    def __init__(self, engine, plain, sp: SamplingParams, fraction: float):
        self.engine, self.plain, self.sp, self.fraction = engine, plain, sp, fraction
        self.warm = False

    def follow(self, chosen, cost=None) -> None:
        """Time the method as autotune chose it (`chosen`, the job's new engine, with the actor's cost model),
        keeping this one's own drafter."""
        if self.applies(chosen.spec, self.fraction):
            self.engine = build_engine(chosen.target, chosen.spec, draft=self.engine.drafter, ldlp=chosen.ldlp,
                                       cost=cost)
            self.warm = False
        elif chosen.spec.name == "none":  # plain decoding chosen: nothing to compare, no record
            self.engine = self.plain

    @staticmethod
    def applies(spec: MethodSpec, fraction: float) -> bool:
        return fraction > 0 and spec.name != "none"

    def run(self, rows: list[Row]) -> list[dict]:
        """One record per sampled row: {id, spec_seconds, spec_tokens, plain_seconds, plain_tokens}."""
        engine = self.engine
        if not rows or not self.applies(engine.spec, self.fraction):
            return []
        picked = [r for r in rows if in_baseline_sample(r.id, self.fraction)] or [rows[0]]
        device = engine.target.device
        if not self.warm:  # first use on this actor: compile/capture (every shape, where graphs) outside the timing
            longest = max(len(r.tokens) for r in picked)
            for eng in (engine, self.plain):
                if getattr(eng, "graphs_on", False):
                    warm(eng, 1, self.sp, longest)
                else:
                    eng.generate([picked[0].tokens], self.sp, [0])
            self.warm = True
        out = []
        for r in picked:
            rec = {"id": r.id}
            for key, eng in (("spec", engine), ("plain", self.plain)):
                (completions, _), seconds = time_call(
                    lambda e=eng, r=r: e.generate([r.tokens], r.sp or self.sp, [r.seed]), device
                )
                rec[f"{key}_seconds"] = seconds
                rec[f"{key}_tokens"] = len(completions[0].tokens)
            out.append(rec)
        return out
