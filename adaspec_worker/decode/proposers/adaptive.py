"""Adaptive proposers: a cost-aware shape per call, and per row a depth from the method's own signal.

Registered by spec class like the fixed methods (`base.PROPOSERS`); parameters and sources are documented
on their specs in `jobs/specs.py`. Every method here is a `Budgeted` proposer:

  - whether a call drafts, and its first round's shape (depth, node budget, width), is chosen once per generate()
    call by `policy.ShapePolicy` from the method's menu, the batch bucket, the sampling rule and the measured cost
    model (`self.cost`, set by the builder or the worker): expected tokens per second, `none` (drafter idle) when
    nothing pays; while it drafts, each next round's shape is chosen among the menu's drafting shapes by
    `depth_policy.DepthPolicy` from how the rows' last rounds went (on the host, as rounds land);
  - per row, `limit(r, stats, depth)` turns the method's signal into that row's depth limit, and
    `ranked.finish` spends the row's node budget on its best candidates within it:
      adaeagle      LDLP's predicted accepted length (AdaEAGLE)
      adaeagle-ddd  LDLP's length, or deeper while the best path's log-probability stays above the threshold
      adaedl        levels while 1 - sqrt(gamma * H) >= lambda, lambda adapted per row (AdaEDL)
      ddd           stop at the first check depth where the beams' total probability falls below the threshold
      opt-tree      stop at the first level whose frontier adds less than delta to E = sum of path probabilities
      ldlp-tree     LDLP's length + 1, within [min_depth, max_depth]
Per-row state lives in `row_state` tensors; propose and observe never leave the device (no host sync), so
every round is a CUDA graph (one per shape). Where the target is compiled, so is propose, in pieces every shape
shares (`compile_propose`): the expansion's root level and one level, traced once, and the limits and rerank.
Lossless: they only change what is proposed.

Knows nothing of the engine: the LDLP and the cost model are handed in by the builder.
"""

from __future__ import annotations

import os

import torch

from jobs.specs import AdaEagleDDDSpec, AdaEagleSpec, AdaEDLSpec, DDDSpec, LDLPTreeSpec, MethodSpec, OptTreeSpec

from ..depth_policy import DepthPolicy
from ..policy import NO_DRAFT, RoundTally, Shape, ShapePolicy, menu, rule_key
from ..ranked import Candidates, LevelStats, RankedSteps, finish, grow_levels, leading, level_stats
from ..trees import chain_tree
from .base import BatchInfo, Proposer, RoundInput, Variant, implements


class Budgeted(Proposer):
    """Base of the adaptive proposers: the shape from the cost policy, the per-row depth from `limit`."""

    # propose reads the call's shape (a constant the compiled code guards on: one compile per menu shape, at warm-up)
    # and per-row state tensors, never a tensor's value on the host
    traceable = True
    # each round's depth from DepthPolicy; ADARUN_DEPTH_POLICY=0 keeps the call's first shape for all its rounds
    per_round = os.environ.get("ADARUN_DEPTH_POLICY", "1") != "0"

    def __init__(self, spec: MethodSpec, max_depth: int, width: int, nodes_per_level: int):
        super().__init__(spec)
        self.policy = ShapePolicy(menu(max_depth, width, nodes_per_level), spec.accept_prior)
        self.depths = DepthPolicy(self.policy.shapes, prior=0.5 + spec.accept_prior / 2)  # optimistic: deep gets tried
        self.tally = RoundTally()
        self.shape = NO_DRAFT
        self.rule = ("greedy",)  # the call's sampling rule (`policy.rule_key`)
        self.forced: Shape | None = None  # warm-up: this shape, whatever the policy would choose
        self.max_nodes = 1 + max(s.nodes for s in self.policy.shapes)
        self.scratch = width * max_depth

    @property
    def cost(self):
        return self.policy.cost

    @cost.setter
    def cost(self, value) -> None:
        self.policy.cost = value

    @property
    def drafting(self) -> bool:
        """False when this call backs off to plain decoding: the engine then leaves the drafter idle."""
        return self.shape.drafts

    def variants(self):
        """Every menu shape, with the depth + 1 tokens a round of it can emit; the drafting shapes first, since the
        first of them sizes the drafter's cache (dropping graphs captured before)."""
        shapes = [s for s in self.policy.shapes if s.drafts] + [s for s in self.policy.shapes if not s.drafts]
        return [Variant(s, s.depth + 1) for s in shapes]

    def force(self, variant) -> None:
        assert variant is None or variant in self.policy.shapes, f"{variant} is not on {self.spec.name}'s menu"
        self.forced = variant

    def begin(self, batch: BatchInfo) -> None:
        self.tally.flush(self.policy)  # the previous call's rounds
        forced = self.forced
        self.shape = forced if forced is not None else self.policy.choose(batch.B, batch.sampling)
        self.rule = rule_key(batch.sampling)
        self.tally.start(self.rule, evidence=forced is None, B=batch.B)
        self.depths.forget_slots()

    def plan_key(self, plan):
        return (self.shape,)

    steps = RankedSteps()  # the expansion's phases, plain until `compile_propose`

    def compile_propose(self, compile):
        """Compiled in pieces every menu shape shares: one trace of the expansion's root level, one of a level
        (`ranked.RankedSteps`), and one of the limits and rerank per depth, instead of one trace of the whole
        unrolled propose per shape."""
        self.steps = RankedSteps.compile_with(compile)
        self._ranked = compile(self._ranked)
        return self.propose

    def propose(self, r: RoundInput, plan):
        s = self.shape
        if not s.drafts:
            return chain_tree(r.root, r.root.new_zeros(r.root.shape[0], 0))
        levels = grow_levels(r.root_logits, r.root_hidden, r.drafter.step, s.width, s.depth, self.scratch, self.steps)
        return self._ranked(r, levels, s.depth, s.nodes)

    def _ranked(self, r: RoundInput, levels: list[Candidates], depth: int, nodes: int):
        """Each row's depth limit from the method's signal, then its `nodes` best candidates within it."""
        return finish(r.root, levels, self.limit(r, level_stats(levels), depth).clamp(1, depth), nodes)

    def limit(self, r: RoundInput, stats: LevelStats, depth: int) -> torch.Tensor:
        """[B] the depth each row may draft to this round (clamped to [1, depth] by the caller)."""
        raise NotImplementedError

    def landed(self, report) -> None:
        """The round's tokens and time to its shape's tally; then, in a call that drafts and was not forced, the next
        round's shape from the rows' acceptance (`DepthPolicy`)."""
        shape = report.shape[0]
        self.tally.add(shape, [len(out.tokens) for row, out in zip(report.origin, report.outcomes) if row >= 0])
        if report.seconds is not None:
            self.tally.time(report.B, report.seconds, shape)
        if self.forced is not None or not self.shape.drafts or not self.per_round:
            return
        self.depths.observe(report.origin, report.outcomes, report.lag)
        nxt = self.depths.choose(lambda s: self.policy.seconds(report.B, self.rule, s))
        if nxt is not None:
            self.shape = nxt

    def observe(self, verdict, tree, r):
        self.observe_rows(verdict, tree, r)
        return None

    def observe_rows(self, verdict, tree, r) -> None:
        """Per-row feedback of the method's own signal (AdaEDL's lambda)."""


def _depths(stats: LevelStats) -> torch.Tensor:
    """[1, D] the levels 1..D."""
    return torch.arange(1, stats.entropy.shape[1] + 1, device=stats.entropy.device)[None, :]


class LDLPBudgeted(Budgeted):
    """A Budgeted proposer that reads AdaEAGLE's draft-length predictor."""

    def __init__(self, spec: MethodSpec, ldlp, max_depth: int, width: int, nodes_per_level: int):
        assert ldlp is not None, f"{spec.name} needs an LDLP (model.ldlp)"
        self.ldlp = ldlp
        super().__init__(spec, max_depth or ldlp.k_max, width, nodes_per_level)

    def predicted(self, r: RoundInput) -> torch.Tensor:
        """[B] LDLP's accepted length for the round about to be drafted."""
        return self.ldlp.predict(r.ldlp_feat)


@implements(AdaEagleSpec)
class AdaEagle(LDLPBudgeted):
    def __init__(self, spec: AdaEagleSpec, ldlp):
        super().__init__(spec, ldlp, spec.k_max, spec.top_k, spec.nodes_per_level)

    def limit(self, r, stats, depth):
        return self.predicted(r)


@implements(AdaEagleDDDSpec)
class AdaEagleDDD(LDLPBudgeted):
    def __init__(self, spec: AdaEagleDDDSpec, ldlp):
        super().__init__(spec, ldlp, spec.k_max, spec.top_k, spec.nodes_per_level)

    def limit(self, r, stats, depth):
        best_path = stats.frontier_logp[:, :, 0]  # [B, D] log-probability of the best path to each level
        go = (_depths(stats) <= self.predicted(r)[:, None]) | (best_path > self.spec.threshold)
        return leading(go)  # stop only when both say stop


def adaedl_update(lam: torch.Tensor, ema: torch.Tensor, acc_rate: torch.Tensor, beta1: float, alpha: float, eps: float):
    """One round of AdaEDL's lambda adaptation: returns (lambda, ema)."""
    ema = beta1 * ema + (1 - beta1) * acc_rate
    lam_new = torch.where(ema < alpha, lam + eps, lam - eps)  # accepting too little: stop earlier
    return 0.9 * lam + 0.1 * lam_new, ema


@implements(AdaEDLSpec)
class AdaEDL(Budgeted):
    def __init__(self, spec: AdaEDLSpec):
        super().__init__(spec, spec.k_max, spec.top_k, spec.nodes_per_level)

    def begin(self, batch):
        super().begin(batch)
        self.row_state("lam", batch.B, self.spec.lam0, torch.float64, batch.device)  # [B]
        self.row_state("ema", batch.B, self.spec.alpha, torch.float64, batch.device)  # [B]

    def limit(self, r, stats, depth):
        go = (1 - (self.spec.gamma * stats.entropy.double()).clamp(min=0).sqrt()) >= self.lam[:, None]  # [B, D]
        return leading(go)

    def observe_rows(self, verdict, tree, r):
        offered = (tree.depth * tree.valid).amax(1)  # [B] the row's deepest level this round
        rate = verdict.n_accepted.double() / offered.clamp(min=1)
        lam, ema = adaedl_update(self.lam, self.ema, rate, self.spec.beta1, self.spec.alpha, self.spec.eps)
        had = offered > 0  # a round without drafts says nothing about acceptance
        self.lam.copy_(torch.where(had, lam, self.lam))
        self.ema.copy_(torch.where(had, ema, self.ema))


@implements(DDDSpec)
class DDD(Budgeted):
    def __init__(self, spec: DDDSpec):
        super().__init__(spec, spec.max_depth, spec.top_k, -(-spec.total_tokens // spec.max_depth))

    def limit(self, r, stats, depth):
        """The first check depth (below the shape's depth) where log(sum of the beams' probabilities) < threshold."""
        B = stats.entropy.shape[0]
        limit = torch.full((B,), depth, dtype=torch.long, device=stats.entropy.device)
        for c in sorted(set(self.spec.check_depths), reverse=True):  # the shallowest failing check wins
            if c < depth:
                low = torch.logsumexp(stats.frontier_logp[:, c - 1], -1) < self.spec.threshold
                limit = torch.where(low, c, limit)
        return limit


@implements(OptTreeSpec)
class OptTree(Budgeted):
    def __init__(self, spec: OptTreeSpec):
        super().__init__(spec, spec.max_depth, spec.n, spec.n)

    def limit(self, r, stats, depth):
        gain = stats.frontier_logp.exp().sum(-1)  # [B, D] what each level's frontier adds to E
        return 1 + leading(gain[:, :-1] >= self.spec.delta)


@implements(LDLPTreeSpec)
class LDLPTree(LDLPBudgeted):
    def __init__(self, spec: LDLPTreeSpec, ldlp):
        super().__init__(spec, ldlp, spec.max_depth, spec.top_k, spec.nodes_per_level)

    def limit(self, r, stats, depth):
        return (self.predicted(r) + 1).clamp(min=self.spec.min_depth)
