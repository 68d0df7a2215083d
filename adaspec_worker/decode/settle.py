"""A round's bookkeeping after the target pass, as one function of tensors: verification, KV compaction, the
emitted tokens, and the slots' next root, LDLP feature and emitted-token counter.

`settle(tree, logits, hidden, sampling, slots)` reads the target's logits and hidden states at the tree's nodes and
updates the slot state (`SlotState`: the cache and the per-slot buffers) in place. On CUDA the engine runs it
through torch.compile (`compiled_settle`): its ~50 small ops (argmaxes, gathers, wheres, the compaction's index ops,
the seeded uniforms of sampling) then fuse into a few kernels; run eagerly they were a quarter of a plain decoding
round's 222 kernels on an H100 (bench/results/h100-inplace-cache). CPU runs the plain ops; a test checks that the
compiled function gives the same state, token for token. The round's two other small pieces around the target
pass, its input (`trees.tree_pass`) and its outcome's packing (`stats.pack_outcome`), are compiled here too
(`compiled_tree_pass`, `compiled_pack`), once for every engine.

What it does not know: proposers, drafters, batching or the host; which rule applies is `verify_round`'s choice
from the sampling parameters and the tree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import compact
from .model import compiled
from .sampling import SamplingParams, target_probs
from .stats import pack_outcome
from .trees import DraftTree, tree_pass
from .verify import Verdict, verify_chain_sampling, verify_greedy, verify_tree_sampling


def verify_round(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor,
                 counter: torch.Tensor) -> Verdict:
    """The one verification rule that fits: greedy, a sampled chain with draft probabilities, or the coupled
    tree rule for every other sampled tree (`none` included), whose text equals plain sampling's for the seed."""
    if sampling.greedy:
        return verify_greedy(tree, logits)
    probs = target_probs(logits.float() if logits.dtype != torch.float64 else logits, sampling)  # [B, N, V]
    if tree.draft_probs is not None:
        return verify_chain_sampling(tree, probs, seeds, counter)
    return verify_tree_sampling(tree, probs, seeds, counter)


@dataclass
class SlotState:
    """What a round updates per slot (views of the workspace's buffers: written in place)."""

    kv: torch.Tensor  # [B, S, L, 2, Hkv, D] the KV cache
    lens: torch.Tensor  # [B] committed cache entries
    alive: torch.Tensor  # [B] bool: the slot's row is still decoding (dead slots stay frozen)
    root: torch.Tensor  # [B] the pending token: the next round's tree root
    seed: torch.Tensor  # [B] the row's sampling seed
    counter: torch.Tensor  # [B] tokens emitted so far (the position of the next sampling uniform)
    ldlp_feat: torch.Tensor  # [B, 2H] emb(root) ++ the target's hidden state that produced it
    embed: torch.Tensor  # [V, H] the target's token embeddings (read only)


@dataclass
class Settled:
    """A verified round, committed."""

    verdict: Verdict
    keep: torch.Tensor  # [B] cache entries committed: n_accepted + 1 (root and accepted nodes), 0 for dead slots
    emitted: torch.Tensor  # [B, P] accepted tokens then the bonus (entries past n_accepted + 1: filler)
    n_drafted: torch.Tensor  # [B] valid draft nodes offered (the root excluded)
    draft_depth: torch.Tensor  # [B] the deepest valid draft node


def settle(tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor, sampling: SamplingParams,
           slots: SlotState) -> Settled:
    """logits [B, N, V] and hidden [B, N, H] at the tree's N nodes -> the round settled: verified, the accepted
    nodes' cache entries moved behind each row's committed prefix and committed, root / LDLP feature / counter
    advanced for live slots. No host sync, fixed shapes."""
    verdict = verify_round(tree, logits, sampling, slots.seed, slots.counter)
    n_accepted, path = verdict.n_accepted, verdict.path  # [B], [B, P]
    keep = torch.where(slots.alive, n_accepted + 1, 0)
    compact(slots.kv, slots.lens, path, keep)  # the path's entries behind each row's committed prefix
    path_tokens = torch.gather(tree.tokens, 1, path)  # [B, P] root, accepted...
    emitted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
    emitted = emitted.scatter(1, n_accepted[:, None], verdict.bonus[:, None])  # [B, P] accepted..., bonus
    new_root = torch.where(slots.alive, verdict.bonus, slots.root)
    bi = torch.arange(path.shape[0], device=path.device)
    last = hidden[bi, path[bi, n_accepted]]  # [B, H] the hidden state that produced the bonus
    slots.ldlp_feat.copy_(torch.cat([F.embedding(new_root, slots.embed), last], -1))
    slots.root.copy_(new_root)
    slots.counter.add_(keep)
    return Settled(verdict=verdict, keep=keep, emitted=emitted, n_drafted=tree.valid.sum(1) - 1,
                   draft_depth=(tree.depth * tree.valid).amax(1))


@functools.cache
def compiled_tree_pass():
    """`trees.tree_pass` (the target pass's positions and ancestry mask) through torch.compile, shared."""
    return compiled(tree_pass)


@functools.cache
def compiled_pack():
    """`stats.pack_outcome` (the round's outcome into the landing buffer) through torch.compile, shared."""
    return compiled(pack_outcome)


@functools.cache
def compiled_settle():
    """`settle` through torch.compile (dynamic shapes: one graph per rule and tree depth, any batch and tree size);
    made once, shared by every engine."""
    return compiled(settle)
