"""Token Recycling (Luo et al., 2024, arXiv 2408.08696): drafting from the target's own discarded candidates.

State: one adjacency matrix `table` [V + 1, k] int32 per proposer (per engine, so per actor), kept across
generate() calls: row t holds the target's top-k next tokens the last time t was the token at a verified
tree node (-1: never seen). Row V is a write sink for updates that lose (never read).

A round:
  - propose: breadth-first lookup from the root through the table along a static template (paths of child
    ranks): node (parent p, rank r) gets token table[token(p), r]. A node whose entry is unset (-1), or whose
    parent is invalid, is an invalid node (never accepted, not counted as drafted).
  - observe (after verification, from the engine's `RoundInput.target_logits` [B, N, V]): every valid node's
    token gets the target's top-k at that node. Several nodes of the round may carry the same token; the
    winner is fixed: a node on an accepted path beats one off it, then the later row, then the later node
    (a max over priorities, so the result does not depend on the order the device applies writes in).

All tensor ops with shapes fixed by the template: no host sync, CUDA-graph safe. Parameters, defaults and
what is ours are documented on `TokenRecyclingSpec`. With the spec's `matrix` path the table is loaded when it
is made (if the file exists: safetensors, never pickle; a table of another shape is ignored) and `persist`
(the worker, after each shard) writes it back atomically, so a resumed or rerun job starts warm.
"""
from __future__ import annotations

import heapq
import math
import os

import torch
from safetensors.torch import load_file, save_file

from jobs.specs import TokenRecyclingSpec

from ..trees import DraftTree, StaticShape
from .base import BatchInfo, Proposer, implements

# Ours: a fixed prior on the chance that the target's next token is the table's rank-r candidate, used only
# to pick the default template (the `nodes` paths of highest product of priors). Not fitted.
RANK_PRIOR = (0.55, 0.15, 0.07, 0.045, 0.03, 0.02, 0.015, 0.01)


def rank_prior(r: int) -> float:
    return RANK_PRIOR[r] if r < len(RANK_PRIOR) else RANK_PRIOR[-1] * 0.7 ** (r - len(RANK_PRIOR) + 1)


def default_template(k: int, nodes: int, max_depth: int) -> tuple[tuple[int, ...], ...]:
    """The `nodes` most probable paths of child ranks (< k, depth <= max_depth) under RANK_PRIOR.

    Best-first: a child's score is below its parent's, so the set is closed under ancestors."""
    heap = [(-math.log(rank_prior(r)), (r,)) for r in range(k)]
    heapq.heapify(heap)
    out = []
    while heap and len(out) < nodes:
        cost, path = heapq.heappop(heap)
        out.append(path)
        if len(path) < max_depth:
            for r in range(k):
                heapq.heappush(heap, (cost - math.log(rank_prior(r)), path + (r,)))
    return tuple(out)


@implements(TokenRecyclingSpec)
class TokenRecycling(Proposer):
    def __init__(self, spec: TokenRecyclingSpec, vocab_size: int):
        super().__init__(spec)
        self.vocab_size = vocab_size
        paths = spec.tree or default_template(spec.k, spec.nodes, spec.max_depth)
        self.shape = StaticShape.from_paths(paths)
        self.max_nodes = 1 + sum(len(level) for level in self.shape.levels)
        self.table: torch.Tensor | None = None  # [V + 1, k] int32, -1 = unset

    def begin(self, batch: BatchInfo) -> None:
        """Make the table on first use (or on another device / vocabulary); otherwise keep it warm."""
        V = self.vocab_size
        if self.table is None or self.table.device != torch.device(batch.device) or self.table.shape[0] != V + 1:
            self.table = torch.full((V + 1, self.spec.k), -1, dtype=torch.int32, device=batch.device)
            self._load()

    def _load(self) -> None:
        """The saved matrix into the table, in place, when the spec names one that exists and fits."""
        if self.spec.matrix and os.path.exists(self.spec.matrix):
            saved = load_file(self.spec.matrix)["table"]
            if saved.shape == self.table.shape:  # another vocabulary or k: start cold
                self.table.copy_(saved.to(self.table.dtype))

    def learned(self):
        return None if self.table is None else self.table.clone()

    def restore(self, snapshot) -> None:
        """Back to `snapshot`; None: to the table's first state (cold, or the saved matrix)."""
        if self.table is None:
            return
        with torch.inference_mode():  # the table is made inside generate()'s inference mode
            if snapshot is None:
                self.table.fill_(-1)
                self._load()
            else:
                self.table.copy_(snapshot)

    def persist(self) -> None:
        """Write the table to the spec's `matrix` path (atomically: a temporary file, then a rename)."""
        path = self.spec.matrix
        if not path or self.table is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"table": self.table.cpu().contiguous()}, tmp, metadata={"format": "adarun-token-recycling"})
        os.replace(tmp, path)

    def reset(self) -> None:
        """Forget everything learnt (a cold start)."""
        if self.table is not None:
            with torch.inference_mode():  # the table is made inside generate()'s inference mode
                self.table.fill_(-1)

    def propose(self, r, plan):
        table = self.table
        root = r.root
        B = root.shape[0]
        dev = root.device
        zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
        toks, pars, deps, valid = [root[:, None]], [zeros], [zeros], [torch.ones(B, 1, dtype=torch.bool, device=dev)]
        prev_tok, prev_valid, prev_start, start = root[:, None], valid[0], 0, 1
        for d, (par, rank) in enumerate(self.shape.tensors(dev), start=1):
            entry = table[prev_tok[:, par], rank[None, :]].long()  # [B, W]
            ok = prev_valid[:, par] & (entry >= 0)
            tok = torch.where(ok, entry, 0)
            toks.append(tok)
            valid.append(ok)
            pars.append((prev_start + par).expand(B, -1))
            deps.append(torch.full_like(tok, d))
            prev_tok, prev_valid = tok, ok
            prev_start, start = start, start + par.shape[0]
        tokens = torch.cat(toks, 1)
        return DraftTree(tokens=tokens, parents=torch.cat(pars, 1), depth=torch.cat(deps, 1),
                         valid=torch.cat(valid, 1), levels=len(self.shape.levels), width=self.shape.width)

    def observe(self, verdict, tree, r):
        """Write the target's top-k at every valid node of the verified tree into the table."""
        logits = r.target_logits  # [B, N, V]
        assert logits is not None, "token-recycling needs the engine to pass RoundInput.target_logits to observe"
        update(self.table, tree, verdict.path, verdict.n_accepted, logits)
        return None


def update(table: torch.Tensor, tree: DraftTree, path: torch.Tensor, n_accepted: torch.Tensor,
           logits: torch.Tensor) -> None:
    """table [V + 1, k]; tree [B, N]; path [B, P] with n_accepted [B]; logits [B, N, V]. In place, no sync."""
    V, k = table.shape[0] - 1, table.shape[1]
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [B, N, k] (-1 padded when k > vocabulary)
    if top.shape[-1] < k:
        top = torch.nn.functional.pad(top, (0, k - top.shape[-1]), value=-1)
    depth = torch.arange(path.shape[1], device=dev)[None, :]
    # a node is on the accepted path if it is path[b, j] for some j <= n_accepted[b]
    hit = (path[:, :, None] == torch.arange(N, device=dev)[None, None, :]) & (depth <= n_accepted[:, None])[:, :, None]
    on_path = hit.any(1)  # [B, N]
    order = torch.arange(B * N, device=dev).view(B, N)
    priority = (on_path.long() * (B * N) + order).flatten()  # accepted path first, then later row, later node
    tok = torch.where(tree.valid, tree.tokens, V).flatten()  # invalid nodes write the sink row
    best = torch.full((V + 1,), -1, dtype=torch.long, device=dev).scatter_reduce(0, tok, priority, "amax")
    winner = priority == best[tok]
    dest = torch.where(winner, tok, V)
    table.index_copy_(0, dest, top.reshape(B * N, k).to(table.dtype))
