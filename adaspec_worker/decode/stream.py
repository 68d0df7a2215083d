"""The decode loop over a stream of rows: continuous batching across whatever the caller feeds.

    stream = engine.stream(source, slots=64)      # source(wait) -> [Request, ...] | [] (none yet) | None (no more)
    for finished in stream:                       # Finished(tag, group, completion), as rows finish
        ...
    stream.stats, stream.take_group(group)        # the whole stream's EngineStats; one group's (a shard's)
    stream.started                                # groups with a row that entered a slot

The engine keeps B slots and a queue of pending rows. When rows finish, their slots are prefilled with
the next pending rows while the other slots keep decoding; when the queue is empty the source is asked
(without waiting) for more, as it is in every round with a free slot, so a caller can append the next
shard's rows while the current shard's last rows decode. Refilled rows whose prompts have more than
`prefill_chunk` positions to prefill form a chunked refill (`prefill.ChunkedPrefill`): one chunk runs after each
round and its slots stay frozen until the last. One loads at a time, and the batch does not shrink under it; rows
with shorter prompts still join at once; when nothing else decodes, its chunks run back to back. Only when nothing
decodes and nothing is pending does the stream wait on the source; None from it ends the stream.
`Engine.generate` is this loop over a source that hands over its prompts once.

Rows are admitted in the order they arrive. A row joins the running batch only when its SamplingParams
equal the batch's (the sampling rule is baked into captured graphs, and max_new_tokens sizes the cache),
its prompt fits the batch's cache, and the batch has its full width (a batch shrunk while the queue was
empty drains first, then a full one starts); otherwise the batch drains and a new one starts with it.
Each row carries its own seed, stop rule and sampling, so its tokens depend only on its prompt and seed,
never on its companions or on when it was admitted.

Accounting by group (`Request.group`, a shard for the worker): a round's busy slot-rounds count to their
rows' groups, its idle ones (padding, finished rows frozen in their slot) to the oldest group with a row
in the round (the one whose tail holds the batch); its time (prefills included) is split by busy slots;
its target pass counts once for every group with a row in it. A group's stats are final once its last
row has been handed out. Warm-up (compiling, graph capture) is in the stream's total only.

Knows nothing of shards, tokenizers, Ray or Parquet; the engine's round mechanics live in engine.py.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch, Completion, Outputs, Request, on_device
from .proposers.base import Landed
from .stats import EngineStats, PhaseClock

# the phases a round's time is split into (the oracle's uncharged reference work included)
TIMES = ("prefill_seconds", "draft_seconds", "verify_seconds", "other_seconds", "reference_seconds")

Source = Callable[[bool], "list[Request] | None"]  # (wait) -> new rows ([]: none yet), or None: no more, ever


@dataclass
class Flight:
    """A launched round: its outcome on its way to the host."""

    origin: list[int]  # [B] each slot's prompt when the round was launched (slots may be re-pointed before it lands)
    shape: tuple  # the proposer's plan_key at launch: which of its shapes the round ran
    host: torch.Tensor  # [B, columns] the outcome's host copy (pinned on CUDA), laid out by stats.py
    done: torch.cuda.Event | None  # recorded after the copy (CUDA)
    warm: float  # the engine's warm-up seconds (compile + capture) when its launch began


def slack(proposer) -> int:
    """Cache slots a row needs past its prompt and max_new_tokens: it may commit up to a whole tree past
    max_new_tokens in its last round, one more round is launched before its end is seen, and once frozen in its
    slot it still has the next tree written after it."""
    return 3 * proposer.max_nodes + 1


@dataclass
class Finished:
    """A row the stream is done with."""

    tag: Any
    group: Hashable
    completion: Completion


def once(requests: list[Request]) -> Source:
    """A source that hands over `requests` at its first call and then ends."""
    pending = [requests]

    def source(wait: bool) -> list[Request] | None:
        return pending.pop() if pending else None

    return source


class Stream:
    """One pass of the decode loop over `source`'s rows, through `slots` slots (iterate it once)."""

    def __init__(self, engine, source: Source, slots: int, refill: bool = True,
                 prefill_chunk: int = 0):  # engine: engine.Engine
        assert slots >= 1, f"slots must be >= 1, got {slots}"
        assert prefill_chunk >= 0, f"prefill_chunk must be >= 0, got {prefill_chunk}"
        self.engine, self.source, self.width, self.refill = engine, source, slots, refill
        self.chunk = prefill_chunk  # a refill whose prompts are longer prefills this many positions per round
        self.loading = None  # the chunked refill in progress (prefill.Loading): its slots are reserved
        self.stats = EngineStats()  # the whole stream
        self.groups: dict[Hashable, EngineStats] = {}  # by group, oldest first, until taken
        self.pending: deque[int] = deque()  # row numbers, in arrival order
        self.requests: dict[int, Request] = {}  # pending rows
        self.outputs = Outputs()
        self.rows = 0  # row numbers handed out so far
        self.ended = False  # the source said no more
        self.started: set[Hashable] = set()  # groups with a row that entered a slot (the others are only queued)
        self.sampling = None  # the running batch's
        self.S = 0  # the running batch's cache positions per slot

    def take_group(self, group: Hashable) -> EngineStats:
        """A group's stats (final once its last row was handed out), and forget them."""
        return self.groups.pop(group, EngineStats())

    # ---- the source and the queue
    def _pull(self, wait: bool) -> None:
        if self.ended:
            return
        got = self.source(wait)
        if got is None:
            self.ended = True
            return
        limit = self.engine.target.cfg.max_position_embeddings
        for request in got:
            n, new = len(request.prompt), request.sampling.max_new_tokens
            assert n > 0, "every prompt needs at least one token"
            assert n + new <= limit, f"prompt ({n}) + max_new_tokens ({new}) exceeds the model's context {limit}"
            self.requests[self.rows] = request
            self.pending.append(self.rows)
            self.groups.setdefault(request.group, EngineStats())
            self.rows += 1

    def _slack(self) -> int:
        return slack(self.engine.proposer)

    def _admissible(self, batch: Batch) -> int:
        """How many rows at the head of the queue may join the running batch."""
        if len(batch.origin) < self.width:  # shrunk: drain it, then start a full one
            return 0
        n = 0
        for row in self.pending:
            r = self.requests[row]
            if r.sampling != self.sampling or len(r.prompt) + r.sampling.max_new_tokens + self._slack() > self.S:
                break
            n += 1
        return n

    def _take(self, n: int) -> tuple[list[int], dict[int, list[int]], dict[int, int]]:
        """The next n pending rows into Outputs: (rows, their prompts, their seeds)."""
        rows = [self.pending.popleft() for _ in range(n)]
        chosen = {row: self.requests.pop(row) for row in rows}
        for row, r in chosen.items():
            self.outputs.add(row, r)
            self.started.add(r.group)
        return rows, {row: r.prompt for row, r in chosen.items()}, {row: r.seed for row, r in chosen.items()}

    def _start(self) -> Batch:
        """A new batch from the head of the queue: its rows share the first one's sampling."""
        if len(self.pending) < self.width:
            self._pull(wait=False)  # whatever else has arrived, so that the batch starts as wide as it can
        head = self.requests[self.pending[0]]
        self.sampling = sampling = head.sampling
        same = []
        for row in self.pending:
            if self.requests[row].sampling != sampling:
                break
            same.append(row)
        longest = max(len(self.requests[row].prompt) for row in same)  # the queued rows fit, not only the first B
        self.S = longest + sampling.max_new_tokens + self._slack()
        rows, prompts, seeds = self._take(min(self.width, len(same)))
        batch = self.engine._start(prompts, rows, seeds, sampling, self.S, self.chunk)
        self.S = batch.workspace.S  # the workspace may be larger (fast: 256-position buckets)
        return batch

    # ---- the loop
    @torch.inference_mode()
    def __iter__(self) -> Iterator[Finished]:
        eng = self.engine
        clock = PhaseClock(eng.target.device)
        # the next round is launched before this one's host work when its shapes do not wait on this one's plan
        overlap = eng.overlap and not eng.proposer.returns_plan and eng.on_round is None
        batch, flight = None, None
        while True:
            if self.loading is not None and not batch.live(self.outputs):  # only a chunked refill left: finish it
                flight = None
                clock.mark("prefill")
                while not self._load_step(batch):
                    pass
                self.loading = None
                self._next_rows(batch, clock, shrink=True)
                clock.mark("other")
            if batch is None or not batch.live(self.outputs):  # nothing decoding: start a batch
                flight = None
                if not self.pending:
                    self._pull(wait=True)
                if not self.pending:
                    break
                clock.mark("prefill")
                batch = self._start()
            if flight is None:
                flight = eng._launch(batch, self.sampling, clock)
            ahead, upto = None, None
            if overlap:  # queued behind this round before the host waits on it: the GPU works while the host records
                upto = len(clock.marks)  # the round's time ends where the next one's begins
                ahead = eng._launch(batch, self.sampling, clock)
            outcomes = eng._land(flight, batch)
            spent = EngineStats()
            clock.flush(spent, upto)
            # no compile or capture inside `spent` (from this round's launch to the next one's, or to now)
            timed = (ahead.warm if ahead is not None else eng.warmup_seconds) == flight.warm
            live = [row if self.outputs.running(row) else -1 for row in flight.origin]  # [B] -1: none decoding
            seconds = self._account(live, spent)
            eng.proposer.landed(Landed(origin=live, shape=flight.shape, outcomes=outcomes,
                                       seconds=seconds if timed else None, lag=1 if ahead is None else 2))
            ended = self.outputs.record(flight.origin, outcomes)
            flight = ahead
            if ended:
                done = {e.row for e in ended}
                slots = [i for i, row in enumerate(batch.origin) if row in done]  # where they sit now
                batch.workspace.alive[on_device(slots, eng.target.device)] = False  # frozen from now on
                self._next_rows(batch, clock, shrink=True)
            elif self.refill and not self.ended and self._busy(batch) < self.width <= len(batch.origin):
                self._next_rows(batch, clock, shrink=False)  # free slots: rows the source has since handed over
            if self.loading is not None:  # a chunked refill's next chunk, queued behind the round launched ahead
                clock.mark("prefill")
                seated = self._load_step(batch)
                clock.mark("other")
                if seated:
                    self.loading = None
                    self._next_rows(batch, clock, shrink=True)  # slots freed while it loaded
            if not batch.live(self.outputs):
                flight = None  # the round launched ahead has no row left to serve
            for e in ended:
                self.stats.rows = self.stats.rows + e.completion.stats
                self.groups[e.request.group].rows = self.groups[e.request.group].rows + e.completion.stats
                yield Finished(e.request.tag, e.request.group, e.completion)
        clock.mark("other")
        clock.flush(self.stats)
        self.stats.warmup_seconds, eng.warmup_seconds = eng.warmup_seconds, 0.0

    def _load_step(self, batch: Batch) -> bool:
        """The chunked refill's next chunk (counted for its rows' groups too); True once its rows took their slots."""
        self.stats.prefill_chunks += 1
        for group in {self.outputs.rows[row].request.group for row in self.loading.rows}:
            self.groups[group].prefill_chunks += 1
        return self.engine._load_step(batch, self.loading, self.sampling)

    def _busy(self, batch: Batch) -> int:
        """Slots decoding a row or reserved by the chunked refill in progress."""
        return len(batch.live(self.outputs)) + (len(self.loading.slots) if self.loading is not None else 0)

    def _long(self, prompt: list[int]) -> bool:
        """A prompt that prefills in chunks (more than `chunk` positions before its last token)."""
        return bool(self.chunk) and len(prompt) - 1 > self.chunk

    def _next_rows(self, batch: Batch, clock: PhaseClock, shrink: bool) -> None:
        """Refill free slots from the queue (asking the source when it is empty); after rows finished (`shrink`),
        drop them instead when no row may take their slots. Rows whose prompts have more than `chunk` positions
        become a chunked refill (the loop runs a chunk per round), one at a time: while it loads, only the rows
        ahead of the next long one may join (prefilled at once), and the batch does not shrink."""
        if not self.pending:
            self._pull(wait=False)
        fits = self._admissible(batch)
        if self.loading is not None:
            fits = next((i for i, row in enumerate(list(self.pending)[:fits]) if self._long(self.requests[row].prompt)),
                        fits)
        room = min(fits, self.width - self._busy(batch))  # rows that may start now
        if self.refill and fits and room >= min(fits, max(1, self.width // self.engine.refill_every)):
            clock.mark("prefill")
            reserved = set(self.loading.slots) if self.loading is not None else set()
            free = [i for i, row in enumerate(batch.origin) if not self.outputs.running(row) and i not in reserved]
            rows, prompts, seeds = self._take(room)
            long = [row for row in rows if self._long(prompts[row])]
            short = [row for row in rows if not self._long(prompts[row])]
            if short:
                self.engine._refill(batch, free[: len(short)], short, prompts, seeds, self.sampling)
            if long:
                self.loading = self.engine._begin_load(batch, free[len(short): room], long, prompts, seeds, self.chunk)
            clock.mark("other")
        elif shrink and self.loading is None and (not self.refill or not fits):
            self.engine._shrink(batch, self.outputs)

    def _account(self, live: list[int], spent: EngineStats) -> float:
        """A landed round (live [B]: each slot's row, -1 where none was decoding; and the time since the last round,
        `spent`) into the stream's and its groups' stats; returns the round's draft + verify + host seconds."""
        total = self.stats
        total.target_passes += 1
        total.slot_rounds += len(live)
        busy = Counter(self.outputs.rows[row].request.group for row in live if row >= 0)
        total.busy_slot_rounds += sum(busy.values())
        for key in TIMES:
            setattr(total, key, getattr(total, key) + getattr(spent, key))
        seconds = spent.draft_seconds + spent.verify_seconds + spent.other_seconds
        n = sum(busy.values())
        if not n:
            return seconds
        oldest = next(g for g in self.groups if g in busy)
        for group, k in busy.items():
            g = self.groups[group]
            g.target_passes += 1
            g.busy_slot_rounds += k
            g.slot_rounds += k + (len(live) - n if group == oldest else 0)
            for key in TIMES:  # the round's time split by busy slots
                setattr(g, key, getattr(g, key) + getattr(spent, key) * k / n)
        return seconds


class CallStream:
    """`Stream`'s interface for an engine with `generate` only (transformers' fallback): each run of arrived rows
    with one sampling, stop rule and group decodes in one generate() call (no slot is shared across runs; prompts
    prefill whole, so `prefill_chunk` is ignored)."""

    def __init__(self, engine, source: Source, slots: int, refill: bool = True, prefill_chunk: int = 0):
        self.engine, self.source, self.width, self.refill = engine, source, slots, refill
        self.stats = EngineStats()
        self.groups: dict[Hashable, EngineStats] = {}
        self.started: set[Hashable] = set()

    def take_group(self, group: Hashable) -> EngineStats:
        return self.groups.pop(group, EngineStats())

    def __iter__(self) -> Iterator[Finished]:
        pending: deque[Request] = deque()
        while True:
            if not pending:
                got = self.source(True)
                if got is None:
                    return
                pending.extend(got)
                continue
            head = pending[0]
            run = []
            while pending and (pending[0].sampling, pending[0].stop_fn, pending[0].group) == (
                    head.sampling, head.stop_fn, head.group):
                run.append(pending.popleft())
            self.started.add(head.group)
            fn = head.stop_fn
            stop = None if fn is None else (lambda i, toks, run=run, fn=fn: fn(run[i].tag, toks))
            done, stats = self.engine.generate([r.prompt for r in run], head.sampling, [r.seed for r in run], stop,
                                               slots=self.width, refill=self.refill)
            self.stats = self.stats + stats
            self.groups[head.group] = self.groups.get(head.group, EngineStats()) + stats
            for r, completion in zip(run, done):
                yield Finished(r.tag, r.group, completion)
