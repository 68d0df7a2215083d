"""The engine: prefill, then rounds of propose -> verify (one target pass) -> commit, over batch slots.

`Engine.stream(source, slots)` decodes rows as a source hands them over (the worker's shards, one after
another: `stream.py` holds that loop); `Engine.generate(prompts, sampling params, seeds, slots=...)` is the
same loop over a list of prompts. Rows decode through B batch slots; each row has its own committed length,
accepted count per round and random stream. With continuous batching (`refill`, the default) a slot whose
row finishes is prefilled with the next queued row at once (a long prompt a chunk of positions per round,
`prefill.py`) while the other slots keep decoding; without it the slots are filled batch by batch and a
finished row only leaves the batch (which shrinks through static sizes, `batch.shrunk`). Either way a row's
tokens depend only on its prompt and seed. Plain autoregressive decoding is the same loop with an empty draft
(the `none` method), so every speedup is measured against the same code. Each round ends with one
device-to-host copy (a `RoundOutcome`, laid out by `stats.py`; with the emitted tokens' log-probabilities when
`SamplingParams.logprobs` asks, `logprobs.py`).

The engine receives built parts: a target, a proposer and, when the method drafts, a drafter
(`build.py` makes them from a method spec and model paths). It knows nothing of method names, file
formats, tokenization (stop strings arrive as a callback), Ray or Parquet. Slot bookkeeping lives in
`batch.py`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from .batch import (
    Batch,
    Completion,
    Outputs,
    Request,
    StagedRefill,
    StopFn,
    Workspace,
    bucket,
    on_device,
    padding,
    shrunk,
)
from .drafters import Drafter
from .logprobs import path_logprobs
from .model import CausalLM, compiled
from .prefill import ChunkedPrefill, Loading, Prefilled, prefill_batch, prefill_target, right_padded
from .proposers.base import BatchInfo, Proposer, RoundInput
from .sampling import SamplingParams
from .settle import SlotState, compiled_pack, compiled_settle, compiled_tree_pass, settle, verify_round
from .stats import EngineStats, PhaseClock, RoundOutcome, RowOutcome, pack_outcome, unpack_outcomes
from .stream import Flight, Source, Stream, once
from .trees import DraftTree, tree_pass

RoundHook = Callable[[torch.Tensor, torch.Tensor, DraftTree], None]  # (ldlp_feat [B, 2H], n_accepted [B], tree)


class Engine:
    def __init__(self, target: CausalLM, proposer: Proposer, drafter: Drafter | None = None,
                 on_round: RoundHook | None = None, fast: bool = True):
        kind = proposer.spec.drafter_kind
        if kind is not None and drafter is None:
            raise ValueError(f"method {proposer.spec.name!r} needs a {kind} drafter (model.draft)")
        self.target = target
        self.proposer = proposer
        self.drafter = drafter if kind is not None else None
        self.on_round = on_round  # label collection (fit-ldlp); switches CUDA graphs off
        self.fast = fast  # static batch buckets, plus CUDA graphs on CUDA
        self.workspace: Workspace | None = None
        self.warmup_seconds = 0.0  # compile + capture, accumulated since the last generate() reported it
        # continuous batching refills once 1/refill_every of the slots are free: one prefill call serves several
        # rows (a prefill costs about a round), and occupancy stays above ~1 - 1/(2 * refill_every). 16 since prefills
        # are compiled (at 8, 64 slots ran at occupancy 0.88-0.90 on an H100: bench/results/h100-fast-attention)
        self.refill_every = 16
        # launch round r+1 before the host waits on round r (CUDA: the host's work, r's record and r+1's launch, hides
        # behind the GPU's; each row costs one wasted round at its end; on CPU nothing runs concurrently, so off
        # unless a test asks)
        self.overlap = target.device.type == "cuda"
        # where the target is compiled, so are a round's small ops (ADARUN_COMPILE_ROUND=0: plain ops, for comparison)
        whole = fast and target._compiled is not None and os.environ.get("ADARUN_COMPILE_ROUND", "1") != "0"
        self._settle, self._tree_pass, self._pack = settle, tree_pass, pack_outcome
        self._catch_up, self._compiled_propose = self._extend_drafter, None
        if whole:
            self.compile_round()

    def compile_round(self) -> None:
        """A round's small ops through torch.compile, so they fuse around the compiled model passes: the tree's
        positions and mask, the bookkeeping after the target pass (`settle`), the drafter's catch-up, the outcome's
        packing and a traceable proposer's tree building (run eagerly, each costs a few kernels per round). Done
        by the constructor where the target is compiled (CUDA); tests call it on the CPU."""
        self._settle, self._tree_pass, self._pack = compiled_settle(), compiled_tree_pass(), compiled_pack()
        self._catch_up = compiled(self._extend_drafter)
        if self.proposer.traceable:
            self._compiled_propose = self.proposer.compile_propose(compiled)

    @property
    def spec(self):
        """The method spec this engine runs."""
        return self.proposer.spec

    @property
    def ldlp(self):
        """The LDLP the proposer reads, or None."""
        return self.proposer.ldlp

    @property
    def graphs_on(self) -> bool:
        return self.fast and self.target.device.type == "cuda" and self.proposer.graphable and self.on_round is None

    def _workspace(self, B: int, S: int) -> Workspace:
        """Buffers for B rows of S slots. Fast: grown only (rows and 256-slot capacity buckets), never shrunk, so
        the graphs captured over it survive from one generate() call to the next."""
        work = self.workspace
        if self.fast:
            S = -(-S // 256) * 256
            if work is not None and work.B_cap >= B and work.S >= S:
                work.view(B)
                return work
            if work is not None:
                B, S = max(B, work.B_cap), max(S, work.S)
        elif work is not None and work.B_cap >= B and work.S == S:
            work.view(B)
            return work
        work = self.workspace = Workspace(self.target, B, S, self.proposer.max_nodes)
        return work

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int] | None = None,
                 stop_fn: StopFn | None = None, slots: int | None = None, refill: bool = True,
                 prefill_chunk: int = 0) -> tuple[list[Completion], EngineStats]:
        """Decode every prompt to completion; one Completion per prompt, in order, and the call's stats.

        slots: rows decoded at once (default: all prompts); refill: a finished row's slot takes the next
        queued prompt at once (continuous batching) rather than when the whole batch is done; prefill_chunk: a
        refill's prompts longer than this prefill that many positions per round while the other slots decode
        (0: at once). stop_fn is called with the prompt's index. A stream (`stream`) over these prompts, handed
        over at once."""
        n = len(prompts)
        assert n > 0, "generate() needs at least one prompt"
        seeds = list(seeds) if seeds is not None else [0] * n
        requests = [Request(p, sampling, seed, stop_fn, tag=i) for i, (p, seed) in enumerate(zip(prompts, seeds))]
        run = self.stream(once(requests), n if slots is None else max(1, min(slots, n)), refill, prefill_chunk)
        done: list[Completion | None] = [None] * n
        for finished in run:
            done[finished.tag] = finished.completion
        return done, run.stats

    def stream(self, source: Source, slots: int, refill: bool = True, prefill_chunk: int = 0) -> Stream:
        """Decode rows as `source` hands them over (it may grow while decoding), `slots` at a time; iterate the
        result for each row's Completion as it finishes (`stream.py`)."""
        return Stream(self, source, slots, refill, prefill_chunk)

    def _start(self, prompts: dict[int, list[int]], take: list[int], seeds: dict[int, int], sampling: SamplingParams,
               S: int, chunk: int = 0) -> Batch:
        """A fresh batch for rows `take` (prompts and seeds by row): padded to its bucket, proposer begun, target
        and drafter prefilled into the workspace's caches: with CUDA graphs, over prompts padded to a multiple of
        `StagedRefill.STEP` tokens in fixed buffers, one graph per batch size and prompt width (an uncaptured
        compiled pass spends milliseconds launching its kernels); `chunk` positions per pass, back to back, when a
        prompt has more (the passes' masks stay [B, chunk, S] however long the prompts)."""
        device, n = self.target.device, len(take)
        B = bucket(n) if self.fast else n
        chosen = [prompts[i] for i in take]
        padded = chosen + [chosen[0]] * (B - n)  # padding slots start dead
        longest = max(map(len, padded))
        work = self._workspace(B, S)
        work.fit_outcome(sampling.logprobs)
        self.proposer.begin(BatchInfo(B=B, device=device, sampling=sampling, prompts=padded))
        drafting = self.drafter is not None and self.proposer.drafting  # a call that backs off leaves it idle
        if drafting:
            self._begin_drafter(B)
        row_seeds = [seeds[i] for i in take] + [0] * (B - n)
        if chunk and longest - 1 > chunk:
            ids, lens = right_padded(padded, device)
            chunked = ChunkedPrefill(self.target, self.drafter if drafting else None, ids, lens, work.cache,
                                     self.drafter.cache if drafting else None, chunk)
            while not chunked.done:
                chunked.step()
            pre, draft = chunked.prefilled, chunked.draft
        else:
            drafter, W = self.drafter if drafting else None, StagedRefill.width(longest)
            if self.graphs_on and W <= work.S:  # fixed buffers: one graph per (batch size, prompt width)
                rows = work.stage(padded, W)  # [B, W + 1]
                pre = self._run(("prefill", B, W, drafting),
                                lambda: prefill_batch(self.target, drafter, rows[:, :W], rows[:, W], work.cache))
            else:
                pre = prefill_batch(self.target, drafter, *right_padded(padded, device), work.cache)
            draft = pre.draft
        work.root.copy_(pre.root)
        work.ldlp_feat.copy_(pre.ldlp_feat)
        work.seed.copy_(on_device(row_seeds, device))
        work.counter.zero_()
        work.alive.copy_(torch.arange(B, device=device) < n)
        if draft is not None:
            work.draft_logits.copy_(draft[0])
            if draft[1] is not None:
                work.draft_hidden.copy_(draft[1])
        batch = Batch(work, self.proposer, self.drafter if drafting else None,
                      origin=take + [-1 - i for i in range(B - n)])
        first_plan = self.proposer.first_plan(self._round_input(sampling))  # planning proposers: one sync of its own
        batch.plan = first_plan.tolist() if first_plan is not None else None
        return batch

    def _refill(self, batch: Batch, slots: list[int], take: list[int], prompts: dict[int, list[int]],
                seeds: dict[int, int], sampling: SamplingParams) -> None:
        """Continuous batching: prefill rows `take` into the free slots `slots` while the other slots keep
        their state; each new row starts exactly as it would in a batch of its own."""
        work, k = batch.workspace, len(take)
        chosen = [prompts[i] for i in take]
        drafting = self.drafter is not None and self.proposer.drafting
        if self.fast and StagedRefill.width(max(map(len, chosen))) <= work.S:  # CUDA: a captured graph
            index, seed, pre, draft = self._staged_prefill(chosen, slots, [seeds[i] for i in take], drafting)
        else:
            index, seed = on_device(slots, self.target.device), on_device([seeds[i] for i in take], self.target.device)
            ids, lens = right_padded(chosen, self.target.device)
            scratch = self.target.new_cache(k, work.S)  # the new rows' prefill, then copied into their slots
            pre = prefill_target(self.target, self.drafter, ids, lens, scratch)
            work.cache.load_rows(index, scratch)
            draft = self.drafter.admit(index, ids, lens, pre.features) if drafting else None
        self._seat(batch, slots, take, chosen, index, seed, pre, draft, sampling)

    def _begin_load(self, batch: Batch, slots: list[int], take: list[int], prompts: dict[int, list[int]],
                    seeds: dict[int, int], chunk: int) -> Loading:
        """Rows `take` to fill free slots `slots`, prefilled `chunk` positions per `_load_step` into scratch caches."""
        chosen, work, k = [prompts[i] for i in take], batch.workspace, len(take)
        ids, lens = right_padded(chosen, self.target.device)
        drafting = self.drafter is not None and self.proposer.drafting
        cache = work.scratch_cache("target", self.target.new_cache, k, ids.shape[1])  # seated: its positions only
        draft_cache = work.scratch_cache("drafter", self.drafter.new_cache, k, ids.shape[1]) if drafting else None
        prefill = ChunkedPrefill(self.target, self.drafter if drafting else None, ids, lens, cache, draft_cache, chunk)
        return Loading(slots=slots, rows=take, prompts=chosen, seeds=[seeds[i] for i in take], prefill=prefill)

    def _load_step(self, batch: Batch, loading: Loading, sampling: SamplingParams) -> bool:
        """The next chunk of a chunked refill; after its last, the rows take their slots. True once seated."""
        pre = loading.prefill
        if not pre.done:
            pre.step()
        if not pre.done:
            return False
        device = self.target.device
        index, seed = on_device(loading.slots, device), on_device(loading.seeds, device)
        batch.workspace.cache.load_rows(index, pre.cache)
        if pre.draft_cache is not None:
            self.drafter.cache.load_rows(index, pre.draft_cache)
        self._seat(batch, loading.slots, loading.rows, loading.prompts, index, seed, pre.prefilled, pre.draft, sampling)
        return True

    def _seat(self, batch: Batch, slots: list[int], take: list[int], chosen: list[list[int]], index: torch.Tensor,
              seed: torch.Tensor, pre: Prefilled, draft, sampling: SamplingParams) -> None:
        """Prefilled rows `take` start decoding in slots `slots` (`index` on the device): root, LDLP feature,
        seed, counter, the drafter's opinion (logits, hidden) at their last entry, the proposer's state."""
        work, k = batch.workspace, len(take)
        work.root[index] = pre.root[:k]
        work.ldlp_feat[index] = pre.ldlp_feat[:k]
        work.seed[index] = seed
        work.counter[index] = 0
        work.alive[index] = True
        if draft is not None:
            logits, hidden = draft
            work.draft_logits[index] = logits[:k]
            if hidden is not None:
                work.draft_hidden[index] = hidden[:k]
        self.proposer.admit(index, chosen)
        plan = self.proposer.first_plan(self._round_input(sampling)) if self.proposer.returns_plan else None
        batch.refill(slots, take, plan.tolist() if plan is not None else None)

    def _staged_prefill(self, chosen: list[list[int]], slots: list[int], seeds: list[int], drafting: bool):
        """A refill's prefills (target, and drafter when `drafting`) as one captured CUDA graph over fixed buffers
        (`batch.StagedRefill`), their caches' first k rows copied into `slots`. Returns the slots and seeds [k]
        (device views of the one copied block), the Prefilled and the drafter's (logits, hidden) of the padded
        batch (their first k rows are the refill's)."""
        work, k, W = self.workspace, len(chosen), StagedRefill.width(max(map(len, chosen)))
        kb = bucket(k)
        if work.staging is None or not work.staging.fits(work.B_cap, W):
            for key in [key for key in work.graphs if key[0] == "refill"]:  # captured over the old scratch caches
                del work.graphs[key]
            work.seen = {key for key in work.seen if key[0] != "refill"}
            work.staging = StagedRefill(self.target, work.B_cap, min(-(-W // 256) * 256, work.S))
        staging = work.staging
        if drafting and staging.draft_cache is None:
            staging.draft_cache = self.drafter.new_cache(work.B_cap, staging.cache.capacity)
        rows = staging.stage(chosen, slots, seeds, W)  # [kb, W + 3]
        ids, lens = rows[:, :W], rows[:, W]
        caches = [staging.cache] + ([staging.draft_cache] if drafting else [])
        for cache in caches:
            cache.view(kb)

        drafter, draft_cache = (self.drafter, staging.draft_cache) if drafting else (None, None)
        pre = self._run(("refill", kb, W, drafting),
                        lambda: prefill_batch(self.target, drafter, ids, lens, staging.cache, draft_cache))
        index = rows[:k, W + 1]
        for cache, main in zip(caches, [work.cache, self.drafter.cache if drafting else None]):
            cache.view(k)
            main.load_rows(index, cache)
        return index, rows[:k, W + 2], pre, pre.draft

    def _begin_drafter(self, B: int) -> None:
        """The drafter's cache for the workspace's slots (its first B rows empty)."""
        work, drafter = self.workspace, self.drafter
        if drafter.begin(work.B_cap, work.S + self.proposer.scratch):
            work.graphs.clear()  # graphs captured against the old drafter cache
            work.seen.clear()
        drafter.cache.view(B)
        drafter.cache.lens.zero_()

    def _launch(self, batch: Batch, sampling: SamplingParams, clock: PhaseClock) -> Flight:
        """Draft, one target pass with verification and commit, and the outcome's copy to the host, all queued on
        the device; `_land` waits for it."""
        # the sampling rule is baked into a captured graph (temperature, top-k/p are Python constants there)
        rule, warm = sampling.graph_key, self.warmup_seconds
        key = (batch.workspace.B, rule, tuple(self.proposer.plan_key(batch.plan)))
        if self.proposer.references:  # benchmark-only oracle: its reference verification is timed apart, uncharged
            clock.mark("reference")
            w = batch.workspace  # judge(tree): the round's own target pass and rule, nothing committed
            judge = lambda t: verify_round(t, self.target(t.tokens, t.positions(w.cache.lens), w.cache,  # noqa: E731
                                                          t.ancestors())[0], sampling, w.seed, w.counter)
            ref = lambda: self.proposer.reference(self._round_input(sampling), judge)  # noqa: E731
            batch.plan = self._run(("reference", w.B, rule), ref).tolist()
            key = (w.B, rule, tuple(self.proposer.plan_key(batch.plan)))
        clock.mark("draft")
        propose = self._compiled_propose or self.proposer.propose
        tree = self._run(("draft", *key), lambda: propose(self._round_input(sampling), batch.plan))
        clock.mark("verify")
        self._run(("verify", *key), lambda: self._verify_commit(tree, sampling))
        work = batch.workspace
        host = work.landing[work.flip][: work.B]  # [B, columns] alternating buffers: one landing, one in flight
        work.flip ^= 1
        host.copy_(work.outcome, non_blocking=True)
        done = None
        if host.is_pinned():
            done = torch.cuda.Event()
            done.record()
        clock.mark("other")
        return Flight(origin=list(batch.origin), shape=key[2], host=host, done=done, warm=warm)

    def _land(self, flight: Flight, batch: Batch) -> list[RowOutcome]:
        """The round's one device-to-host wait; the outcome per slot, and the proposer's plan into the batch."""
        if flight.done is not None:
            flight.done.synchronize()
        outcomes = unpack_outcomes(flight.host, self.proposer.returns_plan)
        if self.proposer.returns_plan:
            batch.plan = [row.plan for row in outcomes]
        return outcomes

    def _shrink(self, batch: Batch, outputs: Outputs) -> None:
        """Drop finished slots when the live rows fit a smaller static size (`shrunk`; or always, eager)."""
        alive = batch.live(outputs)
        if alive and (not self.fast or shrunk(len(alive)) < batch.workspace.B):
            n = shrunk(len(alive)) if self.fast else len(alive)
            batch.select(alive + padding(alive, n, len(batch.origin)))

    def _round_input(self, sampling: SamplingParams, target_logits: torch.Tensor | None = None) -> RoundInput:
        work = self.workspace
        return RoundInput(root=work.root, root_logits=work.draft_logits,
                          root_hidden=work.draft_hidden if self.drafter is not None else None, drafter=self.drafter,
                          sampling=sampling, seeds=work.seed, counter=work.counter, ldlp_feat=work.ldlp_feat,
                          target_logits=target_logits)

    def _run(self, key, fn):
        """fn() reads and writes workspace buffers only. On CUDA its second use captures a graph, later uses
        replay it."""
        work = self.workspace
        if not self.graphs_on:
            return fn()
        hit = work.graphs.get(key)
        if hit is not None:
            hit[0].replay()
            return hit[1]
        start = time.perf_counter()
        if key not in work.seen:  # first use runs eagerly (compiling where the model is compiled): the warm-up
            work.seen.add(key)
            out = fn()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=work.pool):
                out = fn()
            work.graphs[key] = (graph, out)
            graph.replay()
        torch.cuda.synchronize()
        self.warmup_seconds += time.perf_counter() - start
        return out

    def _verify_commit(self, tree: DraftTree, sampling: SamplingParams) -> None:
        """One target pass over the tree, then the round settled (`settle.py`: verification, KV compaction, next
        root / LDLP feature / counter, in place), drafter catch-up; the RoundOutcome packed into the workspace's
        outcome buffer."""
        work, target = self.workspace, self.target
        inputs = self._tree_pass(tree, work.cache.lens)
        tree = replace(tree, ancestry=inputs.mask)  # verification reads the same ancestry: made once a round
        logits, hidden, aux = target(tree.tokens, inputs.positions, work.cache, inputs.mask)
        before = work.ldlp_feat.clone() if self.on_round is not None else None  # the hook sees the round's features
        slots = SlotState(kv=work.cache.kv, lens=work.cache.lens, alive=work.alive, root=work.root, seed=work.seed,
                          counter=work.counter, ldlp_feat=work.ldlp_feat, embed=target.embed_tokens.weight)
        done = self._settle(tree, logits, hidden, sampling, slots)
        verdict, path, emitted = done.verdict, done.verdict.path, done.emitted
        if self.drafter is not None and self.proposer.drafting:
            self._catch_up(emitted, self.drafter.pick_features(hidden, aux), path, done.keep)
        if self.on_round is not None:
            self.on_round(before, verdict.n_accepted, tree)
        plan = self.proposer.observe(verdict, tree, self._round_input(sampling, target_logits=logits))
        scores = None if sampling.logprobs is None else path_logprobs(logits, path, emitted, sampling.logprobs)
        outcome = RoundOutcome(n_accepted=verdict.n_accepted, n_drafted=done.n_drafted,
                               draft_depth=done.draft_depth, emitted=emitted, plan=plan, logprobs=scores)
        self._pack(outcome, work.outcome)

    def _extend_drafter(self, emitted: torch.Tensor, features: torch.Tensor, path: torch.Tensor,
                        keep: torch.Tensor) -> None:
        """The drafter appends the committed entries (accepted..., bonus) with the target's features on the path."""
        work = self.workspace
        on_path = torch.gather(features, 1, path[:, :, None].expand(-1, -1, features.shape[-1]))  # [B, P, F]
        logits, hidden = self.drafter.extend(emitted, on_path, keep)
        work.draft_logits.copy_(torch.where(work.alive[:, None], logits, work.draft_logits))
        if hidden is not None:
            work.draft_hidden.copy_(torch.where(work.alive[:, None], hidden, work.draft_hidden))
