"""Adaptive proposers: how far (and how wide) to draft, decided per round and per row.

Registered by spec class like the fixed methods (`base.PROPOSERS`); parameters and sources are
documented on their specs in `jobs/specs.py`. Chains are drafted to a bound on the device and cut by
a per-row `valid` mask, so a stopping rule costs no host sync; LDLP's next-round length is computed
right after verification and rides on that round's one sync (the engine hands it back as `plan`).
Exceptions, by design of the published algorithms: DDD syncs at its few check depths, OPT-Tree once
per level, and the benchmark-only oracle once per round before verification. All are lossless: they
only change what is proposed, never how it is verified.

Knows nothing of the engine: the LDLP and the oracle's reference decode are handed in by the builder.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from jobs.specs import (
    AdaEagleDDDSpec,
    AdaEagleSpec,
    AdaEDLSpec,
    DDDSpec,
    LDLPTreeSpec,
    MethodSpec,
    OptTreeSpec,
    OracleSpec,
)

from ..sampling import SamplingParams
from ..trees import chain_tree, grow_dynamic
from .base import BatchInfo, Proposer, RoundInput, draft_chain, eagle2_max_nodes, implements

ReferenceFn = Callable[[list[list[int]], SamplingParams], list[list[int]]]  # (prompts, sampling) -> greedy tokens


class LDLPPlanned(Proposer):
    """Base of the proposers whose shape follows LDLP's predicted accepted length (chains and trees).

    The per-row prediction lives on the device in `self.k` (read by graph replays); its host copy is
    the plan the engine passes back each round."""

    returns_plan = True

    def __init__(self, spec: MethodSpec, ldlp):
        super().__init__(spec)
        assert ldlp is not None, f"{spec.name} needs an LDLP (model.ldlp)"
        self.ldlp = ldlp
        self.k_max = getattr(spec, "k_max", 0) or ldlp.k_max
        self.scratch, self.max_nodes = self.k_max, self.k_max + 1

    def begin(self, batch: BatchInfo) -> None:
        self.row_state("k", batch.B, 0, torch.long, batch.device)  # the plan on the device, for graph replays

    def first_plan(self, r: RoundInput) -> torch.Tensor:
        """First round of a generate(): no verification sync to ride on yet, so the engine makes one of its own."""
        return self.observe(None, None, r)

    def plan_key(self, plan):
        return (max(plan),)

    def observe(self, verdict, tree, r):
        self.k.copy_(self.ldlp.predict(r.ldlp_feat).clamp(max=self.k_max))
        return self.k


@implements(AdaEagleSpec)
class AdaEagle(LDLPPlanned):
    def plan_key(self, plan):
        return (self.chain_len(plan),)

    def chain_len(self, plan: list[int]) -> int:
        """Chain drafted this round: the longest row's LDLP length, rounded up to a few sizes so the
        graphs captured per size stay few (rows with shorter predictions mask their extra nodes)."""
        longest = int(max(plan))
        if longest == 0:
            return 0
        return min(next(b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 10**9) if b >= longest), self.k_max)

    def propose(self, r, plan):
        K = self.chain_len(plan)
        if K == 0:
            return chain_tree(r.root, r.root.new_zeros(r.root.shape[0], 0))
        toks, _, _ = draft_chain(r, K)
        return chain_tree(r.root, toks, valid=torch.arange(K, device=self.k.device)[None, :] < self.k[:, None])


@implements(AdaEagleDDDSpec)
class AdaEagleDDD(LDLPPlanned):
    def plan_key(self, plan):
        return ()

    def propose(self, r, plan):
        toks, logp, _ = draft_chain(r, self.k_max)  # [B, k_max]
        j = torch.arange(self.k_max, device=self.k.device)[None, :]
        go = (j < self.k[:, None]) | (logp.cumsum(-1) > self.spec.threshold)  # stop only when both say stop
        return chain_tree(r.root, toks, valid=go.long().cumprod(-1).bool())


def adaedl_update(lam: torch.Tensor, ema: torch.Tensor, acc_rate: torch.Tensor, beta1: float, alpha: float, eps: float):
    """One round of AdaEDL's lambda adaptation: returns (lambda, ema)."""
    ema = beta1 * ema + (1 - beta1) * acc_rate
    lam_new = torch.where(ema < alpha, lam + eps, lam - eps)  # accepting too little: stop earlier
    return 0.9 * lam + 0.1 * lam_new, ema


@implements(AdaEDLSpec)
class AdaEDL(Proposer):
    def __init__(self, spec: AdaEDLSpec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k_max, spec.k_max + 1

    def begin(self, batch):
        self.row_state("lam", batch.B, self.spec.lam0, torch.float64, batch.device)
        self.row_state("ema", batch.B, self.spec.alpha, torch.float64, batch.device)

    def propose(self, r, plan):
        toks, _, entropy = draft_chain(r, self.spec.k_max)  # [B, k_max]
        go = (1 - (self.spec.gamma * entropy).clamp(min=0).sqrt()) >= self.lam[:, None]
        return chain_tree(r.root, toks, valid=go.long().cumprod(-1).bool())

    def observe(self, verdict, tree, r):
        drafted = tree.valid[:, 1:].sum(1)
        rate = verdict.n_accepted.double() / drafted.clamp(min=1)
        lam, ema = adaedl_update(self.lam, self.ema, rate, self.spec.beta1, self.spec.alpha, self.spec.eps)
        had = drafted > 0  # a round without drafts says nothing about acceptance
        self.lam.copy_(torch.where(had, lam, self.lam))
        self.ema.copy_(torch.where(had, ema, self.ema))
        return None


@implements(DDDSpec)
class DDD(Proposer):
    graphable = False  # syncs at its check depths

    def __init__(self, spec: DDDSpec):
        super().__init__(spec)
        self.max_nodes = eagle2_max_nodes(spec.top_k, spec.max_depth, spec.total_tokens)
        self.scratch = spec.top_k * spec.max_depth
        self.checks = set(spec.check_depths)

    def stop(self, level: int, frontier_scores: torch.Tensor) -> bool:
        """At a check depth: stop when every row's beams together have too little probability left."""
        return level in self.checks and bool((torch.logsumexp(frontier_scores, -1) < self.spec.threshold).all())

    def propose(self, r, plan):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.max_depth, s.total_tokens,
                            stop=self.stop)


@implements(OptTreeSpec)
class OptTree(Proposer):
    graphable = False  # syncs once per level

    def __init__(self, spec: OptTreeSpec):
        super().__init__(spec)
        self.max_nodes = 1 + spec.n * spec.max_depth
        self.scratch = spec.n * spec.max_depth

    def stop(self, level: int, frontier_scores: torch.Tensor) -> bool:
        """The nodes a level adds raise E by the sum of their path probabilities: stop when that is below delta."""
        return bool((frontier_scores.exp().sum(-1) < self.spec.delta).all())

    def propose(self, r, plan):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.n, s.max_depth, 0, keep="frontier",
                            stop=self.stop)


@implements(LDLPTreeSpec)
class LDLPTree(LDLPPlanned):
    def __init__(self, spec: LDLPTreeSpec, ldlp):
        super().__init__(spec, ldlp)
        self.max_nodes = 1 + spec.nodes_per_level * spec.max_depth
        self.scratch = spec.top_k * spec.max_depth

    def plan_key(self, plan):
        return (self.depth(plan),)

    def depth(self, plan: list[int]) -> int:
        s = self.spec
        return min(max(int(max(plan)) + 1, s.min_depth), s.max_depth)

    def propose(self, r, plan):
        s = self.spec
        depth = self.depth(plan)
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, depth,
                            s.nodes_per_level * depth)


@implements(OracleSpec)
class Oracle(Proposer):
    """Drafts a chain of k_max and cuts it where it leaves the target's own greedy continuation,
    which `reference(prompts, sampling)` computes ahead at `begin`."""

    graphable = False  # one extra sync per round sizes the verification exactly

    def __init__(self, spec: OracleSpec, reference: ReferenceFn):
        super().__init__(spec)
        self.reference = reference
        self.scratch, self.max_nodes = spec.k_max, spec.k_max + 1

    def begin(self, batch):
        assert batch.sampling.greedy, "the oracle is defined for greedy decoding only"
        width = batch.sampling.max_new_tokens + self.spec.k_max + 1
        # [B, width] the reference tokens, -1 past the end
        self.ref = torch.full((batch.B, width), -1, dtype=torch.long, device=batch.device)
        self.sampling = batch.sampling
        self._full = {"ref": self.ref}
        self.admit(torch.arange(batch.B, device=batch.device), batch.prompts)

    def admit(self, rows, prompts):
        """New rows' reference continuations."""
        self.ref[rows] = -1
        for row, tokens in zip(rows.tolist(), self.reference(prompts, self.sampling)):
            self.ref[row, : len(tokens)] = torch.tensor(tokens, device=self.ref.device)

    def propose(self, r, plan):
        k = self.spec.k_max
        toks, _, _ = draft_chain(r, k)  # [B, k]
        pos = (r.counter[:, None] + torch.arange(k, device=toks.device)[None, :]).clamp(max=self.ref.shape[1] - 1)
        good = (toks == torch.gather(self.ref, 1, pos)).long().cumprod(-1)
        K = int(good.sum(1).max())  # benchmark-only: one extra sync to size the verification exactly
        return chain_tree(r.root, toks[:, :K], valid=good[:, :K].bool())
