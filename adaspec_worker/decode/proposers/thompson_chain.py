"""Chains whose length a Thompson-sampling controller sets per row and round: `eesd` and `eagle-thompson`.

Both draft a chain from their drafter (`eesd`: the early-exit head of `decode/early_exit.py`; `eagle-thompson`:
an EAGLE head) to the batch's longest chosen length and mask each row's nodes past its own choice, so a
round has one of a few shapes (the spec's `lengths`). The controller (`decode/thompson.py`) keeps each row's
Beta posterior on the device; after verification it takes the round's evidence and draws the next lengths,
which ride the round's one sync as the plan. Drafting: the greedy argmax chain (verified by the greedy rule
or, sampled, by the coupled tree rule); `eesd` at T > 0 samples each token from the head's own processed
distribution q and hands q to the chain rule, min(1, p/q). Parameters and sources: `EESDSpec`,
`EagleThompsonSpec`. Knows nothing of the engine or the drafter's internals.
"""

from __future__ import annotations

import torch

from jobs.specs import EagleThompsonSpec, EESDSpec, MethodSpec

from ..thompson import ThompsonConfig, ThompsonLength
from ..trees import DraftTree, chain_tree
from .base import BatchInfo, Proposer, RoundInput, draft_chain, implements, sampled_chain


class ThompsonChain(Proposer):
    """A chain of Thompson-sampled length per row. State: posteriors `a`, `b` [B] and the lengths `k` [B]."""

    returns_plan = True
    sampled_drafts = False  # True: at T > 0 draw drafts from q and verify by min(1, p/q)

    def __init__(self, spec: MethodSpec, draft_cost: float):
        super().__init__(spec)
        self.control = ThompsonLength(
            ThompsonConfig(spec.lengths, draft_cost, spec.prior_accept, spec.prior_reject, spec.decay)
        )
        self.scratch, self.max_nodes = self.control.k_max, self.control.k_max + 1

    def begin(self, batch: BatchInfo) -> None:
        self.row_state("a", batch.B, self.spec.prior_accept, torch.float64, batch.device)
        self.row_state("b", batch.B, self.spec.prior_reject, torch.float64, batch.device)
        self.row_state("k", batch.B, 0, torch.long, batch.device)  # the plan on the device, for graph replays

    def first_plan(self, r: RoundInput) -> torch.Tensor:
        """The first round's lengths, drawn from the prior (the engine syncs once for them)."""
        self.k.copy_(self.control.choose(self.a, self.b, r.seeds, r.counter))
        return self.k

    def plan_key(self, plan):
        return (max(plan),)

    def propose(self, r: RoundInput, plan: list[int] | None) -> DraftTree:
        K = max(plan)  # one of the spec's lengths: the longest row's choice
        valid = torch.arange(K, device=self.k.device)[None, :] < self.k[:, None]  # [B, K]
        if self.sampled_drafts and not r.sampling.greedy:
            toks, q = sampled_chain(r, K)
            return chain_tree(r.root, toks, valid=valid, draft_probs=q)
        return chain_tree(r.root, draft_chain(r, K)[0], valid=valid)

    def observe(self, verdict, tree, r):
        self.control.update(self.a, self.b, verdict.n_accepted, tree.valid[:, 1:].sum(1))
        self.k.copy_(self.control.choose(self.a, self.b, r.seeds, r.counter))
        return self.k


@implements(EESDSpec)
class EESD(ThompsonChain):
    sampled_drafts = True


@implements(EagleThompsonSpec)
class EagleThompson(ThompsonChain):
    pass
