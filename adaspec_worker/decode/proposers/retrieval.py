"""Retrieval drafting (prompt lookup, and a REST-like job datastore): continue the text the way it continued before.

State per row, on the device: `hist` [B, L + 1] (the row's prompt then every token it emitted, -1 beyond;
column L is a write sink), `hist_len` [B], `prompt_len` [B] and `stored` [B] (already in the datastore).
The pending token (root) is the last history entry. With `datastore_tokens` > 0 the proposer also owns a
`Datastore` (`datastore.py`) of every row it has finished, kept across generate() calls (rows enter it
when they leave the batch, at the next call's start, or at `persist`).

A round:
  - propose (`candidates`): for n = 1..max_ngram, mark every earlier history position i where the row's
    last n tokens end (i <= len - 2), and every datastore slot where they end; the best `branches` matches
    (longest, then the row's own text over the datastore, then the most recent; length >= min_ngram) each
    give the k tokens that followed them as one chain under the root (nodes past the known text, or of no
    match: invalid).
  - observe: append the round's committed tokens (accepted..., bonus) to the history; how many is the growth
    of the engine's emitted-token counter, so rows that finished (counter frozen) append nothing.
Tensor ops with shapes fixed by (B, L, capacity, k, branches): no host sync inside a round, CUDA-graph safe;
buffers keep their address across generate() calls. Without a datastore a row's draft depends on its own
text only; with one, on rows finished before it; sampled text is plain sampling's either way (the coupled
rule). Parameters and sources: `RetrievalSpec`; `rasd.py` fuses these candidates with an EAGLE-2 tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.specs import RetrievalSpec

from ..trees import DraftTree
from .base import BatchInfo, Proposer, implements
from .datastore import Datastore

LONGER = 1 << 42  # candidate keys: match length first, then the row's own text, then recency
OWN = 1 << 41


@implements(RetrievalSpec)
class Retrieval(Proposer):
    def __init__(self, spec: RetrievalSpec, context: int):
        super().__init__(spec)
        self.max_nodes = 1 + spec.branches * spec.k
        self.L = context + 2 * self.max_nodes + 1  # a row may commit a whole tree past max_new_tokens
        self.store = Datastore(spec.datastore_tokens, spec.datastore) if spec.datastore_tokens else None

    def begin(self, batch: BatchInfo) -> None:
        self.flush()  # the last call's rows still in the batch join the datastore
        B, L = batch.B, self.L
        full = self.__dict__.setdefault("_full", {}).get("hist")
        if full is None or full.shape[0] < B or full.device != torch.device(batch.device):
            full = self._full["hist"] = torch.empty(B, L + 1, dtype=torch.long, device=batch.device)
        self.hist = full[:B]
        self.row_state("hist_len", B, 0, torch.long, batch.device)
        self.row_state("prompt_len", B, 0, torch.long, batch.device)
        self.row_state("stored", B, False, torch.bool, batch.device)
        self.row_state("seen_counter", B, 0, torch.long, batch.device)  # the engine's counter at the last observe
        if self.store is not None:
            self.store.ensure(batch.device)
        self.admit(torch.arange(B, device=batch.device), batch.prompts)

    def admit(self, rows: torch.Tensor, prompts: list[list[int]]) -> None:
        """Rows `rows` [k] start from their prompts' last L tokens (the rows they replace join the datastore)."""
        if self.store is not None:
            leaving = torch.zeros(self.hist.shape[0], dtype=torch.bool, device=rows.device)
            leaving[rows] = True
            self.flush(leaving)
        super().admit(rows, prompts)
        L = self.L
        host = torch.full((len(prompts), L + 1), -1, dtype=torch.long)  # [k, L + 1]
        for i, p in enumerate(prompts):
            host[i, : min(len(p), L)] = torch.tensor(p[-L:])
        self.hist[rows] = host.to(rows.device)
        lens = torch.tensor([min(len(p), L) for p in prompts], device=rows.device)  # [k]
        self.hist_len[rows] = lens
        self.prompt_len[rows] = lens

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best `branches` continuations: tokens and validity [B, branches, k]."""
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
        key = torch.where(ok, length * LONGER + OWN + pos, -1)  # [B, L]
        if self.store is not None:
            back = ln[:, None] - s.max_ngram + torch.arange(s.max_ngram, device=dev)[None, :]
            tail = torch.where(back >= 0, hist.gather(1, back.clamp(min=0)), -1)  # [B, max_ngram], newest last
            slen, age = self.store.match(tail, s.min_ngram)  # [B, C]
            key = torch.cat([key, torch.where(slen > 0, slen * LONGER + age, -1)], 1)
        best, where = key.topk(min(s.branches, key.shape[1]), dim=-1)  # [B, b]
        at = where[:, :, None] + torch.arange(1, s.k + 1, device=dev)  # [B, b, k] history positions after a match
        valid = (best >= 0)[:, :, None] & (at <= (ln - 1)[:, None, None])
        toks = torch.where(valid, hist.gather(1, at.clamp(max=L - 1).flatten(1)).view_as(at), 0)
        if self.store is not None:
            in_store = (where >= L)[:, :, None]
            stoks, svalid = self.store.continuation((where - L).clamp(min=0), s.k)
            toks = torch.where(in_store, stoks, toks)
            valid = torch.where(in_store, svalid & (best >= 0)[:, :, None], valid)
        if toks.shape[1] < s.branches:  # fewer history slots than branches (tiny contexts only)
            pad = s.branches - toks.shape[1]
            toks, valid = F.pad(toks, (0, 0, 0, pad)), F.pad(valid, (0, 0, 0, pad))
        return toks, valid

    def propose(self, r, plan):
        return chains_tree(r.root, *self.candidates())

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

    def flush(self, rows: torch.Tensor | None = None) -> None:
        """Rows (bool [B]; default all) that emitted something and are not stored yet join the datastore."""
        if self.store is None or getattr(self, "hist", None) is None:
            return
        take = (self.hist_len > self.prompt_len) & ~self.stored  # padding rows emit nothing
        if rows is not None:
            take &= rows
        self.store.add(self.hist[:, : self.L], self.hist_len, take)
        self.stored |= take

    def select(self, rows: torch.Tensor) -> None:
        """Rows that leave the batch join the datastore first."""
        if self.store is not None:
            leaving = torch.ones(self.hist.shape[0], dtype=torch.bool, device=rows.device)
            leaving[rows] = False
            self.flush(leaving)
        super().select(rows)

    def learned(self):
        if self.store is None:
            return None
        with torch.inference_mode():
            self.flush()  # rows of the job's earlier calls join first: the snapshot holds them
        return self.store.snapshot()

    def restore(self, snapshot) -> None:
        if self.store is None:
            return
        with torch.inference_mode():
            self.store.restore(snapshot)
            if getattr(self, "stored", None) is not None:
                self.stored.fill_(True)  # the rows still in the batch (dummy ones) never join the datastore

    def persist(self) -> None:
        """Write the datastore to the spec's `datastore` path (every row so far included)."""
        if self.store is not None and self.spec.datastore:
            with torch.inference_mode():  # the state was made inside generate()'s inference mode
                self.flush()
            self.store.save()


def chains_tree(root: torch.Tensor, toks: torch.Tensor, valid: torch.Tensor) -> DraftTree:
    """root [B]; toks, valid [B, b, k]: b chains of k under the root, chain-major (parents first)."""
    B, b, k = toks.shape
    dev = toks.device
    j = torch.arange(k, device=dev)
    node = 1 + torch.arange(b, device=dev)[:, None] * k + j[None, :]  # [b, k]
    parent = torch.where(j[None, :] == 0, 0, node - 1).flatten()
    valid = valid & (valid.long().cumprod(-1) > 0)  # a node after an invalid one is invalid
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    return DraftTree(
        tokens=torch.cat([root[:, None], toks.flatten(1)], 1),
        parents=torch.cat([zero, parent]).expand(B, -1),
        depth=torch.cat([zero, (j + 1).repeat(b)]).expand(B, -1),
        valid=torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid.flatten(1)], 1),
        levels=k,
        width=b,
    )
