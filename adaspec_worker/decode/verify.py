"""Verification: which drafted tokens the target accepts, and the bonus token after them.

Vocabulary used everywhere in adarun:
  - accepted tokens: drafted tokens the target keeps this round (`n_accepted`, 0..depth);
  - rejected tokens: drafted tokens it does not keep;
  - bonus token: the one token the target itself emits after the accepted ones (always 1).
  A round therefore emits n_accepted + 1 tokens; tau = mean tokens emitted per target forward.

Rules (each lossless: the emitted tokens follow the target's distribution exactly):
  - greedy: the deepest node whose path matches the target's argmax at every step;
  - coupled tree sampling (every tree without draft probabilities, `none`'s root-only tree included):
    at every node n the target draws its own sample y_n = sample(p_n, u) with the uniform plain
    decoding uses at that output position (row seed, position = counter + depth(n), STREAM_BONUS).
    A node is accepted when its token equals the target's sample at its parent and so is every
    ancestor's; the deepest accepted node ends the path and its own sample y is the bonus. It is the
    greedy rule with argmax replaced by the seeded sample.
    Why it is exact: every emitted token, accepted or bonus, is y at its parent on the path, i.e.
    sample(p(prefix), u(seed, position)) on exactly the prefix emitted before it, which is how plain
    decoding draws that position. The emitted text is therefore not just equal in law to the target's
    but identical, token for token, to plain sampling with the same seed: it depends on the row's seed
    and prompt only, never on the draft tree (so never on batch companions or shared proposer state).
    A position's uniform is used for one emitted token only (rejected nodes' draws are discarded and the
    next round starts at the first position not yet emitted). A child with token x is accepted with
    probability p(x), a level with probability sum_x p(x) over its distinct sibling tokens, as under
    the residual (SpecInfer) rule for deterministic drafts, so tau is the same in expectation;
  - sampled chain (independent draft model with its draft probabilities q, Leviathan et al. / Chen et
    al. 2023): accept draft y_j with probability min(1, p_j(y)/q_j(y)); at the first rejection draw the
    bonus from norm(max(0, p_j - q_j)). Exact in law, but the text then depends on the drafts.
This module knows nothing about models, caches or batching policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import STREAM_ACCEPT, STREAM_BONUS, sample, uniform, uniform_at
from .trees import DraftTree


@dataclass
class Verdict:
    n_accepted: torch.Tensor  # [B] accepted draft tokens (bonus excluded)
    path: torch.Tensor  # [B, P] node indices root..deepest accepted (entries past n_accepted are 0)
    bonus: torch.Tensor  # [B] bonus token


def path_to(anc_row: torch.Tensor, depth: torch.Tensor, P: int) -> torch.Tensor:
    """anc_row [B, N] (ancestors of the chosen node), depth [B, N] -> node at each depth [B, P]."""
    levels = torch.arange(P, device=depth.device)[None, :, None]
    onehot = anc_row[:, None, :] & (depth[:, None, :] == levels)  # [B, P, N] at most one node per level: a path
    # the node's index as a sum, not an argmax over the one-hot: inductor's vectorised CPU argmax over uint8 read
    # indices out of bounds (torch 2.13), and the sum fuses into one reduction anyway
    nodes = torch.arange(depth.shape[1], device=depth.device)
    return (onehot.long() * nodes).sum(-1)


# -- the steps of the rules that tests replace with broken versions to show their power

def matches(tree: DraftTree, target_tokens: torch.Tensor) -> torch.Tensor:
    """[B, N] a valid node whose token is the target's token (argmax or seeded sample) at its parent; root True."""
    correct = (tree.tokens == torch.gather(target_tokens, 1, tree.parents)) & tree.valid
    correct[:, 0] = True
    return correct


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Chain rule: norm(max(0, p - q)); falls back to p where p == q (residual mass 0)."""
    res = (p - q).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp_min(1e-30), p)


def accept_deepest(tree: DraftTree, target_tokens: torch.Tensor) -> Verdict:
    """target_tokens [B, N]: the target's token at each node. Accepts the deepest node whose every ancestor (and
    itself) `matches`; the bonus is the target's token there. Fixed shapes, no host sync."""
    correct = matches(tree, target_tokens)
    anc = tree.ancestors()
    ok = ~(anc & ~correct[:, None, :]).any(-1)  # [B, N] the whole path from the root matches
    best = torch.where(ok, tree.depth, -1).argmax(-1)  # deepest fully-correct node (lowest index among equals)
    bi = torch.arange(tree.tokens.shape[0], device=best.device)
    path = path_to(anc[bi, best], tree.depth, tree.levels + 1)
    return Verdict(n_accepted=tree.depth[bi, best], path=path, bonus=target_tokens[bi, best])


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Verdict:
    """target_logits [B, N, V] at each node."""
    return accept_deepest(tree, target_logits.argmax(-1))


def node_uniforms(tree: DraftTree, seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """[B, N] the uniform plain decoding uses at each node's output position (counter + depth)."""
    return uniform_at(seeds, tree.positions(counter), STREAM_BONUS)


def verify_coupled(tree: DraftTree, probs: torch.Tensor, u: torch.Tensor) -> Verdict:
    """probs [B, N, V] the target's sampling distribution at each node, u [B, N] each node's uniform."""
    B, N, V = probs.shape
    y = sample(probs.reshape(B * N, V), u.reshape(B * N)).view(B, N)  # the target's own sample at every node
    return accept_deepest(tree, y)


def verify_tree_sampling(tree: DraftTree, probs: torch.Tensor, seeds: torch.Tensor, counter: torch.Tensor) -> Verdict:
    """The coupled rule (module docstring): the row's text equals plain sampling's with its seed, whatever the tree."""
    return verify_coupled(tree, probs, node_uniforms(tree, seeds, counter))


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
