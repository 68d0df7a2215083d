"""The decode loop: prefill, then rounds of propose -> verify (one target pass) -> commit.

`Engine.generate(prompts, sampling params, seeds)` is the interface the worker calls. B rows decode
together; each has its own committed length, accepted count per round and random stream, and a
row leaves the batch (and stops costing work) when it finishes. Plain autoregressive decoding is
the same loop with an empty draft (the `none` method), so every speedup is measured against the
same code. Each round ends with one device-to-host copy (emitted tokens and counts).

The engine knows nothing of tokenization (stop strings arrive as a callback), Ray or Parquet.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .drafters import DRAFTERS, Drafter
from .proposers.fixed import Proposer, RoundInput, build_proposer
from .model import CausalLM
from .sampling import SamplingParams, target_probs
from .verify import Verdict, verify_chain_sampling, verify_greedy, verify_tree_sampling

StopFn = Callable[[int, list[int]], "int | None"]  # (row, tokens so far) -> keep this many tokens, or None


@dataclass
class SeqStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens put before the target (tree nodes, root excluded)
    accepted: int = 0  # draft tokens the target kept (bonus tokens excluded)
    accepted_by_depth: Counter = field(default_factory=Counter)  # depth -> rounds that accepted >= depth tokens
    draft_lengths: Counter = field(default_factory=Counter)  # deepest draft level offered per round

    @property
    def emitted(self) -> int:
        return self.accepted + self.rounds

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward, bonus included (plain decoding = 1.0)."""
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: SeqStats


@dataclass
class EngineStats:
    rounds: int = 0  # target forwards after prefill
    seq: SeqStats = field(default_factory=SeqStats)  # summed over rows
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0

    def merge(self, o: "EngineStats") -> None:
        self.rounds += o.rounds
        for f in ("draft_s", "verify_s", "other_s", "prefill_s"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        s, t = self.seq, o.seq
        s.rounds += t.rounds; s.drafted += t.drafted; s.accepted += t.accepted
        s.accepted_by_depth.update(t.accepted_by_depth); s.draft_lengths.update(t.draft_lengths)


class PhaseClock:
    """Splits wall time into phases. On CUDA it records events and reads them at the round's sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((phase, ev))
        else:
            self.marks.append((phase, time.perf_counter()))

    def flush(self, stats: EngineStats) -> None:
        """Attribute the time between consecutive marks to the phase that started it (after a sync)."""
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()  # a no-op after the round's sync; needed at the end of generate()
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            setattr(stats, f"{phase}_s", getattr(stats, f"{phase}_s") + dt)
        self.marks = self.marks[-1:]


def bucket(n: int) -> int:
    """Static batch sizes: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


class Workspace:
    """Per-engine buffers every round reads and writes in place, sized (B rows, S slots).

    Row state lives in views of capacity-sized buffers, so shapes and addresses repeat from round to
    round and from call to call: the condition for replaying captured CUDA graphs."""

    def __init__(self, engine: "Engine", B: int, S: int):
        tgt, dev = engine.target, engine.target.device
        H, V = tgt.cfg.hidden_size, tgt.cfg.vocab_size
        self.B_cap, self.S = B, S
        self.cache = tgt.new_cache(B, S)
        self.full = {
            "root": torch.zeros(B, dtype=torch.long, device=dev),
            "seed": torch.zeros(B, dtype=torch.long, device=dev),
            "counter": torch.zeros(B, dtype=torch.long, device=dev),
            "alive": torch.zeros(B, dtype=torch.bool, device=dev),
            "d_logits": torch.zeros(B, V, dtype=tgt.dtype, device=dev),
            "d_hidden": torch.zeros(B, H, dtype=tgt.dtype, device=dev),
            "feat": torch.zeros(B, 2 * H, dtype=tgt.dtype, device=dev),
            "host": torch.zeros(B, 5 + engine.proposer.max_nodes, dtype=torch.long, device=dev),
        }
        self.graphs: dict = {}
        self.seen: set = set()
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.view(B)

    def view(self, B: int) -> None:
        self.B = B
        for k, v in self.full.items():
            setattr(self, k, v[:B])
        self.cache.view(B)

    def select(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        for v in self.full.values():
            v[:n] = v[rows]
        self.cache.select(rows)
        self.view(n)


class Engine:
    def __init__(self, target: CausalLM, method: str = "none", params: dict | None = None, drafter: Drafter | None = None,
                 ldlp=None, fast: bool = True):
        self.target = target
        self.proposer: Proposer = build_proposer(method, params, ldlp)
        need = self.proposer.spec.drafter
        assert (need is None) or drafter is not None, f"method {method!r} needs a {need} drafter (model.draft)"
        self.drafter = drafter if need else None
        self.method = method
        self.fast = fast  # static batch buckets, plus CUDA graphs on CUDA
        self.round_hook = None  # optional callable(ldlp_feat [B, 2H], n_accepted [B], tree): label collection
        self.ws: Workspace | None = None

    @classmethod
    def load(cls, target: CausalLM, method: str, params: dict | None, draft_path: str | None,
             ldlp_path: str | None = None, fast: bool = True) -> "Engine":
        from jobs.specs import parse_spec
        spec = parse_spec(method, params)
        drafter = DRAFTERS[spec.drafter](draft_path, target) if spec.drafter else None
        ldlp = None
        if getattr(spec, "uses_ldlp", False):
            from .ldlp import load_ldlp
            assert ldlp_path, f"method {method!r} needs an LDLP (model.ldlp)"
            ldlp = load_ldlp(ldlp_path, target)
        return cls(target, method, params, drafter, ldlp, fast)

    @property
    def graphs_on(self) -> bool:
        return self.fast and self.target.device.type == "cuda" and self.proposer.graphable and self.round_hook is None

    def _workspace(self, B: int, S: int) -> Workspace:
        S = -(-S // 256) * 256 if self.fast else S  # static capacity buckets
        if self.ws is None or self.ws.B_cap < B or self.ws.S != S:
            self.ws = Workspace(self, B, S)
        self.ws.view(B)
        return self.ws

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sp: SamplingParams, seeds: list[int] | None = None,
                 stop_fn: StopFn | None = None) -> tuple[list[Completion], EngineStats]:
        tgt, dev = self.target, self.target.device
        n_rows = len(prompts)
        assert n_rows > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
        seeds = seeds if seeds is not None else [0] * n_rows
        B = bucket(n_rows) if self.fast else n_rows
        prompts_b = list(prompts) + [prompts[0]] * (B - n_rows)  # padding rows start dead
        lens = torch.tensor([len(p) for p in prompts_b], device=dev)
        Tp = int(lens.max())
        limit = tgt.cfg.max_position_embeddings
        assert Tp + sp.max_new_tokens <= limit, f"prompt ({Tp}) + max_new_tokens ({sp.max_new_tokens}) exceeds the model's context {limit}"
        # a row may commit up to a whole tree past max_new_tokens in its last round, and a finished row
        # (frozen in its bucket) still has the next tree written after it
        ws = self._workspace(B, Tp + sp.max_new_tokens + 2 * self.proposer.max_nodes + 1)
        ids = torch.zeros(B, Tp, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts_b):
            ids[i, : len(p)] = torch.tensor(p, device=dev)
        stats = EngineStats()
        clock = PhaseClock(dev)
        clock.mark("prefill")
        cache = ws.cache
        cache.lens.zero_()
        feats = hidden = None
        if Tp > 1:
            pos = torch.arange(Tp - 1, device=dev).expand(B, -1)
            _, hidden, aux = tgt(ids[:, :-1], pos, cache)
            feats = aux if (self.drafter and self.drafter.feature == "eagle3") else hidden
        cache.lens.copy_(lens - 1)
        bi = torch.arange(B, device=dev)
        ws.root.copy_(ids[bi, lens - 1])
        ws.seed.copy_(torch.tensor(seeds + [0] * (B - n_rows), device=dev))
        ws.counter.zero_()
        ws.alive.copy_(torch.arange(B, device=dev) < n_rows)
        prop = self.proposer
        h_last = hidden[bi, (lens - 2).clamp(min=0)] if Tp > 1 else torch.zeros(B, tgt.cfg.hidden_size, dtype=tgt.dtype, device=dev)
        ws.feat.copy_(torch.cat([tgt.embed_tokens(ws.root), torch.where((lens > 1)[:, None], h_last, 0.0)], -1))
        if self.drafter is not None:
            if self.drafter.begin(ws.B_cap, ws.S + prop.scratch):
                ws.graphs.clear(); ws.seen.clear()
            self.drafter.cache.view(B)
            self.drafter.cache.lens.zero_()
            dl, dh = self.drafter.prefill(ids, lens, feats)
            ws.d_logits.copy_(dl)
            if dh is not None:
                ws.d_hidden.copy_(dh)
        prop.plan = None
        prop.start(B, dev, sp, prompts_b, self)
        if prop.wants_plan:
            prop.prime(self._round_input(sp))

        rows = list(range(B))  # original index of each batch row (>= n_rows: padding)
        out: list[list[int]] = [[] for _ in range(n_rows)]
        seq = [SeqStats() for _ in range(n_rows)]
        done: list[Completion | None] = [None] * n_rows
        live = n_rows
        eos = set(sp.eos_token_ids)
        while live:
            key = (ws.B, tuple(prop.plan_key()))
            clock.mark("draft")
            tree = self._run(("draft",) + key, lambda: prop.propose(self._round_input(sp)))
            clock.mark("verify")
            self._run(("verify",) + key, lambda: self._verify_commit(tree, sp))
            clock.mark("other")
            host = ws.host.tolist()  # the round's one device-to-host sync
            clock.flush(stats)
            stats.rounds += 1
            if host and host[0][-1] >= 0 and prop.wants_plan:
                prop.plan = [r[-1] for r in host]
            finished = []
            for i, row in enumerate(host):
                b = rows[i]
                if b >= n_rows or done[b] is not None:
                    continue
                na, drafted, ddepth, toks = row[0], row[1], row[2], row[3: 4 + row[0]]
                st = seq[b]
                st.rounds += 1; st.drafted += drafted; st.accepted += na
                st.draft_lengths[ddepth] += 1
                for d in range(1, na + 1):
                    st.accepted_by_depth[d] += 1
                reason = self._append(out[b], toks, sp, eos, stop_fn, b)
                if reason:
                    done[b] = Completion(out[b], reason, st)
                    finished.append(i)
            if finished:
                live -= len(finished)
                ws.alive[torch.tensor(finished, device=dev)] = False
                if live and (not self.fast or bucket(live) < ws.B):
                    keep_n = bucket(live) if self.fast else live
                    alive_idx = [i for i, b in enumerate(rows) if b < n_rows and done[b] is None]
                    alive_set = set(alive_idx)
                    dead_idx = [i for i in range(len(rows)) if i not in alive_set]
                    order = (alive_idx + dead_idx)[:keep_n]
                    k = torch.tensor(order, device=dev)
                    ws.select(k)
                    rows = [rows[i] for i in order]
                    prop.select(k)
                    if self.drafter is not None:
                        self.drafter.select(k)
                    if prop.plan is not None:
                        prop.plan = [prop.plan[i] for i in order]
        clock.mark("other")
        clock.flush(stats)
        for s in seq:
            EngineStats.merge(stats, EngineStats(seq=s))
        return done, stats

    def _round_input(self, sp) -> RoundInput:
        ws = self.ws
        return RoundInput(ws.root, ws.d_logits, ws.d_hidden if self.drafter is not None else None, self.drafter, sp,
                          ws.seed, ws.counter, ws.feat)

    def _run(self, key, fn):
        """fn() reads and writes workspace buffers only. On CUDA its second use captures a graph, later uses replay it."""
        ws = self.ws
        if not self.graphs_on:
            return fn()
        hit = ws.graphs.get(key)
        if hit is not None:
            hit[0].replay()
            return hit[1]
        if key not in ws.seen:  # first use runs eagerly: the warm-up
            ws.seen.add(key)
            return fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=ws.pool):
            out = fn()
        ws.graphs[key] = (graph, out)
        graph.replay()
        return out

    def _verify_commit(self, tree, sp: SamplingParams) -> None:
        """One target pass over the tree, verification, KV compaction, drafter catch-up; state updated in place."""
        ws, tgt = self.ws, self.target
        cache = ws.cache
        logits, hidden, aux = tgt(tree.tokens, tree.positions(cache.lens), cache, tree.ancestors())
        verdict = self._verify(tree, logits, sp, ws.seed, ws.counter)
        n, path = verdict.n_accepted, verdict.path
        keep = torch.where(ws.alive, n + 1, 0)  # dead rows stay frozen
        cache.compact(path, keep)
        tok_path = torch.gather(tree.tokens, 1, path)  # [B, P] root, accepted...
        emitted = torch.cat([tok_path[:, 1:], tok_path[:, :1]], 1).scatter(1, n[:, None], verdict.bonus[:, None])
        if self.drafter is not None:
            f = aux if self.drafter.feature == "eagle3" else hidden
            fp = torch.gather(f, 1, path[:, :, None].expand(-1, -1, f.shape[-1]))
            dl, dh = self.drafter.extend(emitted, fp, keep)
            ws.d_logits.copy_(torch.where(ws.alive[:, None], dl, ws.d_logits))
            if dh is not None:
                ws.d_hidden.copy_(torch.where(ws.alive[:, None], dh, ws.d_hidden))
        if self.round_hook:
            self.round_hook(ws.feat, n, tree)
        bi = torch.arange(ws.B, device=n.device)
        new_root = torch.where(ws.alive, verdict.bonus, ws.root)
        ws.feat.copy_(torch.cat([tgt.embed_tokens(new_root), hidden[bi, path[bi, n]]], -1))
        ws.root.copy_(new_root)
        ws.counter.add_(keep)
        rin = self._round_input(sp)
        plan = self.proposer.observe(verdict, tree, rin)
        depth = (tree.depth * tree.valid).amax(1, keepdim=True)  # deepest draft level offered per row
        cols = [n[:, None], tree.valid.sum(1, keepdim=True) - 1, depth, emitted]
        host = torch.cat(cols, 1)
        ws.host[:, : host.shape[1]].copy_(host)
        ws.host[:, -1].copy_(plan if plan is not None else torch.full_like(n, -1))

    def _verify(self, tree, logits, sp: SamplingParams, seeds, counter) -> Verdict:
        if sp.greedy:
            return verify_greedy(tree, logits)
        probs = target_probs(logits.float() if logits.dtype != torch.float64 else logits, sp)
        if tree.draft_probs is not None:
            return verify_chain_sampling(tree, probs, seeds, counter)
        return verify_tree_sampling(tree, probs, seeds, counter)

    @staticmethod
    def _append(buf: list[int], toks: list[int], sp: SamplingParams, eos: set, stop_fn, b: int) -> str | None:
        """Add a round's tokens to a row; return a finish reason when the row is done."""
        for t in toks:
            buf.append(t)
            if t in eos:
                return "stop"
            if len(buf) >= sp.max_new_tokens:
                cut = stop_fn(b, buf) if stop_fn else None
                if cut is not None:
                    del buf[cut:]
                    return "stop"
                return "length"
        if stop_fn:
            cut = stop_fn(b, buf)
            if cut is not None:
                del buf[cut:]
                return "stop"
        return None
