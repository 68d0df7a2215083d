"""RASD (Quan et al., 2025, arXiv 2503.03434): retrieval candidates pruned by the draft head and fused with the
EAGLE-2 tree into one tree, verified in one target pass.

A round:
  1. the EAGLE-2 tree from the head (`trees.grow_dynamic`), N nodes;
  2. retrieval candidates as `retrieval` finds them (the row's own text and the job's datastore):
     `branches` chains of k tokens;
  3. pruning: a candidate is dropped unless its first token is among the head's `prune_top_k` most likely
     tokens at the root;
  4. fusion by longest common prefix (`fuse`): each candidate follows the EAGLE-2 tree while the tree has its
     next token, then earlier candidates with the same prefix (so the candidates form a trie), and only the
     rest becomes new nodes, hung under the deepest node matched.
The fused tree has a fixed N + branches * k nodes: merged, pruned and unmatched candidate nodes stay as
invalid padding (never accepted, not counted as drafted), so every round has one shape and no host sync.
Verification is the engine's (greedy, or the coupled rule: sampled text equals plain sampling's). State,
datastore and persistence are `Retrieval`'s; parameters and sources: `RASDSpec`.
"""

from __future__ import annotations

import torch

from jobs.specs import RASDSpec

from ..trees import DraftTree, grow_dynamic
from .base import eagle2_max_nodes, implements
from .retrieval import Retrieval


@implements(RASDSpec)
class RASD(Retrieval):
    def __init__(self, spec: RASDSpec, context: int):
        super().__init__(spec, context)
        self.eagle_nodes = eagle2_max_nodes(spec.top_k, spec.depth, spec.total_tokens)
        self.max_nodes = self.eagle_nodes + spec.branches * spec.k
        self.L = context + 2 * self.max_nodes + 1  # (Retrieval sized it for its own, smaller, trees)
        self.scratch = spec.top_k * spec.depth

    def propose(self, r, plan):
        s = self.spec
        tree = grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.depth, s.total_tokens)
        toks, valid = self.candidates()  # [B, b, k]
        if s.prune_top_k:
            top = r.root_logits.topk(min(s.prune_top_k, r.root_logits.shape[-1]), dim=-1).indices  # [B, p]
            liked = (toks[:, :, :1] == top[:, None, :]).any(-1)  # [B, b] first token among the head's top
            valid = valid & liked[:, :, None]
        return fuse(tree, toks, valid)


def fuse(tree: DraftTree, toks: torch.Tensor, valid: torch.Tensor) -> DraftTree:
    """tree: N nodes whose siblings carry distinct tokens (an EAGLE-2 tree); toks, valid [B, b, k]: candidate
    chains under the root (valid a prefix of each chain) -> one tree of N + b * k nodes, topologically ordered.

    Candidate node (c, d) sits at index N + c * k + d. Its prefix toks[c, :d+1] is either a path of the tree
    (then the node is padding and its child hangs under that tree node), or an earlier candidate's prefix
    (padding, child under the earlier candidate's node), or new (a valid node)."""
    B, N = tree.tokens.shape
    _, b, k = toks.shape
    dev = toks.device
    node = torch.arange(N, device=dev)
    # 1. longest common prefix with the tree: the tree node holding toks[c, :d+1], or -1
    on_tree = torch.zeros(B, b, k, dtype=torch.long, device=dev)
    match = (node == 0).expand(B, b, N)  # [B, b, N] tree nodes whose path equals the prefix so far (the root)
    parents = tree.parents[:, None, :].expand(B, b, N)
    for d in range(k):
        match = (
            torch.gather(match, 2, parents)  # the node's parent held the prefix of length d
            & (tree.tokens[:, None, :] == toks[:, :, d, None])
            & (tree.valid & (node > 0))[:, None, :]
            & valid[:, :, d, None]
        )
        on_tree[:, :, d] = torch.where(match.any(-1), match.long().argmax(-1), -1)
    # 2. the first earlier candidate sharing the prefix toks[c, :d+1]
    same = (toks[:, :, None, :] == toks[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]  # [B, b, b, k]
    same = same.long().cumprod(-1).bool()
    earlier = torch.ones(b, b, dtype=torch.bool, device=dev).tril(-1)[None, :, :, None]  # c2 < c
    shared = same & earlier
    first = shared.long().argmax(2)  # [B, b, k] the first such c2 (when any)
    own = N + torch.arange(b, device=dev)[:, None] * k + torch.arange(k, device=dev)[None, :]  # [b, k]
    dup = torch.where(shared.any(2), N + first * k + torch.arange(k, device=dev), own)
    # 3. where each candidate node's prefix lives: on the tree, at an earlier candidate, or at the node itself
    home = torch.where(on_tree >= 0, on_tree, dup)  # [B, b, k]
    parent = torch.cat([torch.zeros(B, b, 1, dtype=torch.long, device=dev), home[:, :, :-1]], 2)
    new = valid & (home == own)
    depth = torch.arange(1, k + 1, device=dev).expand(B, b, k)
    return DraftTree(
        tokens=torch.cat([tree.tokens, toks.flatten(1)], 1),
        parents=torch.cat([tree.parents, parent.flatten(1)], 1),
        depth=torch.cat([tree.depth, depth.flatten(1)], 1),
        valid=torch.cat([tree.valid, new.flatten(1)], 1),
        levels=max(tree.levels, k),
        width=tree.width + b,
    )
