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

from ..sampling import STREAM_DRAFT, SamplingParams, sample, target_probs, uniform
from jobs.specs import METHOD_SPECS, parse_spec
from ..trees import DEFAULT_STATIC_TREE, DraftTree, StaticShape, chain_tree, grow_dynamic, grow_static

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
    ldlp_feat: torch.Tensor | None = None  # [B, 2H] emb(bonus) ++ target hidden that produced it


class Proposer:
    """Turns the drafter's state at the root into a draft tree.

    Adaptive proposers keep per-row device state and may return, from `observe`, a [B] integer
    plan for the next round (e.g. LDLP's chain length). The engine brings it to the host with the
    round's one sync and hands it back as `self.plan` (a list) before the next `propose`."""

    scratch = 0  # drafter cache slots a round's tree expansion needs beyond the committed entries
    max_nodes = 1  # most nodes a tree can have (root included)
    wants_features = False  # needs RoundInput.ldlp_feat
    wants_plan = False  # observe() returns a plan that rides the round's sync
    graphable = True  # no host sync inside propose/observe: the rounds can be CUDA graphs
    plan: list[int] | None = None

    def __init__(self, spec):
        self.spec = spec

    def start(self, B: int, device, sp: SamplingParams, prompts: list[list[int]], engine) -> None:
        """Called once per generate() before the first round."""

    def propose(self, r: RoundInput) -> DraftTree:
        raise NotImplementedError

    def prime(self, r: RoundInput) -> None:
        """Set the first round's plan (proposers with `wants_plan`)."""

    def plan_key(self) -> tuple:
        """What of the host-side plan changes the round's shapes (part of the CUDA graph key)."""
        return ()

    def observe(self, verdict, tree: DraftTree, r: RoundInput) -> torch.Tensor | None:
        """Feedback after verification; may return the next round's [B] plan."""
        return None

    def row_state(self, name: str, B: int, fill, dtype, device) -> torch.Tensor:
        """A per-row state tensor that keeps its address across calls (a view of a capacity buffer)."""
        full = self.__dict__.setdefault("_full", {}).get(name)
        if full is None or full.shape[0] < B or full.device != torch.device(device):
            full = self._full[name] = torch.empty(B, dtype=dtype, device=device)
        view = full[:B]
        view.fill_(fill)
        setattr(self, name, view)
        return view

    def select(self, rows: torch.Tensor) -> None:
        """Rows left the batch: keep per-row state aligned, in place."""
        n = rows.shape[0]
        for name, full in self.__dict__.get("_full", {}).items():
            full[:n] = full[rows]
            setattr(self, name, full[:n])


def draft_chain(r: RoundInput, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy chain of k draft tokens: tokens, their draft log-probabilities and the draft entropy (nats)
    of each step's untempered distribution, all [B, k]. One drafter step per token, no host sync."""
    B = r.root.shape[0]
    logits, hidden = r.root_logits, r.root_hidden
    toks, lps, ents = [], [], []
    for j in range(k):
        lp = torch.log_softmax(logits.float(), -1)  # [B, V]
        t = lp.argmax(-1)
        toks.append(t)
        lps.append(lp.gather(1, t[:, None])[:, 0])
        ents.append(-(lp.exp() * lp).nan_to_num().sum(-1))
        if j + 1 < k:
            chain = torch.ones(B, 1, j + 1, dtype=torch.bool, device=t.device)  # sees every earlier draft
            out, hid = r.drafter.step(t[:, None], None if hidden is None else hidden[:, None], j + 1, j, chain)
            logits, hidden = out[:, 0], (None if hid is None else hid[:, 0])
    return torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(ents, 1)


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
        return chain_tree(r.root, draft_chain(r, self.spec.k)[0])


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
            return chain_tree(r.root, draft_chain(r, k)[0])
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


def build_proposer(name: str, params: dict | None, ldlp=None) -> Proposer:
    spec = parse_spec(name, params)
    cls = PROPOSERS[name]
    return cls(spec, ldlp) if getattr(cls, "needs_ldlp", False) else cls(spec)


from . import adaptive  # noqa: E402,F401  (registers the adaptive proposers beside these)
