"""Draft trees: the shape every proposer hands the verifier, and the builders that grow them.

A `DraftTree` holds, per row, N nodes in topological order (parents before children); node 0 is
the root (the pending token the target has not processed yet). Everything is batched [B, N] and
built with tensor ops: the only Python loops run over tree depth or a static tree's levels,
never over nodes or rows.

Builders:
  - `grow_dynamic`  EAGLE-2 (Li et al., 2024): expand the top_k frontier nodes by cumulative
                    log-probability per level, then rerank all candidates globally and keep the
                    best `total_tokens`. A chain of k is the same builder with top_k = 1.
  - `grow_static`   a fixed tree given as paths of child ranks (EAGLE-1's "tree choices").
This module knows nothing about models: it calls a `step(tokens, hidden, level, offset, mask)`
function that runs the drafter over frontier nodes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import topk_kernel

# step(tokens [B,T], hidden [B,T,H] | None, level, scratch_offset, scratch_mask [B,T,W]) -> (logits [B,T,V], hidden)
StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [B, N] node tokens; node 0 = root
    parents: torch.Tensor  # [B, N] parent node index (root: 0)
    depth: torch.Tensor  # [B, N] root = 0
    valid: torch.Tensor  # [B, N] False for padding nodes (never accepted)
    levels: int  # static bound on depth (Python int: sizes the verifier's loops and paths)
    width: int  # static bound on children per node
    draft_probs: torch.Tensor | None = None  # [B, N, V] q at each node, sampled chains only
    ancestry: torch.Tensor | None = None  # [B, N, N] `ancestors()` where already made (the target pass's mask)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> torch.Tensor:
        """[B, N, N] bool: anc[b, i, j] = j is i or an ancestor of i."""
        if self.ancestry is not None:
            return self.ancestry
        B, N = self.parents.shape
        eye = torch.eye(N, dtype=torch.bool, device=self.parents.device).expand(B, N, N)
        anc = eye
        idx = self.parents[:, :, None].expand(B, N, N)
        for _ in range(self.levels if N > 1 else 0):  # `levels` is a static bound: no host sync
            anc = eye | torch.gather(anc, 1, idx)
        return anc

    def positions(self, base: torch.Tensor) -> torch.Tensor:
        return base[:, None] + self.depth


@dataclass
class TreePass:
    """What the target's pass over a tree reads besides its tokens."""

    positions: torch.Tensor  # [B, N] each node's position: the row's committed length + its depth
    mask: torch.Tensor  # [B, N, N] bool: the node's ancestors (itself included)


def tree_pass(tree: DraftTree, lens: torch.Tensor) -> TreePass:
    """The positions and ancestry mask of `tree`'s nodes over caches holding `lens` [B] committed entries."""
    return TreePass(positions=tree.positions(lens), mask=tree.ancestors())


def chain_tree(root: torch.Tensor, drafts: torch.Tensor, valid: torch.Tensor | None = None,
               draft_probs: torch.Tensor | None = None) -> DraftTree:
    """root [B], drafts [B, k] -> a chain tree of k + 1 nodes."""
    B, k = drafts.shape
    dev = drafts.device
    ar = torch.arange(k + 1, device=dev)
    v = torch.ones(B, k + 1, dtype=torch.bool, device=dev)
    if valid is not None:
        v[:, 1:] = valid
    return DraftTree(tokens=torch.cat([root[:, None], drafts], 1), parents=(ar - 1).clamp(min=0).expand(B, -1),
                     depth=ar.expand(B, -1), valid=v, levels=k, width=1, draft_probs=draft_probs)


def grow_dynamic(root: torch.Tensor, root_logits: torch.Tensor, root_hidden, step: StepFn,
                 top_k: int, depth: int, total_tokens: int, keep: str = "rerank",
                 stop: Callable[[int, torch.Tensor], bool] | None = None) -> DraftTree:
    """EAGLE-2 dynamic tree. root [B]; root_logits [B, V] from the drafter at the root.

    keep="rerank": all candidates compete globally for `total_tokens` slots (EAGLE-2).
    keep="frontier": the tree is exactly the top_k frontier of every level (OPT-Tree's level-wise form).
    stop(level, frontier_scores [B, K]) -> True ends the expansion after that level (DDD, OPT-Tree)."""
    B, V = root_logits.shape
    dev = root_logits.device
    K = min(top_k, V)
    s, t = topk_kernel.log_softmax_topk(root_logits, K)  # [B, K]
    cand_tok, cand_score, cand_parent, cand_depth = [t], [s], [torch.full((B, K), -1, device=dev)], [1]
    front_tok, front_score, front_idx = t, s, torch.arange(K, device=dev).expand(B, K)
    kept = [front_idx]
    front_hidden = None if root_hidden is None else root_hidden[:, None].expand(B, K, -1)
    n_cand = K
    width = K * max(depth - 1, 0)  # scratch slots the frontier levels occupy in the drafter's cache
    front_anc = torch.zeros(B, K, max(width, 1), dtype=torch.bool, device=dev)
    bi = torch.arange(B, device=dev)[:, None]
    for level in range(1, depth):
        if stop is not None and stop(level, front_score):
            break
        off = (level - 1) * K
        own = torch.zeros_like(front_anc)  # (no scalar index_put: rounds are graph-captured)
        own[:, :, off: off + K] = torch.eye(K, dtype=torch.bool, device=dev)
        mask = (front_anc | own)[:, :, : off + K]
        logits, hidden = step(front_tok, front_hidden, level, off, mask)  # [B, K, V], [B, K, H]
        cs, ct = topk_kernel.log_softmax_topk(logits, K)  # [B, K, K]
        score = (front_score[:, :, None] + cs).reshape(B, K * K)
        parent = front_idx[:, :, None].expand(B, K, K).reshape(B, K * K)
        cand_tok.append(ct.reshape(B, K * K))
        cand_score.append(score)
        cand_parent.append(parent)
        cand_depth.append(level + 1)
        fs, pick = topk_kernel.top_k(score, K)  # next frontier [B, K]
        local_parent = pick // K
        front_tok = torch.gather(ct.reshape(B, K * K), 1, pick)
        front_score = fs
        front_idx = n_cand + pick
        kept.append(front_idx)
        front_hidden = None if hidden is None else hidden[bi, local_parent]
        front_anc = (front_anc | own)[bi, local_parent]
        n_cand += K * K
    tok = torch.cat(cand_tok, 1)
    score = torch.cat(cand_score, 1)
    par = torch.cat(cand_parent, 1)
    dep = torch.cat([torch.full((B, c.shape[1]), d, device=dev) for c, d in zip(cand_tok, cand_depth)], 1)
    C = tok.shape[1]
    if keep == "frontier":
        sel = torch.cat(kept, 1).sort(dim=-1).values
    else:
        # a child's score never exceeds its parent's; the depth tiebreak makes that strict, so the
        # kept set is closed under ancestors
        key = score.double() - 1e-9 * dep
        sel = topk_kernel.top_k(key, min(total_tokens, C)).indices.sort(dim=-1).values  # [B, n] topological order
    n = sel.shape[1]
    inv = torch.full((B, C + 1), -1, device=dev, dtype=torch.long)
    inv[bi, sel] = torch.arange(n, device=dev).expand(B, n)
    p = torch.gather(par, 1, sel)
    parent_node = torch.where(p < 0, 0, torch.gather(inv, 1, p.clamp(min=0)) + 1)
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    return DraftTree(tokens=torch.cat([root[:, None], torch.gather(tok, 1, sel)], 1),
                     parents=torch.cat([zero, parent_node], 1),
                     depth=torch.cat([zero, torch.gather(dep, 1, sel)], 1),
                     valid=torch.ones(B, n + 1, dtype=torch.bool, device=dev), levels=max(cand_depth), width=K)


# EAGLE-1's default-like small static tree: paths of child ranks (0 = the drafter's top token)
DEFAULT_STATIC_TREE = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0),
    (0, 0, 0, 0, 0),
)


_STATIC_CACHE: dict = {}


@dataclass(frozen=True)
class StaticShape:
    """A static tree precomputed level by level: parent (index within previous level) and rank."""

    levels: tuple[tuple[tuple[int, int], ...], ...]

    def tensors(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parent, rank) index tensors per level, made once per device (no host copies inside a round)."""
        key = str(device)
        if key not in _STATIC_CACHE.setdefault(self, {}):
            _STATIC_CACHE[self][key] = [(torch.tensor([p for p, _ in lv], device=device),
                                         torch.tensor([r for _, r in lv], device=device)) for lv in self.levels]
        return _STATIC_CACHE[self][key]

    @property
    def width(self) -> int:
        """Most children any node has."""
        return max(max(Counter(p for p, _ in lv).values()) for lv in self.levels)  # (no heapq: traced by dynamo)

    @classmethod
    def from_paths(cls, paths) -> StaticShape:
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        assert paths and all(len(p) >= 1 for p in paths), "a static tree needs at least one path"
        index = {(): 0}
        levels: list[list[tuple[int, int]]] = []
        for p in paths:
            assert p[:-1] in index, f"static tree path {p} lacks its parent {p[:-1]}"
            d = len(p)
            while len(levels) < d:
                levels.append([])
            index[p] = len(levels[d - 1])
            levels[d - 1].append((index[p[:-1]] if d > 1 else 0, p[-1]))
        return cls(tuple(tuple(lv) for lv in levels))


def grow_static(root: torch.Tensor, root_logits: torch.Tensor, root_hidden, step: StepFn,
                shape: StaticShape) -> DraftTree:
    B, V = root_logits.shape
    dev = root_logits.device
    bi = torch.arange(B, device=dev)[:, None]
    zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
    toks, pars, deps = [root[:, None]], [zeros], [zeros]
    logits, hidden = root_logits[:, None], (None if root_hidden is None else root_hidden[:, None])  # level 0 = root
    level_start, prev_start = 1, 0
    anc_prev = None  # [W_prev, scratch] ancestry of the previous level's nodes in the drafter scratch
    prev_tok = prev_hidden = None  # the previous level's tokens [B, W_prev] and hidden states, expanded next
    offset = 0
    for d, (level, (par, rank)) in enumerate(zip(shape.levels, shape.tensors(dev)), start=1):
        if d > 1:  # run the drafter over the previous level to get its children's logits
            W = prev_tok.shape[1]
            own = torch.zeros(W, offset + W, dtype=torch.bool, device=dev)
            own[:, offset:] = torch.eye(W, dtype=torch.bool, device=dev)
            mask = own if anc_prev is None else own | torch.nn.functional.pad(anc_prev, (0, W))
            logits, hidden = step(prev_tok, prev_hidden, d - 1, offset, mask.expand(B, -1, -1))
            anc_prev_next = mask[par]
            offset += W
        top = logits.topk(max(r for _, r in level) + 1, dim=-1).indices  # [B, Wp, r]
        tok = top[bi, par[None, :], rank[None, :]]
        toks.append(tok)
        pars.append((prev_start + par).expand(B, -1))
        deps.append(torch.full_like(tok, d))
        prev_tok = tok  # this level is expanded next
        prev_hidden = None if hidden is None else hidden[:, par]
        anc_prev = None if d == 1 else anc_prev_next
        prev_start, level_start = level_start, level_start + len(level)
    tokens = torch.cat(toks, 1)
    return DraftTree(tokens=tokens, parents=torch.cat(pars, 1), depth=torch.cat(deps, 1),
                     valid=torch.ones_like(tokens, dtype=torch.bool), levels=len(shape.levels), width=shape.width)
