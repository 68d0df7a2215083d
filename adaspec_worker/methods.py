"""Proposers: one per speculative method, found through a registry keyed by method name.

A proposer turns the drafter's state at the root (the pending token) into a `DraftTree` for the
target to verify, and may observe each round's verdict (adaptive methods do). Parameters come
from the torch-free specs in `specs.py`; this module binds behaviour to those names.
Proposers know nothing about the target's cache, verification or batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import STREAM_DRAFT, SamplingParams, sample, target_probs, uniform
from .specs import METHOD_SPECS, parse_spec
from .trees import DEFAULT_STATIC_TREE, DraftTree, StaticShape, chain_tree, grow_dynamic, grow_static

PROPOSERS: dict[str, Callable] = {}


def proposer(name: str):
    assert name in METHOD_SPECS, f"proposer {name!r} has no spec in specs.py"

    def deco(cls):
        PROPOSERS[name] = cls
        return cls
    return deco


@dataclass
class RoundInput:
    """What a proposer sees at the start of a round."""

    root: torch.Tensor  # [B] pending token
    root_logits: torch.Tensor | None  # [B, V] drafter output at the last committed entry
    root_hidden: torch.Tensor | None  # [B, H]
    drafter: object | None
    sp: SamplingParams
    seeds: torch.Tensor  # [B]
    counter: torch.Tensor  # [B] tokens emitted so far (random-number counter)


class Proposer:
    scratch = 0  # drafter cache slots a round's tree expansion needs beyond the committed entries
    max_nodes = 1  # most nodes a tree can have (root included)

    def __init__(self, spec):
        self.spec = spec

    def propose(self, r: RoundInput) -> DraftTree:
        raise NotImplementedError

    def observe(self, verdict, tree: DraftTree) -> None:
        """Feedback after verification; adaptive proposers override."""


@proposer("none")
class NoDraft(Proposer):
    def propose(self, r):
        return chain_tree(r.root, r.root.new_zeros(r.root.shape[0], 0))


@proposer("eagle")
class EagleChain(Proposer):
    def __init__(self, spec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k, spec.k + 1

    def propose(self, r):
        t = grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, top_k=1, depth=self.spec.k, total_tokens=self.spec.k)
        return t


@proposer("eagle-tree")
class EagleStaticTree(Proposer):
    def __init__(self, spec):
        super().__init__(spec)
        self.shape = StaticShape.from_paths(spec.tree or DEFAULT_STATIC_TREE)
        self.max_nodes = 1 + sum(len(lv) for lv in self.shape.levels)
        self.scratch = self.max_nodes

    def propose(self, r):
        return grow_static(r.root, r.root_logits, r.root_hidden, r.drafter.step, self.shape)


@proposer("eagle2")
class Eagle2Tree(Proposer):
    def __init__(self, spec):
        super().__init__(spec)
        s = spec
        self.max_nodes = 1 + min(s.total_tokens, s.top_k + (s.depth - 1) * s.top_k ** 2)
        self.scratch = s.top_k * s.depth

    def propose(self, r):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.depth, s.total_tokens)


@proposer("draft-model")
class DraftModelChain(Proposer):
    """Greedy: argmax chain. Sampling: y_j ~ q_j (the draft's own processed distribution), kept for min(1, p/q)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k, spec.k + 1

    def propose(self, r):
        k = self.spec.k
        if r.sp.greedy:
            return grow_dynamic(r.root, r.root_logits, None, r.drafter.step, top_k=1, depth=k, total_tokens=k)
        B = r.root.shape[0]
        u = uniform(r.seeds, r.counter, STREAM_DRAFT, k)
        logits, toks, qs = r.root_logits, [], []
        for j in range(k):
            q = target_probs(logits.float(), r.sp)  # [B, V]
            y = sample(q, u[:, j])
            toks.append(y); qs.append(q)
            if j + 1 < k:
                chain = torch.ones(B, 1, j + 1, dtype=torch.bool, device=y.device)  # sees every earlier draft
                out, _ = r.drafter.step(y[:, None], None, j + 1, j, chain)
                logits = out[:, 0]
        qs.append(torch.zeros_like(qs[0]))
        return chain_tree(r.root, torch.stack(toks, 1), draft_probs=torch.stack(qs, 1))


def build_proposer(name: str, params: dict | None) -> Proposer:
    spec = parse_spec(name, params)
    return PROPOSERS[name](spec)
