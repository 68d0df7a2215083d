"""What a decode round produced, and the counters that add it up.

  - `RoundOutcome`  one round's result on the device, one named tensor per fact ([B] each);
  - `RowOutcome`    the same facts for one row on the host, after the round's one device-to-host copy;
  - `OUTCOME_COLUMNS` / `outcome_width` / `pack_outcome` / `unpack_outcomes`: the single place that knows
    how a RoundOutcome is laid out in the preallocated int64 buffer that copy reads (a fixed buffer keeps
    CUDA-graph replays valid); requested log-probabilities ride in the same copy, float64 bit-cast to int64;
  - `SeqStats`      one row's counters (or their sum over rows), fed by `SeqStats.observe(row)`;
  - `EngineStats`   one generate() call: target passes, the rows' summed `SeqStats`, the time split,
    slot occupancy;
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

from .logprobs import TokenLogprobs


@dataclass
class RoundOutcome:
    """One round's result, on the device (all [B] unless noted)."""

    n_accepted: torch.Tensor  # accepted draft tokens (bonus excluded)
    n_drafted: torch.Tensor  # draft nodes put before the target (root excluded)
    draft_depth: torch.Tensor  # deepest draft level offered
    emitted: torch.Tensor  # [B, P] accepted tokens then the bonus; only the first n_accepted + 1 mean anything
    plan: torch.Tensor | None  # the proposer's plan for the next round, if it makes one
    logprobs: TokenLogprobs | None = None  # the emitted tokens' log-probabilities, only when requested


@dataclass
class RowOutcome:
    """One row's share of a RoundOutcome, on the host."""

    n_accepted: int
    n_drafted: int
    draft_depth: int
    tokens: list[int]  # the first n_accepted + 1 emitted tokens: accepted..., bonus
    plan: int | None
    logprobs: list[float] | None = None  # per token in `tokens`, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (token id, logprob), most likely first


# Column layout of the buffer the round's one device-to-host copy reads: [B, outcome_width(max_nodes, k)]:
# six scalar columns, the emitted tokens (room for one more than a tree has nodes), then, when log-probabilities
# were requested, a region at the buffer's end: P chosen logprobs, P x k top ids, P x k top logprobs (floats as
# float64 bits). LOGPROB_K holds k + 1 (0: none this round) and LOGPROB_AT the region's first column, so the
# buffer describes itself and may be wider than a round needs (it only grows: captured graphs keep it).
N_ACCEPTED, N_DRAFTED, DRAFT_DEPTH, PLAN, LOGPROB_K, LOGPROB_AT, EMITTED = 0, 1, 2, 3, 4, 5, 6
OUTCOME_COLUMNS = 7  # six scalar columns, and room for one more emitted token than a tree has nodes


def outcome_width(max_nodes: int, logprobs: int | None) -> int:
    """Columns a round needs: logprobs None (not requested) or k, the top alternatives per token."""
    width = OUTCOME_COLUMNS + max_nodes
    return width if logprobs is None else width + (max_nodes + 1) * (1 + 2 * logprobs)


def pack_outcome(outcome: RoundOutcome, buffer: torch.Tensor) -> None:
    """Write a RoundOutcome into the preallocated int64 buffer [B, outcome_width(...)] (no sync)."""
    buffer[:, N_ACCEPTED].copy_(outcome.n_accepted)
    buffer[:, N_DRAFTED].copy_(outcome.n_drafted)
    buffer[:, DRAFT_DEPTH].copy_(outcome.draft_depth)
    if outcome.plan is not None:
        buffer[:, PLAN].copy_(outcome.plan)
    P = outcome.emitted.shape[1]
    buffer[:, EMITTED: EMITTED + P].copy_(outcome.emitted)
    lp = outcome.logprobs
    if lp is None:
        buffer[:, LOGPROB_K].fill_(0)
        return
    B, k = buffer.shape[0], lp.top_ids.shape[-1]
    at = buffer.shape[1] - P * (1 + 2 * k)
    assert at >= EMITTED + P, "outcome buffer too narrow for the requested logprobs (Workspace.fit_outcome)"
    buffer[:, LOGPROB_K].fill_(k + 1)
    buffer[:, LOGPROB_AT].fill_(at)
    buffer[:, at: at + P].copy_(lp.chosen.double().view(torch.int64))
    buffer[:, at + P: at + P * (1 + k)].copy_(lp.top_ids.reshape(B, P * k))
    buffer[:, at + P * (1 + k):].copy_(lp.top.double().reshape(B, P * k).view(torch.int64))


def unpack_outcomes(buffer: torch.Tensor, has_plan: bool) -> list[RowOutcome]:
    """The round's one device-to-host copy: the buffer to one RowOutcome per batch row."""
    k1 = int(buffer[0, LOGPROB_K]) if buffer.shape[0] else 0  # the same for every row of a round
    at = int(buffer[0, LOGPROB_AT]) if k1 else buffer.shape[1]
    rows = []
    for values in buffer[:, :at].tolist():
        n_accepted = values[N_ACCEPTED]
        rows.append(RowOutcome(n_accepted=n_accepted, n_drafted=values[N_DRAFTED], draft_depth=values[DRAFT_DEPTH],
                               tokens=values[EMITTED: EMITTED + n_accepted + 1],
                               plan=values[PLAN] if has_plan else None))
    if k1:  # only the region at the end is read as floats (the buffer may be wider than this round's k needs)
        k, region = k1 - 1, buffer[:, at:]
        P = region.shape[1] // (1 + 2 * k)
        for row, ids, floats in zip(rows, region.tolist(), region.view(torch.float64).tolist()):
            n = row.n_accepted + 1
            row.logprobs = floats[:n]
            top_ids, top = ids[P: P * (1 + k)], floats[P * (1 + k):]
            row.top_logprobs = [list(zip(top_ids[j * k: (j + 1) * k], top[j * k: (j + 1) * k])) for j in range(n)]
    return rows


def host_logprobs(lp: TokenLogprobs) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """A TokenLogprobs on the host, per row: (chosen, top) lists over its P token slots (one sync)."""
    chosen, ids, top = lp.chosen.tolist(), lp.top_ids.tolist(), lp.top.tolist()
    return [(c, [list(zip(i, t)) for i, t in zip(row_ids, row_top)]) for c, row_ids, row_top in zip(chosen, ids, top)]


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
    slot_rounds: int = 0  # batch slots x rounds (padding and finished-but-frozen slots included)
    busy_slot_rounds: int = 0  # of those, slots whose row was still decoding
    prefill_chunks: int = 0  # chunked refills' passes (a chunk of their prompts' positions, between rounds)

    @property
    def occupancy(self) -> float:
        """Share of slot-rounds that did useful work (1.0 = no slot ever idled); 0 with no rounds."""
        return self.busy_slot_rounds / self.slot_rounds if self.slot_rounds else 0.0

    def __add__(self, other: EngineStats) -> EngineStats:
        return EngineStats(target_passes=self.target_passes + other.target_passes, rows=self.rows + other.rows,
                           draft_seconds=self.draft_seconds + other.draft_seconds,
                           verify_seconds=self.verify_seconds + other.verify_seconds,
                           other_seconds=self.other_seconds + other.other_seconds,
                           prefill_seconds=self.prefill_seconds + other.prefill_seconds,
                           warmup_seconds=self.warmup_seconds + other.warmup_seconds,
                           reference_seconds=self.reference_seconds + other.reference_seconds,
                           slot_rounds=self.slot_rounds + other.slot_rounds,
                           busy_slot_rounds=self.busy_slot_rounds + other.busy_slot_rounds,
                           prefill_chunks=self.prefill_chunks + other.prefill_chunks)


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

    def flush(self, stats: EngineStats, upto: int | None = None) -> None:
        """Attribute the time between consecutive marks to the phase that started it (after a sync), up to mark
        `upto` (a `len(marks)` taken before later work was queued: that work is still running; default: the last)."""
        n = len(self.marks) - 1 if upto is None else upto
        if self.cuda and self.marks:
            self.marks[n][1].synchronize()  # a no-op after the round's sync; needed at the end of generate()
        spent = dict.fromkeys(self.PHASES, 0.0)
        for (phase, start), (_, end) in zip(self.marks[:n], self.marks[1 : n + 1]):
            spent[phase] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        stats.prefill_seconds += spent["prefill"]
        stats.draft_seconds += spent["draft"]
        stats.verify_seconds += spent["verify"]
        stats.other_seconds += spent["other"]
        stats.reference_seconds += spent["reference"]
        self.marks = self.marks[n:]
