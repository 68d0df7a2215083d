"""Verification: which drafted tokens the target accepts, and the bonus token after them.

Vocabulary used everywhere in adarun:
  - accepted tokens: drafted tokens the target keeps this round (`n_accepted`, 0..depth);
  - rejected tokens: drafted tokens it does not keep;
  - bonus token: the one token the target itself emits after the accepted ones (always 1).
  A round therefore emits n_accepted + 1 tokens; tau = mean tokens emitted per target forward.

Rules (each lossless: the emitted tokens follow the target's distribution exactly):
  - greedy: the deepest node whose path matches the target's argmax at every step;
  - tree sampling (EAGLE-2/SpecInfer, deterministic drafts): at the current node with target
    distribution r, try its children in order; accept child x with probability r(x); on
    rejection set r(x) = 0 and renormalise; if all are rejected, or at a leaf, draw the bonus from r;
  - sampled chain (independent draft model, Leviathan et al. / Chen et al. 2023): accept draft y_j
    with probability min(1, p_j(y)/q_j(y)); at the first rejection draw from norm(max(0, p_j - q_j)).
This module knows nothing about models, caches or batching policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import STREAM_ACCEPT, STREAM_BONUS, sample, uniform
from .trees import DraftTree


@dataclass
class Verdict:
    n_accepted: torch.Tensor  # [B] accepted draft tokens (bonus excluded)
    path: torch.Tensor  # [B, P] node indices root..deepest accepted (entries past n_accepted are 0)
    bonus: torch.Tensor  # [B] bonus token


def path_to(anc_row: torch.Tensor, depth: torch.Tensor, P: int) -> torch.Tensor:
    """anc_row [B, N] (ancestors of the chosen node), depth [B, N] -> node at each depth [B, P]."""
    levels = torch.arange(P, device=depth.device)[None, :, None]
    onehot = anc_row[:, None, :] & (depth[:, None, :] == levels)  # [B, P, N]
    return onehot.to(torch.uint8).argmax(-1)


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Verdict:
    """target_logits [B, N, V] at each node."""
    tgt = target_logits.argmax(-1)  # [B, N]
    correct = (tree.tokens == torch.gather(tgt, 1, tree.parents)) & tree.valid
    correct[:, 0] = True
    anc = tree.ancestors()
    ok = ~(anc & ~correct[:, None, :]).any(-1)  # [B, N]
    best = torch.where(ok, tree.depth, -1).argmax(-1)  # deepest fully-correct node
    bi = torch.arange(tree.tokens.shape[0], device=best.device)
    path = path_to(anc[bi, best], tree.depth, tree.levels + 1)
    return Verdict(n_accepted=tree.depth[bi, best], path=path, bonus=tgt[bi, best])


# -- the two steps of the sampling rules; tests replace them with broken versions to show power

def reject(r: torch.Tensor, x: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Tree rule: zero r(x) where `rejected` [B] and renormalise. r [B, V], x [B]."""
    bi = torch.arange(r.shape[0], device=r.device)
    r = r.clone()
    r[bi, x] = torch.where(rejected, torch.zeros_like(r[bi, x]), r[bi, x])
    return r / r.sum(-1, keepdim=True).clamp_min(1e-30)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Chain rule: norm(max(0, p - q)); falls back to p where p == q (residual mass 0)."""
    res = (p - q).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp_min(1e-30), p)


def children_table(tree: DraftTree, width: int) -> torch.Tensor:
    """[B, N, width] child node indices in node order, -1 padded."""
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    is_child = (tree.parents[:, None, :] == torch.arange(N, device=dev)[None, :, None]) & tree.valid[:, None, :]
    is_child[:, :, 0] = False  # [B, parent, child]
    rank = is_child.long().cumsum(-1) - 1
    table = torch.full((B, N, width + 1), -1, dtype=torch.long, device=dev)
    slot = torch.where(is_child, rank.clamp(max=width), width)
    table.scatter_(2, slot, torch.where(is_child, torch.arange(N, device=dev).expand(B, N, N), -1))
    return table[:, :, :width]


def verify_tree_sampling(tree: DraftTree, probs: torch.Tensor, seeds: torch.Tensor, counter: torch.Tensor) -> Verdict:
    """probs [B, N, V]: the target's sampling distribution at each node."""
    B, N, V = probs.shape
    levels, width = tree.levels, tree.width
    dev = probs.device
    bi = torch.arange(B, device=dev)
    kids = children_table(tree, width)
    u_acc = uniform(seeds, counter, STREAM_ACCEPT, (levels + 1) * max(width, 1)).view(B, levels + 1, max(width, 1))
    u_bonus = uniform(seeds, counter, STREAM_BONUS, levels + 1)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    bonus = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.zeros(B, levels + 1, dtype=torch.long, device=dev)
    for d in range(levels + 1):
        r = probs[bi, cur].double()
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        for c in range(width):
            child = kids[bi, cur, c]
            trying = live & ~moved & (child >= 0)
            x = tree.tokens[bi, child.clamp(min=0)]
            accept = trying & (u_acc[:, d, c] < r[bi, x])
            cur = torch.where(accept, child, cur)
            moved |= accept
            r = reject(r, x, trying & ~accept)
        stop = live & ~moved
        bonus = torch.where(stop, sample(r, u_bonus[:, d]), bonus)
        live &= moved
        n_acc += moved.long()
        if d + 1 <= levels:
            path[:, d + 1] = torch.where(moved, cur, path[:, d + 1])
    return Verdict(n_accepted=n_acc, path=path, bonus=bonus)


def verify_chain_sampling(tree: DraftTree, probs: torch.Tensor, seeds: torch.Tensor, counter: torch.Tensor) -> Verdict:
    """Sampled chain: tree.draft_probs [B, k+1, V] holds q at each node (q for the node's token at
    index j+1 is draft_probs[:, j]); probs [B, k+1, V] holds p at each node."""
    B, N, V = probs.shape
    k = N - 1
    dev = probs.device
    bi = torch.arange(B, device=dev)
    q = tree.draft_probs[:, :k].double()  # [B, k, V]
    p = probs.double()
    y = tree.tokens[:, 1:]  # [B, k]
    py = torch.gather(p[:, :k], 2, y[..., None]).squeeze(-1)
    qy = torch.gather(q, 2, y[..., None]).squeeze(-1)
    ratio = torch.where(qy > 0, py / qy.clamp_min(1e-300), torch.zeros_like(py)).clamp(max=1.0)
    u = uniform(seeds, counter, STREAM_ACCEPT, max(k, 1))[:, :k]
    ok = (u < ratio) & tree.valid[:, 1:]
    n = ok.long().cumprod(-1).sum(-1)  # [B] accepted prefix
    p_at = p[bi, n]  # target dist at the first rejected (or final) node
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[bi, n]
    rejected = n < k
    dist = torch.where(rejected[:, None] & tree.valid[bi, (n + 1).clamp(max=k)][:, None], residual(p_at, q_at), p_at)
    bonus = sample(dist, uniform(seeds, counter, STREAM_BONUS, 1)[:, 0])
    path = torch.arange(N, device=dev).expand(B, N) * (torch.arange(N, device=dev)[None] <= n[:, None])
    return Verdict(n_accepted=n, path=path, bonus=bonus)
