"""The decode loop: prefill, then rounds of propose -> verify (one target pass) -> commit.

`Engine.generate(prompts, sampling params, seeds)` is the interface the worker calls. B rows decode
together; each has its own committed length, accepted count per round and random stream, and a
row leaves the batch (and stops costing work) when it finishes. Plain autoregressive decoding is
the same loop with an empty draft (the `none` method), so every speedup is measured against the
same code. Each round ends with one device-to-host copy (a `RoundOutcome`, laid out by `stats.py`).

The engine receives built parts: a target, a proposer and, when the method drafts, a drafter
(`build.py` makes them from a method spec and model paths). It knows nothing of method names, file
formats, tokenization (stop strings arrive as a callback), Ray or Parquet.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .drafters import Drafter
from .model import CausalLM
from .proposers.base import BatchInfo, Proposer, RoundInput
from .sampling import SamplingParams, target_probs
from .stats import (
    OUTCOME_COLUMNS,
    EngineStats,
    PhaseClock,
    RoundOutcome,
    RowOutcome,
    SeqStats,
    pack_outcome,
    unpack_outcomes,
)
from .trees import DraftTree
from .verify import Verdict, verify_chain_sampling, verify_greedy, verify_tree_sampling

StopFn = Callable[[int, list[int]], "int | None"]  # (row, tokens so far) -> keep this many tokens, or None
RoundHook = Callable[[torch.Tensor, torch.Tensor, DraftTree], None]  # (ldlp_feat [B, 2H], n_accepted [B], tree)


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: SeqStats


def bucket(n: int) -> int:
    """Static batch sizes: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


class Workspace:
    """Per-engine buffers every round reads and writes in place, sized (B rows, S slots).

    Row state lives in views of capacity-sized buffers, so shapes and addresses repeat from round to
    round and from call to call: the condition for replaying captured CUDA graphs."""

    def __init__(self, target: CausalLM, B: int, S: int, max_nodes: int):
        device, dtype = target.device, target.dtype
        H, V = target.cfg.hidden_size, target.cfg.vocab_size
        self.B_cap, self.S = B, S
        self.cache = target.new_cache(B, S)
        self.full = {
            "root": torch.zeros(B, dtype=torch.long, device=device),  # pending token
            "seed": torch.zeros(B, dtype=torch.long, device=device),
            "counter": torch.zeros(B, dtype=torch.long, device=device),  # tokens emitted so far
            "alive": torch.zeros(B, dtype=torch.bool, device=device),
            "draft_logits": torch.zeros(B, V, dtype=dtype, device=device),  # drafter output at the last entry
            "draft_hidden": torch.zeros(B, H, dtype=dtype, device=device),
            "ldlp_feat": torch.zeros(B, 2 * H, dtype=dtype, device=device),  # emb(root) ++ hidden that produced it
            "outcome": torch.zeros(B, OUTCOME_COLUMNS + max_nodes, dtype=torch.long, device=device),  # see stats.py
        }
        self.graphs: dict = {}
        self.seen: set = set()
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.view(B)

    def view(self, B: int) -> None:
        self.B = B
        for name, buffer in self.full.items():
            setattr(self, name, buffer[:B])
        self.cache.view(B)

    def select(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        for buffer in self.full.values():
            buffer[:n] = buffer[rows]
        self.cache.select(rows)
        self.view(n)


class Batch:
    """Everything aligned by batch row during one generate(); `select` re-orders all of it together."""

    def __init__(self, workspace: Workspace, proposer: Proposer, drafter: Drafter | None, origin: list[int]):
        self.workspace, self.proposer, self.drafter = workspace, proposer, drafter
        self.origin = origin  # prompt index of each batch row (>= the number of prompts: padding)
        self.plan: list[int] | None = None  # the proposer's plan for the next round, on the host

    def select(self, order: list[int]) -> None:
        """Keep batch rows `order`, in that order: workspace, proposer and drafter state, origin and plan."""
        index = torch.tensor(order, device=self.workspace.root.device)
        self.workspace.select(index)
        self.proposer.select(index)
        if self.drafter is not None:
            self.drafter.select(index)
        self.origin = [self.origin[i] for i in order]
        if self.plan is not None:
            self.plan = [self.plan[i] for i in order]


class Outputs:
    """Per-prompt tokens, counters and completions of one generate(); applies the stop rules."""

    def __init__(self, n_prompts: int, sampling: SamplingParams, stop_fn: StopFn | None):
        self.sampling, self.stop_fn = sampling, stop_fn
        self.eos = set(sampling.eos_token_ids)
        self.tokens: list[list[int]] = [[] for _ in range(n_prompts)]
        self.stats = [SeqStats() for _ in range(n_prompts)]
        self.done: list[Completion | None] = [None] * n_prompts
        self.live = n_prompts

    def running(self, prompt: int) -> bool:
        return prompt < len(self.done) and self.done[prompt] is None

    def record(self, origin: list[int], outcomes: list[RowOutcome]) -> list[int]:
        """Account a round; return the batch rows that finished in it."""
        finished = []
        for i, (prompt, row) in enumerate(zip(origin, outcomes)):
            if not self.running(prompt):
                continue
            self.stats[prompt].observe(row)
            reason = self._append(prompt, row.tokens)
            if reason:
                self.done[prompt] = Completion(self.tokens[prompt], reason, self.stats[prompt])
                finished.append(i)
        self.live -= len(finished)
        return finished

    def _append(self, prompt: int, tokens: list[int]) -> str | None:
        """Add a round's tokens to a row; return a finish reason when the row is done."""
        out = self.tokens[prompt]
        for t in tokens:
            out.append(t)
            if t in self.eos:
                return "stop"
            if len(out) >= self.sampling.max_new_tokens:
                return "stop" if self._stop_string(prompt, out) else "length"
        return "stop" if self._stop_string(prompt, out) else None

    def _stop_string(self, prompt: int, out: list[int]) -> bool:
        """Ask the stop callback; cut the row where it says."""
        cut = self.stop_fn(prompt, out) if self.stop_fn else None
        if cut is None:
            return False
        del out[cut:]
        return True


def verify_round(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor,
                 counter: torch.Tensor) -> Verdict:
    """The one verification rule that fits: greedy, a sampled chain with draft probabilities, or the coupled
    tree rule for every other sampled tree (`none` included), whose text equals plain sampling's for the seed."""
    if sampling.greedy:
        return verify_greedy(tree, logits)
    probs = target_probs(logits.float() if logits.dtype != torch.float64 else logits, sampling)  # [B, N, V]
    if tree.draft_probs is not None:
        return verify_chain_sampling(tree, probs, seeds, counter)
    return verify_tree_sampling(tree, probs, seeds, counter)


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

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int] | None = None,
                 stop_fn: StopFn | None = None) -> tuple[list[Completion], EngineStats]:
        """Decode every prompt to completion; one Completion per prompt, in order, and the call's stats."""
        n_prompts = len(prompts)
        assert n_prompts > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
        stats = EngineStats()
        clock = PhaseClock(self.target.device)
        clock.mark("prefill")
        batch = self._prefill(prompts, sampling, seeds if seeds is not None else [0] * n_prompts)
        outputs = Outputs(n_prompts, sampling, stop_fn)
        while outputs.live:
            outcomes = self._round(batch, sampling, clock)
            clock.flush(stats)
            stats.target_passes += 1
            finished = outputs.record(batch.origin, outcomes)
            if finished:
                self._retire(batch, finished, outputs)
        clock.mark("other")
        clock.flush(stats)
        stats.rows = sum(outputs.stats, SeqStats())
        stats.warmup_seconds, self.warmup_seconds = self.warmup_seconds, 0.0
        return outputs.done, stats

    def _prefill(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Batch:
        """Pad the batch to its bucket, prefill target and drafter, and start the proposer."""
        device, n_prompts = self.target.device, len(prompts)
        B = bucket(n_prompts) if self.fast else n_prompts
        padded = list(prompts) + [prompts[0]] * (B - n_prompts)  # padding rows start dead
        lens = torch.tensor([len(p) for p in padded], device=device)  # [B]
        longest, limit = int(lens.max()), self.target.cfg.max_position_embeddings
        assert longest + sampling.max_new_tokens <= limit, (
            f"prompt ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's context {limit}")
        # a row may commit up to a whole tree past max_new_tokens in its last round, and a finished row
        # (frozen in its bucket) still has the next tree written after it
        work = self._workspace(B, longest + sampling.max_new_tokens + 2 * self.proposer.max_nodes + 1)
        ids = torch.zeros(B, longest, dtype=torch.long, device=device)  # [B, T] right-padded prompts
        for i, p in enumerate(padded):
            ids[i, : len(p)] = torch.tensor(p, device=device)
        features = self._prefill_target(ids, lens)
        work.seed.copy_(torch.tensor(seeds + [0] * (B - n_prompts), device=device))
        work.counter.zero_()
        work.alive.copy_(torch.arange(B, device=device) < n_prompts)
        self.proposer.begin(BatchInfo(B=B, device=device, sampling=sampling, prompts=padded))
        if self.drafter is not None and self.proposer.drafting:  # a call that backs off leaves the drafter idle
            self._prefill_drafter(ids, lens, features)
        batch = Batch(work, self.proposer, self.drafter, origin=list(range(B)))
        first_plan = self.proposer.first_plan(self._round_input(sampling))  # planning proposers: one sync of its own
        batch.plan = first_plan.tolist() if first_plan is not None else None
        return batch

    def _prefill_target(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
        """Every prompt token but the last into the target's cache; the last becomes the root.
        Returns the drafter's features at the prefilled positions [B, T-1, F] (None without a drafter)."""
        work, target = self.workspace, self.target
        B, T = ids.shape
        rows = torch.arange(B, device=ids.device)
        work.cache.lens.zero_()
        features = None
        last_hidden = torch.zeros(B, target.cfg.hidden_size, dtype=target.dtype, device=ids.device)  # [B, H]
        if T > 1:
            positions = torch.arange(T - 1, device=ids.device).expand(B, -1)
            _, hidden, aux = target(ids[:, :-1], positions, work.cache)  # hidden [B, T-1, H]
            features = self.drafter.pick_features(hidden, aux) if self.drafter is not None else None
            last_hidden = hidden[rows, (lens - 2).clamp(min=0)]
        work.cache.lens.copy_(lens - 1)
        work.root.copy_(ids[rows, lens - 1])
        one_token = (lens > 1)[:, None]  # a one-token prompt has no hidden state before its root
        work.ldlp_feat.copy_(torch.cat([target.embed_tokens(work.root), torch.where(one_token, last_hidden, 0.0)], -1))
        return features

    def _prefill_drafter(self, ids: torch.Tensor, lens: torch.Tensor, features: torch.Tensor | None) -> None:
        work, drafter = self.workspace, self.drafter
        if drafter.begin(work.B_cap, work.S + self.proposer.scratch):
            work.graphs.clear()  # graphs captured against the old drafter cache
            work.seen.clear()
        drafter.cache.view(ids.shape[0])
        drafter.cache.lens.zero_()
        logits, hidden = drafter.prefill(ids, lens, features)
        work.draft_logits.copy_(logits)
        if hidden is not None:
            work.draft_hidden.copy_(hidden)

    def _round(self, batch: Batch, sampling: SamplingParams, clock: PhaseClock) -> list[RowOutcome]:
        """Draft, one target pass with verification and commit, then the round's one device-to-host copy."""
        # the sampling rule is baked into a captured graph (temperature, top-k/p are Python constants there)
        rule = (sampling.temperature, sampling.top_k, sampling.top_p)
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
        tree = self._run(("draft", *key), lambda: self.proposer.propose(self._round_input(sampling), batch.plan))
        clock.mark("verify")
        self._run(("verify", *key), lambda: self._verify_commit(tree, sampling))
        clock.mark("other")
        outcomes = unpack_outcomes(batch.workspace.outcome, self.proposer.returns_plan)  # the one sync
        if self.proposer.returns_plan:
            batch.plan = [row.plan for row in outcomes]
        return outcomes

    def _retire(self, batch: Batch, finished: list[int], outputs: Outputs) -> None:
        """Freeze rows that finished; shrink the batch when the live rows fit a smaller bucket (or always, eager)."""
        work = batch.workspace
        work.alive[torch.tensor(finished, device=work.alive.device)] = False
        live = outputs.live
        if live and (not self.fast or bucket(live) < work.B):
            alive = [i for i, prompt in enumerate(batch.origin) if outputs.running(prompt)]
            kept = set(alive)
            dead = [i for i in range(len(batch.origin)) if i not in kept]
            batch.select((alive + dead)[: bucket(live) if self.fast else live])

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
        """One target pass over the tree, verification, KV compaction, drafter catch-up; state updated in place,
        the RoundOutcome packed into the workspace's outcome buffer."""
        work, target = self.workspace, self.target
        logits, hidden, aux = target(tree.tokens, tree.positions(work.cache.lens), work.cache, tree.ancestors())
        verdict = verify_round(tree, logits, sampling, work.seed, work.counter)
        n_accepted, path = verdict.n_accepted, verdict.path  # [B], [B, P]
        keep = torch.where(work.alive, n_accepted + 1, 0)  # entries to commit; dead rows stay frozen
        work.cache.compact(path, keep)
        path_tokens = torch.gather(tree.tokens, 1, path)  # [B, P] root, accepted...
        emitted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
        emitted = emitted.scatter(1, n_accepted[:, None], verdict.bonus[:, None])  # [B, P] accepted..., bonus
        if self.drafter is not None and self.proposer.drafting:
            self._extend_drafter(emitted, self.drafter.pick_features(hidden, aux), path, keep)
        if self.on_round is not None:
            self.on_round(work.ldlp_feat, n_accepted, tree)
        rows = torch.arange(work.B, device=n_accepted.device)
        new_root = torch.where(work.alive, verdict.bonus, work.root)
        work.ldlp_feat.copy_(torch.cat([target.embed_tokens(new_root), hidden[rows, path[rows, n_accepted]]], -1))
        work.root.copy_(new_root)
        work.counter.add_(keep)
        plan = self.proposer.observe(verdict, tree, self._round_input(sampling, target_logits=logits))
        outcome = RoundOutcome(n_accepted=n_accepted, n_drafted=tree.valid.sum(1) - 1,
                               draft_depth=(tree.depth * tree.valid).amax(1), emitted=emitted, plan=plan)
        pack_outcome(outcome, work.outcome)

    def _extend_drafter(self, emitted: torch.Tensor, features: torch.Tensor, path: torch.Tensor,
                        keep: torch.Tensor) -> None:
        """The drafter appends the committed entries (accepted..., bonus) with the target's features on the path."""
        work = self.workspace
        on_path = torch.gather(features, 1, path[:, :, None].expand(-1, -1, features.shape[-1]))  # [B, P, F]
        logits, hidden = self.drafter.extend(emitted, on_path, keep)
        work.draft_logits.copy_(torch.where(work.alive[:, None], logits, work.draft_logits))
        if hidden is not None:
            work.draft_hidden.copy_(torch.where(work.alive[:, None], hidden, work.draft_hidden))
