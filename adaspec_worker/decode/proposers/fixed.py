"""Fixed-shape proposers: none, eagle, eagle-tree, eagle2, draft-model.

Each drafts the same shape every round (a chain of k, a static tree, an EAGLE-2 tree of a set
budget); parameters and sources are documented on their specs in `jobs/specs.py`. `none` is an
empty chain, so plain decoding runs through the same loop as every speedup.
"""
from __future__ import annotations

from jobs.specs import DraftModelSpec, Eagle2Spec, EagleSpec, EagleTreeSpec, NoneSpec

from ..trees import DEFAULT_STATIC_TREE, StaticShape, chain_tree, grow_dynamic, grow_static
from .base import Proposer, draft_chain, eagle2_max_nodes, implements, sampled_chain


@implements(NoneSpec)
class NoDraft(Proposer):
    traceable = True

    def propose(self, r, plan):
        return chain_tree(r.root, r.root.new_zeros(r.root.shape[0], 0))


@implements(EagleSpec)
class EagleChain(Proposer):
    traceable = True

    def __init__(self, spec: EagleSpec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k, spec.k + 1

    def propose(self, r, plan):
        return chain_tree(r.root, draft_chain(r, self.spec.k)[0])


@implements(EagleTreeSpec)
class EagleStaticTree(Proposer):
    traceable = True

    def __init__(self, spec: EagleTreeSpec):
        super().__init__(spec)
        self.shape = StaticShape.from_paths(spec.tree or DEFAULT_STATIC_TREE)
        self.max_nodes = 1 + sum(len(level) for level in self.shape.levels)
        self.scratch = self.max_nodes

    def propose(self, r, plan):
        return grow_static(r.root, r.root_logits, r.root_hidden, r.drafter.step, self.shape)


@implements(Eagle2Spec)
class Eagle2Tree(Proposer):
    traceable = True

    def __init__(self, spec: Eagle2Spec):
        super().__init__(spec)
        self.max_nodes = eagle2_max_nodes(spec.top_k, spec.depth, spec.total_tokens)
        self.max_emit = spec.depth + 1
        self.scratch = spec.top_k * spec.depth

    def propose(self, r, plan):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.depth, s.total_tokens)


@implements(DraftModelSpec)
class DraftModelChain(Proposer):
    """Greedy: argmax chain. Sampling: y_j ~ q_j (the draft's own processed distribution), kept for min(1, p/q)."""

    def __init__(self, spec: DraftModelSpec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k, spec.k + 1

    def propose(self, r, plan):
        k = self.spec.k
        if r.sampling.greedy:
            return chain_tree(r.root, draft_chain(r, k)[0])
        toks, q = sampled_chain(r, k)  # [B, k], [B, k + 1, V]
        return chain_tree(r.root, toks, draft_probs=q)
