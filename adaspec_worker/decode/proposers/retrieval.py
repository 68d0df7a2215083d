"""Retrieval drafting (prompt lookup): continue the row's text the way it continued before.

State per row, on the device: `hist` [B, L + 1] (the row's prompt then every token it emitted, -1 beyond;
column L is a write sink) and `hist_len` [B]. The pending token (root) is the last history entry.

A round:
  - propose: for n = 1..max_ngram, mark every earlier position i where the last n history tokens end
    (hist[i-n+1..i] == the row's last n tokens, i <= len - 2); score = matched length * L + i, so the longest
    match wins, then the most recent; the best `branches` matches (length >= min_ngram) each give the k tokens
    that followed them as one chain under the root (nodes past the known history, or of no match: invalid).
  - observe: append the round's committed tokens (accepted..., bonus) to the history; how many is the growth
    of the engine's emitted-token counter, so rows that finished (counter frozen) append nothing.
Tensor ops with shapes fixed by (B, L, k, branches): no host sync, CUDA-graph safe; buffers keep their
address across generate() calls. A row's draft depends on its own text only, so sampled text is
independent of its batch companions. Parameters and sources: `RetrievalSpec`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.specs import RetrievalSpec

from ..trees import DraftTree
from .base import BatchInfo, Proposer, implements


@implements(RetrievalSpec)
class Retrieval(Proposer):
    def __init__(self, spec: RetrievalSpec, context: int):
        super().__init__(spec)
        self.max_nodes = 1 + spec.branches * spec.k
        self.L = context + 2 * self.max_nodes + 1  # a row may commit a whole tree past max_new_tokens

    def begin(self, batch: BatchInfo) -> None:
        B, L = batch.B, self.L
        full = self.__dict__.setdefault("_full", {}).get("hist")
        if full is None or full.shape[0] < B or full.device != torch.device(batch.device):
            full = self._full["hist"] = torch.empty(B, L + 1, dtype=torch.long, device=batch.device)
        self.hist = full[:B]
        self.row_state("hist_len", B, 0, torch.long, batch.device)
        self.row_state("seen_counter", B, 0, torch.long, batch.device)  # the engine's counter at the last observe
        self.admit(torch.arange(B, device=batch.device), batch.prompts)

    def admit(self, rows: torch.Tensor, prompts: list[list[int]]) -> None:
        """Rows `rows` [k] start from their prompts' last L tokens."""
        super().admit(rows, prompts)
        L = self.L
        host = torch.full((len(prompts), L + 1), -1, dtype=torch.long)  # [k, L + 1]
        for i, p in enumerate(prompts):
            host[i, : min(len(p), L)] = torch.tensor(p[-L:])
        self.hist[rows] = host.to(rows.device)
        self.hist_len[rows] = torch.tensor([min(len(p), L) for p in prompts], device=rows.device)

    def propose(self, r, plan):
        s = self.spec
        hist, ln = self.hist[:, : self.L], self.hist_len  # [B, L], [B]
        B, L = hist.shape
        dev = hist.device
        pos = torch.arange(L, device=dev)[None, :]
        run = torch.ones(B, L, dtype=torch.bool, device=dev)
        length = torch.zeros(B, L, dtype=torch.long, device=dev)
        for j in range(s.max_ngram):
            want = hist.gather(1, (ln - 1 - j).clamp(min=0)[:, None])  # [B, 1] the j-th last token
            shifted = F.pad(hist, (j, 0), value=-1)[:, :L]  # shifted[b, i] = hist[b, i - j]
            run &= (shifted == want) & (ln - 1 - j >= 0)[:, None]
            length += run.long()
        ok = (pos <= (ln - 2)[:, None]) & (length >= s.min_ngram)
        score = torch.where(ok, length * L + pos, -1)
        best, end = score.topk(min(s.branches, L), dim=-1)  # [B, b]
        steps = torch.arange(1, s.k + 1, device=dev)
        at = end[:, :, None] + steps  # [B, b, k] history positions of the continuation
        valid = (best >= 0)[:, :, None] & (at <= (ln - 1)[:, None, None])
        toks = torch.where(valid, hist.gather(1, at.clamp(max=L - 1).flatten(1)).view_as(at), 0)
        if toks.shape[1] < s.branches:  # fewer history slots than branches (tiny contexts only)
            pad = s.branches - toks.shape[1]
            toks, valid = F.pad(toks, (0, 0, 0, pad)), F.pad(valid, (0, 0, 0, pad))
        return chains_tree(r.root, toks, valid)

    def observe(self, verdict, tree, r):
        """Append the committed tokens (accepted..., bonus) to each row's history."""
        path_tokens = torch.gather(tree.tokens, 1, verdict.path)  # [B, P] root, accepted...
        emitted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
        emitted = emitted.scatter(1, verdict.n_accepted[:, None], verdict.bonus[:, None])  # accepted..., bonus
        keep = r.counter - self.seen_counter  # [B] tokens the engine committed this round (0: finished row)
        j = torch.arange(emitted.shape[1], device=emitted.device)[None, :]
        dest = torch.where(j < keep[:, None], (self.hist_len[:, None] + j).clamp(max=self.L), self.L)
        self.hist.scatter_(1, dest, emitted)
        self.hist_len.add_(keep).clamp_(max=self.L)
        self.seen_counter.copy_(r.counter)
        return None


def chains_tree(root: torch.Tensor, toks: torch.Tensor, valid: torch.Tensor) -> DraftTree:
    """root [B]; toks, valid [B, b, k]: b chains of k under the root, chain-major (parents first)."""
    B, b, k = toks.shape
    dev = toks.device
    j = torch.arange(k, device=dev)
    node = 1 + torch.arange(b, device=dev)[:, None] * k + j[None, :]  # [b, k]
    parent = torch.where(j[None, :] == 0, 0, node - 1).flatten()
    valid = valid & (valid.long().cumprod(-1) > 0)  # a node after an invalid one is invalid
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    return DraftTree(tokens=torch.cat([root[:, None], toks.flatten(1)], 1),
                     parents=torch.cat([zero, parent]).expand(B, -1),
                     depth=torch.cat([zero, (j + 1).repeat(b)]).expand(B, -1),
                     valid=torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid.flatten(1)], 1),
                     levels=k, width=b)
