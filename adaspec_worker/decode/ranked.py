"""A draft tree of fixed shape whose nodes each row spends by its own signal: `grow_ranked`.

The expansion is EAGLE-2's (`trees.grow_dynamic`): top-k frontier per level by cumulative log-probability,
for a fixed number of levels. Then each row's depth limit is computed from what the expansion saw
(`LevelStats`: the frontier's scores and the entropy along the best path, per level) by the method's
rule (`limit_fn`), and the row keeps its `nodes` best candidates (global rerank, EAGLE-2) among those
within its limit. A row whose signal says "short" gets a wide, shallow tree; "long", a deep one. The
shape ([B, 1 + nodes], `depth` levels) is the same for every row, so a round stays one CUDA graph, and
nothing leaves the device (no host sync). Candidates past a row's limit that still fill its budget
(when too few lie within it) are marked invalid: never accepted.

Knows nothing of models or methods: it calls `step(tokens, hidden, level, offset, mask)` like `trees.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .trees import DraftTree, StepFn


@dataclass
class LevelStats:
    """What the expansion saw, per level d = 1..depth (index d - 1)."""

    frontier_logp: torch.Tensor  # [B, D, K] cumulative log-probabilities of the frontier kept at each level
    entropy: torch.Tensor  # [B, D] entropy (nats, untempered) of the distribution level d was drawn from, best path


LimitFn = Callable[[LevelStats], torch.Tensor]  # -> [B] long depth limit per row, in [1, depth]


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    return -(lp.exp() * lp).nan_to_num().sum(-1)


def grow_ranked(
    root: torch.Tensor,
    root_logits: torch.Tensor,
    root_hidden,
    step: StepFn,
    top_k: int,
    depth: int,
    nodes: int,
    limit_fn: LimitFn | None = None,
) -> DraftTree:
    """root [B], root_logits [B, V] -> a tree of exactly 1 + min(nodes, candidates) nodes and `depth` levels."""
    B, V = root_logits.shape
    dev = root_logits.device
    K = min(top_k, V)
    logp = torch.log_softmax(root_logits.float(), -1)  # [B, V]
    s, t = logp.topk(K, dim=-1)  # [B, K]
    cand_tok, cand_score, cand_parent, cand_depth = [t], [s], [torch.full((B, K), -1, device=dev)], [1]
    fronts, entropies = [s], [_entropy(logp)]
    front_tok, front_score, front_idx = t, s, torch.arange(K, device=dev).expand(B, K)
    front_hidden = None if root_hidden is None else root_hidden[:, None].expand(B, K, -1)
    n_cand = K
    width = K * max(depth - 1, 0)  # scratch slots the frontier levels occupy in the drafter's cache
    front_anc = torch.zeros(B, K, max(width, 1), dtype=torch.bool, device=dev)
    bi = torch.arange(B, device=dev)[:, None]
    eye = torch.eye(K, dtype=torch.bool, device=dev)
    for level in range(1, depth):
        off = (level - 1) * K
        own = torch.zeros_like(front_anc)
        own[:, :, off : off + K] = eye
        mask = (front_anc | own)[:, :, : off + K]  # [B, K, off + K]
        logits, hidden = step(front_tok, front_hidden, level, off, mask)  # [B, K, V], [B, K, H]
        lp = torch.log_softmax(logits.float(), -1)  # [B, K, V]
        entropies.append(_entropy(lp[:, 0]))  # the best frontier node's next-token distribution
        cs, ct = lp.topk(K, dim=-1)  # [B, K, K]
        score = (front_score[:, :, None] + cs).reshape(B, K * K)
        cand_tok.append(ct.reshape(B, K * K))
        cand_score.append(score)
        cand_parent.append(front_idx[:, :, None].expand(B, K, K).reshape(B, K * K))
        cand_depth.append(level + 1)
        fs, pick = score.topk(K, dim=-1)  # next frontier [B, K], best first
        local_parent = pick // K
        front_tok = torch.gather(ct.reshape(B, K * K), 1, pick)
        front_score, front_idx = fs, n_cand + pick
        front_hidden = None if hidden is None else hidden[bi, local_parent]
        front_anc = (front_anc | own)[bi, local_parent]
        fronts.append(fs)
        n_cand += K * K
    tok, score, par = torch.cat(cand_tok, 1), torch.cat(cand_score, 1), torch.cat(cand_parent, 1)  # [B, C]
    dep = torch.cat([torch.full((B, c.shape[1]), d, device=dev) for c, d in zip(cand_tok, cand_depth)], 1)
    key = score.double() - 1e-9 * dep  # a child never outranks its parent: the kept set is closed under ancestors
    if limit_fn is not None:
        limit = limit_fn(LevelStats(frontier_logp=torch.stack(fronts, 1), entropy=torch.stack(entropies, 1)))
        key = torch.where(dep <= limit[:, None], key, float("-inf"))
    n = min(nodes, key.shape[1])
    top = key.topk(n, dim=-1).indices  # [B, n]
    sel = top.sort(dim=-1).values  # topological order
    inside = torch.gather(key, 1, sel) > float("-inf")  # [B, n] within the row's limit
    C = tok.shape[1]
    inv = torch.full((B, C + 1), -1, device=dev, dtype=torch.long)
    inv[bi, sel] = torch.arange(n, device=dev).expand(B, n)
    p = torch.gather(par, 1, sel)
    parent_node = torch.where(p < 0, 0, torch.gather(inv, 1, p.clamp(min=0)) + 1).clamp(min=0)
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    return DraftTree(
        tokens=torch.cat([root[:, None], torch.gather(tok, 1, sel)], 1),
        parents=torch.cat([zero, parent_node], 1),
        depth=torch.cat([zero, torch.gather(dep, 1, sel)], 1),
        valid=torch.cat([torch.ones_like(zero, dtype=torch.bool), inside], 1),
        levels=depth,
        width=K,
    )


def leading(go: torch.Tensor) -> torch.Tensor:
    """go [B, D] bool per level -> [B] the number of leading True levels (a stopping rule's depth)."""
    return go.long().cumprod(-1).sum(-1)
