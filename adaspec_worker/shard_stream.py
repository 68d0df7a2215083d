"""The worker's device stage: the shards' rows through one engine stream, each shard handed on when its rows are done.

`ShardStream(worker)` is the pipeline's `stream=` (pipeline.py): it takes a shard from the feed when the
engine has room for more rows, so while shard k's last rows decode, the slots they free take shard k+1's
rows (when the read stage has them), and hands the shards back in the order it took them, each as soon as
its rows are done. A shard's rows enter as one `Request` each: its own seed, sampling (the group's largest
log-probability count, as before) and stop strings; the engine admits rows with equal SamplingParams
together (rows of a shard grouped by settings, shortest prompts first) and drains the batch before a row
whose SamplingParams differ. A row's tokens depend only on its prompt and seed (decode/stream.py).

Per-shard records, since shards share rounds:
- engine counters by slot-rounds (decode/stream.py): its rows' busy slot-rounds, the idle ones of rounds in
  which it was the oldest shard, its share of each round's time by busy slots, every pass it had a row in;
- `wall_seconds` (and GPU/CPU seconds, energy): the device's time from the previous shard's hand-off (or
  this shard's start, if later) to this one's, so shards never count the same device second twice;
  `stages.decode` is the span from its first rows' entry to its hand-off (overlapping its neighbours').
The measured baseline runs at the hand-off on the baseline's own engines (tuning.Baseline). Autotune (once
per actor) runs before a stream starts: a shard that needs it waits until the running stream drains.

Failures: a shard whose setup or records fail fails alone; if the engine fails, the shards with unfinished rows
in its slots fail with its error, the ones already finished are handed on, and a new stream starts with the
shards behind them (those only queued in the engine first): no row is lost or decoded twice.

Knows nothing of Ray or storage; the worker owns the models and the writer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from jobs.inputs import is_jsonl
from jobs.layout import Commit, ErrorRow, OutputRow
from jobs.shard_stats import ShardStats

from .decode.batch import Completion, Request
from .decode.stats import EngineStats
from .decode.stream import Source
from .pipeline import Failed, Feed, Item
from .rows import group_logprobs

log = logging.getLogger("adarun.worker")


@dataclass
class Decoded:
    """A shard after the device stage: everything its commit writes."""

    outputs: list[OutputRow]
    errors: list[ErrorRow]
    stats: ShardStats
    commit: Commit
    carried: object  # pyarrow Table of carried input columns, or None
    metadata: dict
    logprobs: bool  # the log-probability columns: when the job asks, and always for OpenAI batch lines (null where
    # a line did not ask), so every shard of one file has one schema


@dataclass
class _Open:
    """A shard the stream has taken and not yet handed on."""

    item: Item
    key: int  # its group in the engine's stream
    requests: list[Request]
    t0: float  # perf_counter when its rows were handed to the engine
    started: float  # unix time of the same
    completions: dict[int, Completion] = field(default_factory=dict)  # by sample index in the shard
    stats: EngineStats | None = None  # the engine's, once its last row is done
    error: BaseException | None = None  # its setup failed
    warmup: float = 0.0  # seconds of engine warm-up (`decode/warmup.py`) before its stream, inside its decode span

    @property
    def left(self) -> int:
        return 0 if self.error is not None else len(self.requests) - len(self.completions)


class ShardStream:
    def __init__(self, worker, drill: Callable[[int, int], None] | None = None, warm_up: bool | None = None):
        self.w = worker  # the ShardWorker: manifest, engine, codec, baseline, energy meter, actor info
        self.drill = drill  # (shard index, attempt) once a shard is the oldest on the device: the worker's fault drill
        self.warm_up = warm_up  # warm the engine up before a stream (`_warm`); None: where its rounds are CUDA graphs
        self.shards: deque[_Open] = deque()  # taken, not handed on, in order
        self.held: Item | None = None  # a shard that must start a fresh stream (autotune)
        self.keys = 0
        self.stops: dict[tuple, object] = {}  # stop strings -> the engine's stop rule (one per rule: batched checks)
        self.handoff, self.handoff_energy = 0.0, None  # the last hand-off: perf_counter, energy reading

    def __call__(self, feed: Feed) -> Iterator[tuple[Item, Decoded | Failed]]:
        self.shards.clear()
        self.held = None
        res = self.w.m.resources
        first: list[list[Request]] = []  # rows for the next stream before any from the feed
        while True:
            if not first and self.held is None:  # the engine is idle: wait for a shard before starting a stream
                self.held = feed.take(wait=True)
                if self.held is None:
                    return  # a call to run on the device thread, or the end
            if self.held is not None:
                shard = self._open(self.held)  # autotune runs here, before the stream that decodes with its choice
                self.held = None
                self.shards.append(shard)
                if not shard.left:  # no rows (or its setup failed): handed on at once
                    yield from self._flush()
                    continue
                first.append(shard.requests)
            self._warm(first)
            run = self.w.engine.stream(self._source(feed, first), res.batch_size, res.continuous_batching,
                                       res.prefill_chunk)
            first = []
            try:
                for finished in run:
                    shard = next(s for s in self.shards if s.key == finished.group)
                    shard.completions[finished.tag] = finished.completion
                    if not shard.left:
                        shard.stats = run.take_group(shard.key)
                    yield from self._flush()
            except Exception as e:  # the engine failed: the shards with rows in its slots fail, the ones done go
                for shard in self.shards:  # on, and the ones only queued in it go into the next stream
                    if shard.left and shard.key in run.started:
                        shard.error = e
                    elif shard.left:
                        first.append(shard.requests)
            yield from self._flush()
            if feed.ended and self.held is None and not self.shards:
                return

    def _warm(self, first: list[list[Request]]) -> None:
        """Before a stream: the engine's round shapes captured and timed (`decode/warmup.py`) for the job's slots,
        the first rows' sampling rule and the longest prompt queued with them (once per actor and setting while the
        workspace fits; the seconds are the newest shard's `stages.warmup`). A failed warm-up is logged, not fatal:
        the stream captures on first use as it would without one. By default only where rounds are CUDA graphs: on
        a CPU nothing is captured, and timing every shape (8 s of the CPU quickstart's 25) costs more than it saves."""
        from .decode.warmup import warm

        if not (self.warm_up if self.warm_up is not None else getattr(self.w.engine, "graphs_on", False)):
            return
        rule = first[0][0].sampling
        longest = max(len(r.prompt) for rows in first for r in rows if r.sampling == rule)
        try:
            self.shards[-1].warmup += warm(self.w.engine, self.w.m.resources.batch_size, rule, longest)
        except Exception as e:  # an optimisation: the shards decode without it
            log.warning("engine warm-up failed, decoding without it: %s: %s", type(e).__name__, e)

    def _source(self, feed: Feed, first: list[list[Request]]) -> Source:
        """The engine's source: `first`, then the next shard's rows when it asks (one shard at a time)."""
        pending = list(first)

        def source(wait: bool) -> list[Request] | None:
            if pending:
                return pending.pop(0)
            while True:
                if wait and self.shards:
                    return None  # the engine is idle and finished shards wait: end this stream to hand them on
                item = self.held or feed.take(wait)
                self.held = None
                if item is None:
                    return None if wait or feed.ended else []
                if self._autotunes(item):
                    self.held = item  # this stream drains, the next one starts after autotune
                    return None
                shard = self._open(item)
                self.shards.append(shard)
                if shard.left:
                    return shard.requests

        return source

    def _flush(self) -> Iterator[tuple[Item, Decoded | Failed]]:
        """The shards at the head whose rows are all done, in order."""
        while self.shards and not self.shards[0].left:
            shard = self.shards.popleft()
            if shard.error is not None:
                yield shard.item, Failed(shard.error)
            else:
                try:
                    decoded = self._finish(shard)
                except Exception as e:  # its records failed: this shard alone
                    decoded = Failed(e)
                yield shard.item, decoded
            if self.shards:
                self._drill(self.shards[0])

    def _drill(self, shard: _Open) -> None:
        """The fault drill, when a shard becomes the oldest on the device (the one a crash is charged to)."""
        if self.drill is not None:
            job = shard.item.payload
            self.drill(job.shard.index, job.attempt)

    def _autotunes(self, item: Item) -> bool:
        m = self.w.m
        return bool(m.speculative.autotune.enabled and self.w.autotune is None and item.value.good)

    def _open(self, item: Item) -> _Open:
        """A shard's setup (autotune, once per actor) and its rows as the engine's requests."""
        from .decode.cost import CostModel
        from .tuning import autotune

        w, p = self.w, item.value
        self.keys += 1
        shard = _Open(item, self.keys, [], time.perf_counter(), time.time())
        try:
            if self._autotunes(item):
                a = w.m.speculative.autotune
                cost = CostModel.from_json(w.cost_model) if w.cost_model else None
                w.engine, w.autotune = autotune(w.engine, p.good, w.sp, a.fraction, w.m.resources.batch_size, cost)
                w.autotune["cost_model"] = w.cost_model is not None
                w.baseline.follow(w.engine, cost)
            shard.requests = self._requests(p.good, shard.key)
        except Exception as e:
            shard.error = e
        if not self.shards:  # the device was idle until now: this shard's device time starts here
            self.handoff, self.handoff_energy = shard.t0, w.energy.read()
            self._drill(shard)
        return shard

    def _requests(self, rows: list, key: int) -> list[Request]:
        """Samples as requests, tagged by their index in the shard: grouped by settings (each group asks for its
        largest log-probability count; each row keeps its own), shortest prompts first."""
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(rows):
            groups.setdefault(r.settings.batch_key, []).append(j)
        out = []
        for members in groups.values():
            order = sorted(members, key=lambda j: len(rows[j].tokens))  # similar lengths batch together
            st = rows[order[0]].settings
            sp = dataclasses.replace(rows[order[0]].sp, logprobs=group_logprobs([rows[j].settings for j in order]))
            if st.stop not in self.stops:
                self.stops[st.stop] = self.w.codec.stop_fn(st.stop)
            out += [Request(rows[j].tokens, sp, rows[j].seed, self.stops[st.stop], tag=j, group=key) for j in order]
        return out

    def _finish(self, shard: _Open) -> Decoded:
        """A shard whose rows are done: its outputs in input order, the baseline, its records."""
        w, m = self.w, self.w.m
        job, p = shard.item.payload, shard.item.value
        sh, good, errors = job.shard, p.good, p.errors
        outputs = []
        for j, r in enumerate(good):
            c = shard.completions[j]
            st = r.settings
            logprobs, top = st.trim_logprobs(c.logprobs, c.top_logprobs)
            outputs.append(OutputRow(r.id, r.prompt, w.codec.text(c.tokens, st.stop), len(r.tokens), len(c.tokens),
                                     c.finish_reason, r.sample_index, logprobs,
                                     None if top is None else w.codec.top_logprobs(top)))
        baseline = w.baseline.run([r for r in good if r.sample_index == 0])
        proposer = getattr(w.engine, "proposer", None)  # the transformers fallback has none
        if proposer is not None:
            proposer.persist()  # state the method keeps with the job (token-recycling matrix, datastore)
        now, energy = time.perf_counter(), w.energy.read()
        wall = now - max(shard.t0, self.handoff)  # the device's time on this shard, shared rounds split at hand-offs
        kwh = w.energy.kwh(self.handoff_energy, energy)
        self.handoff, self.handoff_energy = now, energy
        es, res = shard.stats or EngineStats(), m.resources
        seq = es.rows
        stats = ShardStats(
            rounds=seq.rounds, drafted_tokens=seq.drafted, accepted_tokens=seq.accepted,
            accepted_by_depth=dict(seq.accepted_by_depth), draft_lengths=dict(seq.draft_lengths),
            draft_seconds=es.draft_seconds, verify_seconds=es.verify_seconds,
            other_seconds=es.other_seconds + es.prefill_seconds, target_passes=es.target_passes,
            slot_rounds=es.slot_rounds, busy_slot_rounds=es.busy_slot_rounds, prefill_chunks=es.prefill_chunks,
            baseline=baseline, shard=sh.index, attempt=job.attempt, rows=len(outputs), error_rows=len(errors),
            errors=[e.error for e in errors][:20], prompt_tokens=sum(o.num_prompt_tokens for o in outputs),
            completion_tokens=sum(o.num_completion_tokens for o in outputs), wall_seconds=wall,
            started_at=shard.started, finished_at=time.time(), gpu_seconds=wall * res.gpus_per_worker,
            cpu_seconds=wall * res.cpus_per_worker, method=m.speculative.method, params=m.speculative.params,
            energy_kwh=kwh, autotune=w.autotune, cost_model=w.cost_model,
            stages={"read": p.read_seconds, "queued": max(shard.t0 - p.read_done, 0.0), "decode": now - shard.t0,
                    **({"warmup": shard.warmup} if shard.warmup else {})},
            **w.info(),
        )
        carried = p.data.carried.take([r.input_index for r in good]) if p.data.carried is not None else None
        meta = {"model": m.model.target, "draft": m.model.draft or "", "method": m.speculative.method,
                "params": json.dumps(m.speculative.params, sort_keys=True), "job_hash": w.job_hash,
                "config_hash": m.config_hash()}
        commit = Commit(shard=sh.index, rows=len(outputs), error_rows=len(errors), attempt=job.attempt,
                        config_hash=m.config_hash())
        logprobs = bool(m.decoding.logprobs or m.decoding.top_logprobs or is_jsonl(sh.file))
        return Decoded(outputs, errors, stats, commit, carried, meta, logprobs)
