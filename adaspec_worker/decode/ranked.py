"""A draft tree of fixed shape whose nodes each row spends by its own signal: `grow_levels`, then `finish`.

The expansion is EAGLE-2's (`trees.grow_dynamic`): top-k frontier per level by cumulative log-probability,
for a fixed number of levels. Then each row's depth limit is computed from what the expansion saw
(`LevelStats`: the frontier's scores and the entropy along the best path, per level) by the method's
rule, and the row keeps its `nodes` best candidates (global rerank, EAGLE-2) among those
within its limit. A row whose signal says "short" gets a wide, shallow tree; "long", a deep one. The
shape ([B, 1 + nodes], `depth` levels) is the same for every row, so a round stays one CUDA graph, and
nothing leaves the device (no host sync). Candidates past a row's limit that still fill its budget
(when too few lie within it) are marked invalid: never accepted.

The expansion runs as two phases, `root_level` and `expand` (once per level), which `RankedSteps` holds plain or
compiled: compiled once each with dynamic shapes (the level and the scratch offset are sizes, not constants, and
the ancestry masks always cover the caller's scratch slots), so every depth of an adaptive menu runs the same two
traces instead of one trace of the whole unrolled expansion per depth (opt-tree's menu of seven depths took 95 s
of an H100 actor's warm-up, 46 s in pieces). The caller compiles its own last phase, the row limits and `finish`
(one small trace per depth).

Knows nothing of models or methods: it calls `step(tokens, hidden, level, offset, mask)` like `trees.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import topk_kernel
from .trees import DraftTree, StepFn


@dataclass
class LevelStats:
    """What the expansion saw, per level d = 1..depth (index d - 1)."""

    frontier_logp: torch.Tensor  # [B, D, K] cumulative log-probabilities of the frontier kept at each level
    entropy: torch.Tensor  # [B, D] entropy (nats, untempered) of the distribution level d was drawn from, best path


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    return -(lp.exp() * lp).nan_to_num().sum(-1)


@dataclass
class Frontier:
    """The K nodes a level expands next, best first."""

    tok: torch.Tensor  # [B, K] tokens
    score: torch.Tensor  # [B, K] cumulative log-probabilities
    idx: torch.Tensor  # [B, K] their candidate indices
    hidden: torch.Tensor | None  # [B, K, H] the drafter's hidden states they were drawn from
    anc: torch.Tensor  # [B, K, W] bool: the scratch slots of each node's ancestors (W = K * (depth - 1), at least 1)


@dataclass
class Candidates:
    """What one level offers: the root's K children, or the K * K children of a frontier."""

    tok: torch.Tensor  # [B, C]
    score: torch.Tensor  # [B, C] cumulative log-probabilities
    parent: torch.Tensor  # [B, C] the parent's candidate index (-1: the root)
    depth: torch.Tensor  # [B, C] the level, 1..depth
    frontier_logp: torch.Tensor  # [B, K] the frontier this level kept (LevelStats)
    entropy: torch.Tensor  # [B] the entropy of the distribution this level was drawn from, best path


@dataclass
class Grown:
    """A level expanded: its candidates and the frontier the next level expands."""

    front: Frontier
    cands: Candidates


def root_level(root_logits: torch.Tensor, root_hidden, top_k: int, slots: int) -> Grown:
    """root_logits [B, V] -> the root's top-k children, the first frontier, whose ancestry covers `slots` scratch
    slots (at least top_k * (depth - 1)). Every frontier tensor is dense, as `expand` makes the next one: a compiled
    `expand` then serves every level with one trace."""
    B, V = root_logits.shape
    dev = root_logits.device
    K = min(top_k, V)
    s, t = topk_kernel.log_softmax_topk(root_logits, K)  # [B, K]
    idx = torch.arange(K, device=dev).expand(B, K).contiguous()
    hidden = None if root_hidden is None else root_hidden[:, None].expand(B, K, -1).contiguous()
    anc = torch.zeros(B, K, max(slots, 1), dtype=torch.bool, device=dev)
    cands = Candidates(tok=t, score=s, parent=torch.full((B, K), -1, device=dev), depth=torch.ones_like(t),
                       frontier_logp=s, entropy=_entropy(torch.log_softmax(root_logits.float(), -1)))
    return Grown(front=Frontier(tok=t, score=s, idx=idx, hidden=hidden, anc=anc), cands=cands)


def expand(front: Frontier, step: StepFn, level: int, n_cand: int) -> Grown:
    """Run the drafter over the frontier of `level` (1 = the root's children) and keep the next frontier: the K best
    of its K * K children by cumulative log-probability. `n_cand` candidates came before this level's."""
    B, K = front.tok.shape
    dev = front.tok.device
    off = (level - 1) * K
    bi = torch.arange(B, device=dev)[:, None]
    own = torch.zeros_like(front.anc)
    own[:, :, off : off + K] = torch.eye(K, dtype=torch.bool, device=dev)
    seen = front.anc | own  # [B, K, W] each node's ancestors and itself
    mask = seen[:, :, : off + K]  # [B, K, off + K]
    logits, hidden = step(front.tok, front.hidden, level, off, mask)  # [B, K, V], [B, K, H]
    cs, ct = topk_kernel.log_softmax_topk(logits, K)  # [B, K, K]
    score = (front.score[:, :, None] + cs).reshape(B, K * K)
    tok = ct.reshape(B, K * K)
    fs, pick = topk_kernel.top_k(score, K)  # next frontier [B, K], best first
    local_parent = pick // K
    nxt = Frontier(tok=torch.gather(tok, 1, pick), score=fs, idx=n_cand + pick,
                   hidden=None if hidden is None else hidden[bi, local_parent], anc=seen[bi, local_parent])
    cands = Candidates(tok=tok, score=score, parent=front.idx[:, :, None].expand(B, K, K).reshape(B, K * K),
                       depth=torch.full_like(tok, level + 1), frontier_logp=fs,
                       entropy=_entropy(torch.log_softmax(logits[:, 0].float(), -1)))  # the best frontier node's
    return Grown(front=nxt, cands=cands)


def level_stats(levels: list[Candidates]) -> LevelStats:
    return LevelStats(frontier_logp=torch.stack([c.frontier_logp for c in levels], 1),
                      entropy=torch.stack([c.entropy for c in levels], 1))


def finish(root: torch.Tensor, levels: list[Candidates], limit: torch.Tensor | None, nodes: int) -> DraftTree:
    """Each row keeps its `nodes` best candidates within its depth limit ([B], None: no limit), in topological
    order; candidates past the limit that still fill the budget are marked invalid."""
    B = root.shape[0]
    dev = root.device
    tok, score = torch.cat([c.tok for c in levels], 1), torch.cat([c.score for c in levels], 1)  # [B, C]
    par, dep = torch.cat([c.parent for c in levels], 1), torch.cat([c.depth for c in levels], 1)
    key = score.double() - 1e-9 * dep  # a child never outranks its parent: the kept set is closed under ancestors
    if limit is not None:
        key = torch.where(dep <= limit[:, None], key, float("-inf"))
    n = min(nodes, key.shape[1])
    top = topk_kernel.top_k(key, n).indices  # [B, n]
    sel = top.sort(dim=-1).values  # topological order
    inside = torch.gather(key, 1, sel) > float("-inf")  # [B, n] within the row's limit
    bi = torch.arange(B, device=dev)[:, None]
    inv = torch.full((B, key.shape[1] + 1), -1, device=dev, dtype=torch.long)
    inv[bi, sel] = torch.arange(n, device=dev).expand(B, n)
    p = torch.gather(par, 1, sel)
    parent_node = torch.where(p < 0, 0, torch.gather(inv, 1, p.clamp(min=0)) + 1).clamp(min=0)
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    return DraftTree(
        tokens=torch.cat([root[:, None], torch.gather(tok, 1, sel)], 1),
        parents=torch.cat([zero, parent_node], 1),
        depth=torch.cat([zero, torch.gather(dep, 1, sel)], 1),
        valid=torch.cat([torch.ones_like(zero, dtype=torch.bool), inside], 1),
        levels=len(levels),
        width=levels[0].tok.shape[1],
    )


@dataclass
class RankedSteps:
    """The expansion's phases as the engine runs them: plain, or each through `compile` (`compile_with`)."""

    root_level: Callable[..., Grown] = root_level
    expand: Callable[..., Grown] = expand

    @classmethod
    def compile_with(cls, compile: Callable) -> RankedSteps:
        return cls(root_level=compile(root_level), expand=compile(expand))


def grow_levels(root_logits: torch.Tensor, root_hidden, step: StepFn, top_k: int, depth: int, slots: int = 0,
                steps: RankedSteps | None = None) -> list[Candidates]:
    """root_logits [B, V] -> `depth` levels of top-k expansion: what each level offers, for `finish` (after the
    method's row limits, from `level_stats`). `slots`: the drafter's scratch slots the ancestry masks cover, the
    same for every depth a caller runs (0: what `depth` needs)."""
    steps = steps or RankedSteps()
    K = min(top_k, root_logits.shape[1])
    assert slots == 0 or slots >= K * (depth - 1), f"{slots} scratch slots cannot hold {depth - 1} levels of {K}"
    grown = steps.root_level(root_logits, root_hidden, top_k, slots or K * (depth - 1))
    levels, n_cand = [grown.cands], grown.cands.tok.shape[1]
    for level in range(1, depth):
        grown = steps.expand(grown.front, step, level, n_cand)
        levels.append(grown.cands)
        n_cand += grown.cands.tok.shape[1]
    return levels


def leading(go: torch.Tensor) -> torch.Tensor:
    """go [B, D] bool per level -> [B] the number of leading True levels (a stopping rule's depth)."""
    return go.long().cumprod(-1).sum(-1)
