"""The proposer interface, what it sees each round, and the registry keyed by spec class.

A proposer turns the drafter's state at the root (the pending token) into a `DraftTree` for the
target to verify, and may observe each round's verdict (adaptive methods do). Its parameters are the
torch-free spec from `jobs/specs.py`; `@implements(Eagle2Spec)` binds a proposer class to its spec
class, and `PROPOSERS[type(spec)]` finds it. The builder (`decode/build.py`) imports every proposer
module, so registration happens there, explicitly.

A round, as the engine drives it:

    proposer.begin(BatchInfo(...))              once per batch (the start of generate(), or of each batch
                                                when continuous batching is off)
    proposer.admit(rows, prompts)               continuous batching: new rows took these slots
    plan = proposer.first_plan(round_input)     planning proposers only: [B] device plan, or None
    tree = proposer.propose(round_input, plan)  plan: the host list the engine keeps, or None
    ... one target pass and verification ...
    plan = proposer.observe(verdict, tree, round_input)   [B] next plan (rides the round's one sync), or None
    proposer.landed(Landed(...))                the round's outcomes on the host (the next round may be queued)
    proposer.persist()                          the worker, after a shard: state the spec keeps with the job

The engine owns the plan; `plan_key(plan)` says what of it changes the round's shapes (part of the
CUDA-graph key). Proposers know nothing about the target's cache, verification or batching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from jobs.specs import MethodSpec

from ..sampling import STREAM_DRAFT, SamplingParams, sample, target_probs, uniform
from ..stats import RowOutcome
from ..trees import DraftTree

PROPOSERS: dict[type[MethodSpec], type[Proposer]] = {}


def implements(spec_class: type[MethodSpec]):
    """Register a proposer class as the implementation of `spec_class` (exactly one per spec class)."""

    def deco(cls: type[Proposer]) -> type[Proposer]:
        assert spec_class not in PROPOSERS, (
            f"{spec_class.__name__} already has a proposer ({PROPOSERS[spec_class].__name__}), not also {cls.__name__}")
        cls.spec_class = spec_class
        PROPOSERS[spec_class] = cls
        return cls
    return deco


@dataclass
class BatchInfo:
    """What a proposer may know about the batch of one generate() call."""

    B: int  # batch rows, padding included
    device: torch.device
    sampling: SamplingParams
    prompts: list[list[int]]  # [B] token ids (padding rows repeat the first prompt)


@dataclass(frozen=True)
class Variant:
    """One round shape a proposer may run (each its own CUDA graphs), for warm-up to force (`Proposer.force`)."""

    key: object  # what `force` takes (an adaptive menu's `Shape`); None: the proposer's only shape
    max_emit: int  # at most this many tokens a round of it emits (its tree's depth + 1, or an upper bound)


@dataclass
class Landed:
    """A landed round as the host sees it (`Proposer.landed`)."""

    origin: list[int]  # [B] the row each slot decoded; -1: padding, or a row that had already finished
    shape: tuple  # the proposer's plan_key when the round was launched
    outcomes: list[RowOutcome]  # [B] what each slot did
    seconds: float | None  # the round's draft + verify + host seconds; None when a compile or capture fell in it
    lag: int = 1  # the next launch is this many rounds after this one (2: one was queued before this one landed)

    @property
    def B(self) -> int:
        return len(self.origin)


@dataclass
class RoundInput:
    """What a proposer sees at the start of a round."""

    root: torch.Tensor  # [B] pending token
    root_logits: torch.Tensor | None  # [B, V] drafter output at the last committed entry
    root_hidden: torch.Tensor | None  # [B, H]
    drafter: object | None
    sampling: SamplingParams
    seeds: torch.Tensor  # [B]
    counter: torch.Tensor  # [B] tokens emitted so far (random-number counter)
    ldlp_feat: torch.Tensor | None = None  # [B, 2H] emb(bonus) ++ target hidden that produced it
    target_logits: torch.Tensor | None = None  # [B, N, V] target logits at the nodes just verified (observe only)


class Proposer:
    """Turns the drafter's state at the root into a draft tree.

    Adaptive proposers keep per-row device state (`row_state`) and may return, from `observe`, a [B]
    integer plan for the next round (e.g. LDLP's chain length). The engine brings it to the host with
    the round's one sync and passes it back to the next `propose` and `plan_key`."""

    spec_class: type[MethodSpec]  # set by @implements
    scratch = 0  # drafter cache slots a round's tree expansion needs beyond the committed entries
    max_nodes = 1  # most nodes a tree can have (root included)
    max_emit = 0  # most tokens a round can emit (its tree's depth + 1) where smaller than max_nodes; 0: max_nodes
    returns_plan = False  # first_plan()/observe() return a plan that rides the round's sync
    graphable = True  # no host sync inside propose/observe: the rounds can be CUDA graphs
    # propose is a function of the round input, the spec and per-row state tensors, with Python state only as a
    # constant for the whole call (an adaptive call's shape) and no branch on a tensor's value: where the target is
    # compiled, the engine compiles it too, so the tree's small ops fuse around the drafter steps
    traceable = False
    ldlp = None  # the draft-length predictor it reads, for proposers that take one
    cost = None  # the measured cost model (`decode/cost.py`), for proposers whose policy reads one
    drafting = True  # False for a call that backs off to plain decoding: the engine leaves the drafter idle
    references = False  # benchmark-only: `reference(round_input, judge)` runs before each round, uncharged

    def __init__(self, spec: MethodSpec):
        self.spec = spec

    def compile_propose(self, compile):
        """The propose the engine runs where rounds are compiled (a `traceable` proposer): by default `propose`
        through `compile`, one trace of the whole round's tree building per shape."""
        return compile(self.propose)

    def begin(self, batch: BatchInfo) -> None:
        """Called once per generate() before the first round."""

    def first_plan(self, r: RoundInput) -> torch.Tensor | None:
        """The first round's [B] plan (proposers that return plans); later plans come from `observe`."""
        return None

    def propose(self, r: RoundInput, plan: list[int] | None) -> DraftTree:
        raise NotImplementedError

    def plan_key(self, plan: list[int] | None) -> tuple:
        """What of the host-side plan changes the round's shapes (part of the CUDA graph key)."""
        return ()

    def observe(self, verdict, tree: DraftTree, r: RoundInput) -> torch.Tensor | None:
        """Feedback after verification; may return the next round's [B] plan."""
        return None

    def variants(self) -> list[Variant]:
        """The round shapes this proposer may run: warm-up (`warmup.py`) forces each in turn. One, unless the proposer
        chooses among shapes."""
        return [Variant(None, self.max_emit or self.max_nodes)]

    def learned(self) -> object:
        """A snapshot of what the proposer learns across calls (token-recycling's table, a retrieval datastore), for
        `restore`: warm-up's dummy rows must leave no trace in it. None: nothing learnt across calls."""
        return None

    def restore(self, snapshot) -> None:
        """Put back what `learned()` returned, in place (captured graphs keep reading the same buffers)."""

    def force(self, variant) -> None:
        """Run `variant` (a `Variant.key` of `variants()`) in the next calls, which are no evidence for choosing;
        None: choose again. Proposers with one shape ignore it."""

    def landed(self, report: Landed) -> None:
        """A round landed on the host (before the engine launches the one after the round already queued): proposers
        that learn what rounds cost, or choose the next round's shape, read it here. No device work."""

    def persist(self) -> None:
        """Write what the spec asks to keep with the job (token-recycling's matrix, a retrieval datastore) to its
        path; called by the worker after each shard, outside generate(). Most proposers keep nothing."""

    def row_state(self, name: str, B: int, fill, dtype, device, width: int | None = None) -> torch.Tensor:
        """A per-row state tensor [B] (or [B, width]) that keeps its address across calls (a view of a capacity
        buffer); admit() resets a new row's entry to `fill`."""
        full = self.__dict__.setdefault("_full", {}).get(name)
        shape = (B,) if width is None else (B, width)
        if full is None or full.shape[0] < B or full.shape[1:] != shape[1:] or full.device != torch.device(device):
            full = self._full[name] = torch.empty(shape, dtype=dtype, device=device)
        self.__dict__.setdefault("_fill", {})[name] = fill  # what admit() resets a row to
        view = full[:B]
        view.fill_(fill)
        setattr(self, name, view)
        return view

    def admit(self, rows: torch.Tensor, prompts: list[list[int]]) -> None:
        """Continuous batching: new rows (prompts, token ids) took batch slots `rows` [k]. Every `row_state`
        goes back to its start value there; proposers with prompt-dependent state extend this."""
        for name, fill in self.__dict__.get("_fill", {}).items():
            getattr(self, name)[rows] = fill

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


def sampled_chain(r: RoundInput, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K drafts, each drawn from the drafter's processed distribution q (the row's own draft stream):
    tokens [B, K] and q at every node [B, K + 1, V] (the last row zero: no draft follows the chain)."""
    B = r.root.shape[0]
    u = uniform(r.seeds, r.counter, STREAM_DRAFT, K)  # [B, K]
    logits, toks, qs = r.root_logits, [], []
    for j in range(K):
        q = target_probs(logits.float(), r.sampling)  # [B, V]
        y = sample(q, u[:, j])
        toks.append(y)
        qs.append(q)
        if j + 1 < K:
            chain = torch.ones(B, 1, j + 1, dtype=torch.bool, device=y.device)  # sees every earlier draft
            out, _ = r.drafter.step(y[:, None], None, j + 1, j, chain)
            logits = out[:, 0]
    qs.append(torch.zeros_like(qs[0]))
    return torch.stack(toks, 1), torch.stack(qs, 1)


def eagle2_max_nodes(top_k: int, depth: int, total_tokens: int) -> int:
    """Most nodes (root included) of an EAGLE-2 tree: the rerank budget, or every candidate if fewer."""
    return 1 + min(total_tokens, top_k + (depth - 1) * top_k ** 2)
