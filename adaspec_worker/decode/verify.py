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
    """Tree rule: zero r(x) where `rejected` and renormalise. r [B, V]; x, rejected [B] or [B, W]."""
    if x.dim() == 1:
        x, rejected = x[:, None], rejected[:, None]
    keep = torch.ones_like(r).scatter_reduce(1, x, (~rejected).to(r.dtype), reduce="amin")  # [B, V] 0 where rejected
    r = r * keep
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
    """probs [B, N, V]: the target's sampling distribution at each node.

    The tree rule, vectorised over siblings: with the children x_1..x_w of the current node tried in order,
    the sequential "accept x_c with probability r_c(x_c), else zero it and renormalise" accepts x_c with
    probability r(x_c) / (1 - sum_{j<c} r(x_j)) given x_1..x_{c-1} were rejected, so one cumsum, one
    comparison per sibling against its own uniform and a first-true index decide a level (a repeated
    token counts once: its second try has r = 0). The bonus is drawn once, from `reject` of every child
    at the level where the walk stops."""
    B, N, V = probs.shape
    levels, width = tree.levels, max(tree.width, 1)
    dev = probs.device
    bi = torch.arange(B, device=dev)
    kids = children_table(tree, width)  # [B, N, W]
    u_acc = uniform(seeds, counter, STREAM_ACCEPT, (levels + 1) * width).view(B, levels + 1, width)
    u_bonus = uniform(seeds, counter, STREAM_BONUS, levels + 1)
    earlier = torch.ones(width, width, dtype=torch.bool, device=dev).tril(-1)  # [c, j]: j < c
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    path = torch.zeros(B, levels + 1, dtype=torch.long, device=dev)
    r_stop, u_stop = probs[:, 0], u_bonus[:, 0]  # the bonus's distribution and uniform, set where a row stops
    for d in range(levels + 1):
        r = probs[bi, cur]  # [B, V]
        ch = kids[bi, cur]  # [B, W] child nodes, -1 padded
        x = torch.gather(tree.tokens, 1, ch.clamp(min=0))  # [B, W]
        dup = ((x[:, :, None] == x[:, None, :]) & (ch >= 0)[:, None, :] & earlier).any(-1)
        fresh = (ch >= 0) & ~dup
        rx = torch.gather(r, 1, x) * fresh  # [B, W]
        left = (1 - (rx.cumsum(-1) - rx)).clamp_min(1e-30)  # mass not yet rejected before sibling c
        accept = fresh & (u_acc[:, d] < (rx / left).double()) & live[:, None]
        moved = accept.any(-1)
        first = accept.to(torch.uint8).argmax(-1)  # [B] first accepted sibling
        cur = torch.where(moved, ch[bi, first], cur)
        stop = live & ~moved
        r_stop = torch.where(stop[:, None], reject(r, x, fresh), r_stop)
        u_stop = torch.where(stop, u_bonus[:, d], u_stop)
        live = live & moved
        if d + 1 <= levels:
            path[:, d + 1] = torch.where(moved, cur, path[:, d + 1])
    n_acc = (path[:, 1:] > 0).sum(-1)  # node 0 is the root: every accepted node has index > 0
    return Verdict(n_accepted=n_acc, path=path, bonus=sample(r_stop, u_stop))


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
