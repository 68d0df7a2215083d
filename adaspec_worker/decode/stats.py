"""What a decode round produced, and the counters that add it up.

  - `RoundOutcome`  one round's result on the device, one named tensor per fact ([B] each);
  - `RowOutcome`    the same facts for one row on the host, after the round's one device-to-host copy;
  - `OUTCOME_COLUMNS` / `pack_outcome` / `unpack_outcomes`: the single place that knows how a
    RoundOutcome is laid out in the preallocated int64 buffer that copy reads (a fixed buffer keeps
    CUDA-graph replays valid);
  - `SeqStats`      one row's counters (or their sum over rows), fed by `SeqStats.observe(row)`;
  - `EngineStats`   one generate() call: target passes, the rows' summed `SeqStats`, the time split;
    `a + b` is the one way stats add up;
  - `PhaseClock`    splits wall time into prefill / draft / verify / other (/ the oracle's uncharged reference).

Vocabulary as in `verify.py`: accepted tokens exclude the bonus token; tau = tokens emitted per target
pass, bonus included (plain decoding = 1.0). Knows nothing of models, proposers or trees.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class RoundOutcome:
    """One round's result, on the device (all [B] unless noted)."""

    n_accepted: torch.Tensor  # accepted draft tokens (bonus excluded)
    n_drafted: torch.Tensor  # draft nodes put before the target (root excluded)
    draft_depth: torch.Tensor  # deepest draft level offered
    emitted: torch.Tensor  # [B, P] accepted tokens then the bonus; only the first n_accepted + 1 mean anything
    plan: torch.Tensor | None  # the proposer's plan for the next round, if it makes one


@dataclass
class RowOutcome:
    """One row's share of a RoundOutcome, on the host."""

    n_accepted: int
    n_drafted: int
    draft_depth: int
    tokens: list[int]  # the first n_accepted + 1 emitted tokens: accepted..., bonus
    plan: int | None


# Column layout of the buffer the round's one device-to-host copy reads: [B, OUTCOME_COLUMNS + max_nodes].
N_ACCEPTED, N_DRAFTED, DRAFT_DEPTH, PLAN, EMITTED = 0, 1, 2, 3, 4
OUTCOME_COLUMNS = 5  # four scalar columns, and room for one more emitted token than a tree has nodes


def pack_outcome(outcome: RoundOutcome, buffer: torch.Tensor) -> None:
    """Write a RoundOutcome into the preallocated int64 buffer [B, OUTCOME_COLUMNS + max_nodes] (no sync)."""
    buffer[:, N_ACCEPTED].copy_(outcome.n_accepted)
    buffer[:, N_DRAFTED].copy_(outcome.n_drafted)
    buffer[:, DRAFT_DEPTH].copy_(outcome.draft_depth)
    if outcome.plan is not None:
        buffer[:, PLAN].copy_(outcome.plan)
    buffer[:, EMITTED: EMITTED + outcome.emitted.shape[1]].copy_(outcome.emitted)


def unpack_outcomes(buffer: torch.Tensor, has_plan: bool) -> list[RowOutcome]:
    """The round's one device-to-host copy: the buffer to one RowOutcome per batch row."""
    rows = []
    for values in buffer.tolist():
        n_accepted = values[N_ACCEPTED]
        rows.append(RowOutcome(n_accepted=n_accepted, n_drafted=values[N_DRAFTED], draft_depth=values[DRAFT_DEPTH],
                               tokens=values[EMITTED: EMITTED + n_accepted + 1],
                               plan=values[PLAN] if has_plan else None))
    return rows


@dataclass
class SeqStats:
    """Counters of one row; summed over rows in `EngineStats.rows`."""

    rounds: int = 0  # target passes this row took part in (after prefill)
    drafted: int = 0  # draft tokens put before the target (tree nodes, root excluded)
    accepted: int = 0  # draft tokens the target kept (bonus tokens excluded)
    accepted_by_depth: Counter = field(default_factory=Counter)  # depth -> rounds that accepted >= depth tokens
    draft_lengths: Counter = field(default_factory=Counter)  # deepest draft level offered -> rounds

    def observe(self, row: RowOutcome) -> None:
        """Account one round of this row."""
        self.rounds += 1
        self.drafted += row.n_drafted
        self.accepted += row.n_accepted
        self.draft_lengths[row.draft_depth] += 1
        for depth in range(1, row.n_accepted + 1):
            self.accepted_by_depth[depth] += 1

    @property
    def emitted(self) -> int:
        return self.accepted + self.rounds

    @property
    def tau(self) -> float:
        """Tokens emitted per target pass, bonus included (plain decoding = 1.0)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def __add__(self, other: SeqStats) -> SeqStats:
        return SeqStats(rounds=self.rounds + other.rounds, drafted=self.drafted + other.drafted,
                        accepted=self.accepted + other.accepted,
                        accepted_by_depth=self.accepted_by_depth + other.accepted_by_depth,
                        draft_lengths=self.draft_lengths + other.draft_lengths)


@dataclass
class EngineStats:
    """One or more generate() calls."""

    target_passes: int = 0  # batch rounds = target forwards after prefill
    rows: SeqStats = field(default_factory=SeqStats)  # summed over rows
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    other_seconds: float = 0.0  # host-side accounting, stop rules, shrinking the batch
    prefill_seconds: float = 0.0
    warmup_seconds: float = 0.0  # first-use (compiling) rounds and CUDA graph captures, inside the phases above
    reference_seconds: float = 0.0  # the benchmark-only oracle's reference verification: not charged to it

    def __add__(self, other: EngineStats) -> EngineStats:
        return EngineStats(target_passes=self.target_passes + other.target_passes, rows=self.rows + other.rows,
                           draft_seconds=self.draft_seconds + other.draft_seconds,
                           verify_seconds=self.verify_seconds + other.verify_seconds,
                           other_seconds=self.other_seconds + other.other_seconds,
                           prefill_seconds=self.prefill_seconds + other.prefill_seconds,
                           warmup_seconds=self.warmup_seconds + other.warmup_seconds,
                           reference_seconds=self.reference_seconds + other.reference_seconds)


class PhaseClock:
    """Splits wall time into phases. On CUDA it records events and reads them at the round's sync."""

    PHASES = ("prefill", "draft", "verify", "other", "reference")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        """Time from now on counts to `phase` (one of PHASES)."""
        assert phase in self.PHASES, f"unknown phase {phase!r}"
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def flush(self, stats: EngineStats) -> None:
        """Attribute the time between consecutive marks to the phase that started it (after a sync)."""
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()  # a no-op after the round's sync; needed at the end of generate()
        spent = dict.fromkeys(self.PHASES, 0.0)
        for (phase, start), (_, end) in zip(self.marks, self.marks[1:]):
            spent[phase] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        stats.prefill_seconds += spent["prefill"]
        stats.draft_seconds += spent["draft"]
        stats.verify_seconds += spent["verify"]
        stats.other_seconds += spent["other"]
        stats.reference_seconds += spent["reference"]
        self.marks = self.marks[-1:]
