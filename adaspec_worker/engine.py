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
from .methods import Proposer, RoundInput, build_proposer
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
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            setattr(stats, f"{phase}_s", getattr(stats, f"{phase}_s") + dt)
        self.marks = self.marks[-1:]


class Engine:
    def __init__(self, target: CausalLM, method: str = "none", params: dict | None = None, drafter: Drafter | None = None,
                 ldlp=None):
        self.target = target
        self.proposer: Proposer = build_proposer(method, params, ldlp)
        need = self.proposer.spec.drafter
        assert (need is None) or drafter is not None, f"method {method!r} needs a {need} drafter (model.draft)"
        self.drafter = drafter if need else None
        self.method = method
        self.round_hook = None  # optional callable(ldlp_feat [B, 2H], n_accepted [B], tree): label collection

    @classmethod
    def load(cls, target: CausalLM, method: str, params: dict | None, draft_path: str | None,
             ldlp_path: str | None = None) -> "Engine":
        from .specs import parse_spec
        spec = parse_spec(method, params)
        drafter = DRAFTERS[spec.drafter](draft_path, target) if spec.drafter else None
        ldlp = None
        if getattr(spec, "uses_ldlp", False):
            from .ldlp import load_ldlp
            assert ldlp_path, f"method {method!r} needs an LDLP (model.ldlp)"
            ldlp = load_ldlp(ldlp_path, target)
        return cls(target, method, params, drafter, ldlp)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sp: SamplingParams, seeds: list[int] | None = None,
                 stop_fn: StopFn | None = None) -> tuple[list[Completion], EngineStats]:
        tgt, dev = self.target, self.target.device
        B = len(prompts)
        assert B > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
        seeds = seeds if seeds is not None else [0] * B
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        Tp = int(lens.max())
        S = Tp + sp.max_new_tokens + self.proposer.max_nodes + 1
        limit = tgt.cfg.max_position_embeddings
        assert Tp + sp.max_new_tokens <= limit, f"prompt ({Tp}) + max_new_tokens ({sp.max_new_tokens}) exceeds the model's context {limit}"
        ids = torch.zeros(B, Tp, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, device=dev)
        stats = EngineStats()
        clock = PhaseClock(dev)
        clock.mark("prefill")
        cache = tgt.new_cache(B, S)
        feats = None
        if Tp > 1:
            pos = torch.arange(Tp - 1, device=dev).expand(B, -1)
            _, hidden, aux = tgt(ids[:, :-1], pos, cache)
            feats = aux if (self.drafter and self.drafter.feature == "eagle3") else hidden
        cache.lens = lens - 1
        bi = torch.arange(B, device=dev)
        root = ids[bi, lens - 1]
        prop = self.proposer
        feat = None
        if prop.wants_features or self.round_hook:  # LDLP input: emb(pending token) ++ hidden that produced it
            h_last = hidden[bi, (lens - 2).clamp(min=0)] if Tp > 1 else torch.zeros(B, tgt.cfg.hidden_size, dtype=tgt.dtype, device=dev)
            h_last = torch.where((lens > 1)[:, None], h_last, 0.0)
            feat = torch.cat([tgt.embed_tokens(root), h_last], -1)
        prop.plan = None
        prop.start(B, dev, sp, prompts, self)
        d_logits = d_hidden = None
        if self.drafter is not None:
            self.drafter.begin(B, S + self.proposer.scratch)
            d_logits, d_hidden = self.drafter.prefill(ids, lens, feats)

        rows = list(range(B))  # original index of each live batch row
        seed_t = torch.tensor(seeds, dtype=torch.long, device=dev)
        counter = torch.zeros(B, dtype=torch.long, device=dev)
        out: list[list[int]] = [[] for _ in range(B)]
        seq = [SeqStats() for _ in range(B)]
        done: list[Completion | None] = [None] * B
        eos = set(sp.eos_token_ids)
        while rows:
            clock.mark("draft")
            rin = RoundInput(root, d_logits, d_hidden, self.drafter, sp, seed_t, counter, feat)
            tree = prop.propose(rin)
            clock.mark("verify")
            logits, hidden, aux = tgt(tree.tokens, tree.positions(cache.lens), cache, tree.ancestors())
            verdict = self._verify(tree, logits, sp, seed_t, counter)
            clock.mark("other")
            n, path = verdict.n_accepted, verdict.path
            cache.compact(path, n + 1)
            tok_path = torch.gather(tree.tokens, 1, path)  # [B, P] root, accepted...
            emitted = torch.cat([tok_path[:, 1:], tok_path[:, :1]], 1).scatter(1, n[:, None], verdict.bonus[:, None])
            if self.drafter is not None:
                f = aux if self.drafter.feature == "eagle3" else hidden
                fp = torch.gather(f, 1, path[:, :, None].expand(-1, -1, f.shape[-1]))
                d_logits, d_hidden = self.drafter.extend(emitted, fp, n + 1)
            if self.round_hook:
                self.round_hook(feat, n, tree)
            root = verdict.bonus
            counter = counter + n + 1
            if feat is not None:
                bi = torch.arange(root.shape[0], device=dev)
                feat = torch.cat([tgt.embed_tokens(root), hidden[bi, path[bi, n]]], -1)
                rin.ldlp_feat = feat
            plan = prop.observe(verdict, tree, rin)
            depth = (tree.depth * tree.valid).amax(1, keepdim=True)  # deepest draft level offered per row
            sync = [n[:, None], (tree.valid.sum(1, keepdim=True) - 1), depth, emitted] + ([plan[:, None].long()] if plan is not None else [])
            host = torch.cat(sync, 1).tolist()  # the round's one sync
            if plan is not None:
                prop.plan = [row[-1] for row in host]
            clock.flush(stats)
            stats.rounds += 1
            keep = []
            for i, row in enumerate(host):
                b = rows[i]
                na, drafted, ddepth, toks = row[0], row[1], row[2], row[3: 4 + row[0]]
                st = seq[b]
                st.rounds += 1; st.drafted += drafted; st.accepted += na
                st.draft_lengths[ddepth] += 1
                for d in range(1, na + 1):
                    st.accepted_by_depth[d] += 1
                reason = self._append(out[b], toks, sp, eos, stop_fn, b)
                if reason:
                    done[b] = Completion(out[b], reason, st)
                else:
                    keep.append(i)
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                if not rows:
                    break
                k = torch.tensor(keep, device=dev)
                cache.select(k)
                root, seed_t, counter = root[k], seed_t[k], counter[k]
                feat = None if feat is None else feat[k]
                prop.select(k)
                if prop.plan is not None:
                    prop.plan = [prop.plan[i] for i in keep]
                if self.drafter is not None:
                    self.drafter.select(k)
                    d_logits = d_logits[k]
                    d_hidden = None if d_hidden is None else d_hidden[k]
        clock.mark("other")
        clock.flush(stats)
        for s in seq:
            EngineStats.merge(stats, EngineStats(seq=s))
        return done, stats

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

