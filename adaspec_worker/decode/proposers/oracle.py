"""The benchmark-only oracle: a ceiling on what any draft length or tree could have achieved, round by round.

Each round, before the charged work, the engine calls `reference(round_input, judge)` in a phase of its own
that is timed apart and never charged (`EngineStats.reference_seconds`): the oracle grows the largest draft
it knows (an EAGLE-2 tree of `top_k` x `k_max` levels keeping `total_tokens` nodes, 0 = every candidate)
and has the target verify it with the round's own rule (`judge`: the same target pass, seeds and position
counters as the charged pass, nothing committed). The accepted path is the useful part. The charged round
then drafts only that: a chain of the path's tokens (one drafter step per level, as a chain of that length
costs) of the smallest length bucket covering the batch's longest useful part, masked per row, verified by
the engine as usual. Greedy or sampled: the coupled and greedy rules accept the same path again, so its
tau is that of the largest tree, and no method drafting a sub-tree of it accepts more in that round.

The reference's useful lengths come to the host (one sync inside the uncharged phase) to pick the bucket;
propose and observe never sync. A row's text is the verification rule's, never the oracle's.
"""

from __future__ import annotations

import torch

from jobs.specs import OracleSpec

from ..trees import chain_tree, grow_dynamic
from .base import BatchInfo, Proposer, eagle2_max_nodes, implements

CHAIN_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@implements(OracleSpec)
class Oracle(Proposer):
    references = True  # the engine runs `reference` before each round, out of the charged time

    def __init__(self, spec: OracleSpec):
        super().__init__(spec)
        total = spec.total_tokens or 10**9
        self.reference_nodes = eagle2_max_nodes(spec.top_k, spec.k_max, total)
        self.max_nodes = self.reference_nodes  # the workspace holds the reference tree too
        self.scratch = spec.top_k * spec.k_max

    def begin(self, batch: BatchInfo) -> None:
        self.row_state("useful", batch.B, 0, torch.long, batch.device)  # [B] accepted length of the reference
        self.row_state("path", batch.B, 0, torch.long, batch.device, width=self.spec.k_max)  # [B, k_max] its tokens

    def reference(self, r, judge):
        """Grow the largest tree, have the target verify it (judge(tree) -> Verdict); keep the accepted path.
        Returns [B] the useful length per row."""
        s = self.spec
        tree = grow_dynamic(
            r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.k_max, s.total_tokens or 10**9
        )
        verdict = judge(tree)
        tokens = torch.gather(tree.tokens, 1, verdict.path)[:, 1:]  # [B, levels] root excluded; past n: filler
        self.path.zero_()
        self.path[:, : tokens.shape[1]].copy_(tokens)
        self.useful.copy_(verdict.n_accepted)
        return self.useful

    def chain_len(self, plan: list[int] | None) -> int:
        longest = max(plan) if plan else 0
        return min(next(b for b in CHAIN_BUCKETS + (10**9,) if b >= longest), self.spec.k_max)

    def plan_key(self, plan):
        return (self.chain_len(plan),)

    def propose(self, r, plan):
        K = self.chain_len(plan)
        B = r.root.shape[0]
        toks = self.path[:, :K]  # [B, K]
        hidden = r.root_hidden
        for j in range(K - 1):  # the drafter steps a chain of K costs, along the useful path
            chain = torch.ones(B, 1, j + 1, dtype=torch.bool, device=toks.device)
            _, hid = r.drafter.step(toks[:, j : j + 1], None if hidden is None else hidden[:, None], j + 1, j, chain)
            hidden = None if hid is None else hid[:, 0]
        valid = torch.arange(K, device=toks.device)[None, :] < self.useful[:, None]  # [B, K]
        return chain_tree(r.root, toks, valid=valid)
