"""Measurements an actor makes on its own rows: per-job autotune and the measured baseline.

- `autotune`: decode a slice of rows with each setting of the method's autotune grid (the spec's
  `autotune_grid`, merged over the manifest's parameters) and keep the fastest for this actor. The
  choice and every candidate's tokens/s go into the shard stats.
- `baseline`: decode a sample of rows both ways, one at a time, with the job's method and with plain
  decoding; the report's measured speedup comes from these pairs. It runs while the job's engine streams
  (between its rounds), so it has engines of its own: the method's with its own proposer and drafter
  state (a second copy of the drafter) and a plain one; neither touches the streaming engine's slots.

Both use `timing` (warm-up, then synchronised timing). Knows nothing of Ray or storage.
"""

from __future__ import annotations

import math
import time

from jobs.specs import MethodSpec, autotune_candidates

from .decode.build import build_engine
from .decode.sampling import SamplingParams
from .rows import Row, in_baseline_sample
from .timing import measure, time_call


def autotune(engine, rows: list[Row], sp: SamplingParams, fraction: float, batch_size: int) -> tuple[object, dict]:
    """(the fastest engine, the record for the shard stats) over the spec's candidate settings."""
    n = max(batch_size, math.ceil(fraction * len(rows)))
    prompts, seeds = [r.tokens for r in rows[:n]], [r.seed for r in rows[:n]]
    device = engine.target.device
    tried, best, t0 = [], None, time.perf_counter()
    for spec in autotune_candidates(engine.spec):
        cand = build_engine(engine.target, spec, draft=engine.drafter, ldlp=engine.ldlp)
        run = measure(lambda eng=cand: eng.generate(prompts, sp, seeds), device, warmup=1, repeats=1)
        tps = sum(len(c.tokens) for c in run.result[0]) / run.seconds
        tried.append({"params": spec.params(), "tokens_per_second": tps})
        if best is None or tps >= best[0]:
            best = (tps, cand)
    record = {
        "rows": n,
        "seconds": time.perf_counter() - t0,
        "candidates": tried,
        "chosen": max(tried, key=lambda x: x["tokens_per_second"])["params"],
    }
    return best[1], record


class Baseline:
    """Times sampled rows with the job's method and with plain decoding, on the same actor, on engines of its own."""

    def __init__(self, engine, plain, sp: SamplingParams, fraction: float):
        self.engine, self.plain, self.sp, self.fraction = engine, plain, sp, fraction
        self.warm = False

    def follow(self, chosen) -> None:
        """Time the method as autotune chose it (`chosen`, the job's new engine), keeping this one's own drafter."""
        if self.applies(chosen.spec, self.fraction):
            self.engine = build_engine(chosen.target, chosen.spec, draft=self.engine.drafter, ldlp=chosen.ldlp)
            self.warm = False

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
        if not self.warm:  # first use on this actor: compile/capture outside the timing
            for eng in (engine, self.plain):
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
