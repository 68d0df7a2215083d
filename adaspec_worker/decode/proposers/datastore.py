"""The job's datastore for retrieval drafting: the text of every row an engine has finished, searchable on the device.

State: `tokens` [C] long, a ring buffer of finished rows (prompt then completion), each followed by a -1
separator, and `write` [1] long, the slot the next row starts at. A row longer than the buffer keeps its
newest C - 1 tokens; the oldest rows are overwritten first. Rows arrive from the retrieval proposers
(`retrieval`, `rasd`) when they leave the batch or the call ends, so the store grows across batches and
shards of one actor; `save`/`load` keep it with the job as safetensors (never pickle), written atomically.

Lookup (REST-like, brute force, fixed shapes): for each row's last max_ngram tokens, every slot where the
longest matching suffix ends, its match length and its age; the continuation after a slot stops at the
first separator. Everything but `save`/`load` is tensor ops without host sync. Knows nothing of trees,
verification or which proposer asks.
"""

from __future__ import annotations

import os

import torch


class Datastore:
    def __init__(self, capacity: int, path: str = ""):
        self.capacity, self.path = capacity, path
        self.tokens: torch.Tensor | None = None  # [C] long, -1 = separator or never written
        self.write: torch.Tensor | None = None  # [1] long, next slot to write

    def ensure(self, device) -> None:
        """Allocate on first use (loading `path` when the file exists), or move to another device."""
        device = torch.device(device)
        if self.tokens is None:
            self.tokens = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
            self.write = torch.zeros(1, dtype=torch.long, device=device)
            if self.path and os.path.exists(self.path):
                self.load(self.path)
        elif self.tokens.device != device:
            self.tokens, self.write = self.tokens.to(device), self.write.to(device)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens, write) copies, or None before the first use."""
        return None if self.tokens is None else (self.tokens.clone(), self.write.clone())

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Back to `snap`, in place; None: to what the first use made (empty, or the file at `path`)."""
        if self.tokens is None:
            return
        if snap is None:
            self.tokens.fill_(-1)
            self.write.zero_()
            if self.path and os.path.exists(self.path):
                self.load(self.path)
        else:
            self.tokens.copy_(snap[0])
            self.write.copy_(snap[1])

    def add(self, text: torch.Tensor, lens: torch.Tensor, take: torch.Tensor) -> None:
        """Append rows: text [R, W] (row r's tokens in text[r, :lens[r]]), lens [R], take [R] bool. In place."""
        C = self.capacity
        R, W = text.shape
        dev = text.device
        n = torch.where(take, lens.clamp(max=min(W, C - 1)), -1)  # tokens kept per row; -1: row not taken
        start = (n + 1).cumsum(0) - (n + 1)  # [R] each row's first slot, relative to the write pointer
        total = (n + 1).sum()
        j = torch.arange(W + 1, device=dev)[None, :]  # j == n[r]: the separator
        first = lens.clamp(max=W)[:, None] - n[:, None]  # rows longer than the buffer keep their newest tokens
        src = (first + j).clamp(0, W - 1)
        value = torch.where(j < n[:, None], torch.gather(text, 1, src[:, : W + 1].clamp(max=W - 1)), -1)  # [R, W+1]
        g = start[:, None] + j  # global write index
        live = (j <= n[:, None]) & (g >= total - C)  # only the newest C writes: no slot written twice
        dest = torch.where(live, (self.write + g) % C, C)  # C: a sink past the buffer
        sink = torch.cat([self.tokens, self.tokens.new_full((1,), -1)])
        sink.scatter_(0, dest.flatten(), value.flatten())
        self.tokens.copy_(sink[:C])
        self.write.copy_((self.write + total) % C)

    def match(self, tail: torch.Tensor, min_ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tail [B, m] each row's last m tokens (tail[:, -1] the newest; -1 where the row is shorter) ->
        (match length [B, C], 0 below min_ngram; age rank [B, C], larger = newer) for the match ending at each slot."""
        C = self.capacity
        B, m = tail.shape
        run = torch.ones(B, C, dtype=torch.bool, device=tail.device)
        length = torch.zeros(B, C, dtype=torch.long, device=tail.device)
        for j in range(m):
            want = tail[:, m - 1 - j]  # [B] the j-th newest token
            shifted = torch.roll(self.tokens, j)  # shifted[i] = tokens[i - j]
            run &= (shifted[None, :] == want[:, None]) & (want >= 0)[:, None]
            length += run.long()
        slot = torch.arange(C, device=tail.device)
        age = (slot - self.write) % C  # 0 = oldest slot
        return torch.where(length >= min_ngram, length, 0), age.expand(B, C)

    def continuation(self, end: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """end [B, b] slots where matches end -> the k tokens after each [B, b, k] and their validity (up to the
        first separator, and never running into the slot the next row will be written at)."""
        C = self.capacity
        at = end[:, :, None] + torch.arange(1, k + 1, device=end.device)  # [B, b, k]
        toks = self.tokens[at % C]
        wrapped = ((at - self.write) % C) < ((end[:, :, None] - self.write) % C)  # ran past the newest slot
        valid = ((toks >= 0) & ~wrapped).long().cumprod(-1).bool()
        return torch.where(valid, toks, 0), valid

    def save(self, path: str | None = None) -> None:
        """Write tokens and write pointer to `path` (default: the spec's), atomically."""
        from safetensors.torch import save_file

        path = path or self.path
        if self.tokens is None or not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(
            {"tokens": self.tokens.cpu().contiguous(), "write": self.write.cpu()},
            tmp,
            metadata={"format": "adarun-datastore"},
        )
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        """Read a saved datastore; a different capacity keeps the newest tokens that fit."""
        from safetensors.torch import load_file

        saved = load_file(path)
        old, w = saved["tokens"], int(saved["write"][0])
        ordered = torch.cat([old[w:], old[:w]])  # oldest first
        ordered = ordered[-(self.capacity - 1) :] if ordered.shape[0] >= self.capacity else ordered
        n = ordered.shape[0]
        self.tokens.fill_(-1)
        self.tokens[:n] = ordered.to(self.tokens.device)
        self.write.fill_(n % self.capacity)
