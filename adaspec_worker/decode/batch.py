"""The engine's per-call state: slot buffers (`Workspace`), what sits in each slot (`Batch`), and the
per-prompt results with their stop rules (`Outputs`).

A generate() call decodes its prompts through B batch *slots*. The workspace holds every per-slot
buffer at capacity (rows and cache slots), so shapes and addresses repeat across rounds and calls,
which is what captured CUDA graphs need. `Batch.origin[i]` says which prompt slot i decodes (a value
>= the number of prompts marks a padding slot); with continuous batching the engine re-points a slot
at the next prompt when its row finishes (`Batch.refill`), and without it shrinks the batch to a
smaller bucket (`Batch.select`).

Knows nothing of models, drafting or verification: the engine fills the buffers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .drafters import Drafter
from .model import CausalLM
from .proposers.base import Proposer
from .sampling import SamplingParams
from .stats import RowOutcome, SeqStats, outcome_width

# (prompt, tokens so far) -> keep this many tokens, or None; may also have `.batch(prompts, token lists, new
# tokens per row)` -> [cut]
StopFn = Callable[[int, list[int]], "int | None"]


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: SeqStats
    logprobs: list[float] | None = None  # per token, when SamplingParams.logprobs asked (logprobs.py)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: its k most likely (id, logprob)


def bucket(n: int) -> int:
    """Static batch sizes: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


class Workspace:
    """Per-engine buffers every round reads and writes in place, sized (B slots, S cache positions).

    Slot state lives in views of capacity-sized buffers, so shapes and addresses repeat from round to
    round and from call to call: the condition for replaying captured CUDA graphs."""

    def __init__(self, target: CausalLM, B: int, S: int, max_nodes: int):
        device, dtype = target.device, target.dtype
        H, V = target.cfg.hidden_size, target.cfg.vocab_size
        self.B_cap, self.S, self.max_nodes = B, S, max_nodes
        self.cache = target.new_cache(B, S)
        self.full = {
            "root": torch.zeros(B, dtype=torch.long, device=device),  # pending token
            "seed": torch.zeros(B, dtype=torch.long, device=device),
            "counter": torch.zeros(B, dtype=torch.long, device=device),  # tokens emitted so far
            "alive": torch.zeros(B, dtype=torch.bool, device=device),
            "draft_logits": torch.zeros(B, V, dtype=dtype, device=device),  # drafter output at the last entry
            "draft_hidden": torch.zeros(B, H, dtype=dtype, device=device),
            "ldlp_feat": torch.zeros(B, 2 * H, dtype=dtype, device=device),  # emb(root) ++ hidden that produced it
        }
        self.graphs: dict = {}
        self.seen: set = set()
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.fit_outcome(None)
        self.view(B)

    def fit_outcome(self, logprobs: int | None) -> None:
        """The outcome buffer (see stats.py) and its two host copies (a round lands in one while the next one's
        copy may be in flight to the other) wide enough for `logprobs` (None or k). Grown only; growing drops
        the captured graphs, which wrote into the old buffer."""
        width = outcome_width(self.max_nodes, logprobs)
        old = self.full.get("outcome")
        if old is not None and old.shape[1] >= width:
            return
        device = self.full["root"].device
        self.full["outcome"] = torch.zeros(self.B_cap, width, dtype=torch.long, device=device)
        self.landing = [torch.zeros(self.B_cap, width, dtype=torch.long, pin_memory=device.type == "cuda")
                        for _ in range(2)]
        self.flip = 0
        self.graphs.clear()
        self.seen.clear()
        if old is not None:
            self.view(self.B)

    def view(self, B: int) -> None:
        self.B = B
        for name, buffer in self.full.items():
            setattr(self, name, buffer[:B])
        self.cache.view(B)

    def select(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        for buffer in self.full.values():
            buffer[:n] = buffer[rows]
        self.cache.select(rows)
        self.view(n)


class Batch:
    """Everything aligned by slot during one generate(): `select` re-orders all of it together, `refill`
    re-points slots at new prompts."""

    def __init__(self, workspace: Workspace, proposer: Proposer, drafter: Drafter | None, origin: list[int]):
        self.workspace, self.proposer, self.drafter = workspace, proposer, drafter
        self.origin = origin  # [B] prompt index of each slot (>= the number of prompts: padding)
        self.plan: list[int] | None = None  # [B] the proposer's plan for the next round, on the host

    def select(self, order: list[int]) -> None:
        """Keep slots `order`, in that order: workspace, proposer and drafter state, origin and plan."""
        index = torch.tensor(order, device=self.workspace.root.device)
        self.workspace.select(index)
        self.proposer.select(index)
        if self.drafter is not None:
            self.drafter.select(index)
        self.origin = [self.origin[i] for i in order]
        if self.plan is not None:
            self.plan = [self.plan[i] for i in order]

    def refill(self, slots: list[int], prompts: list[int], plan: list[int] | None) -> None:
        """Slots `slots` now decode `prompts` (the buffers were filled by the engine); plan [B]: the proposer's
        plan for every slot, of which the refilled slots' entries are taken."""
        for slot, prompt in zip(slots, prompts):
            self.origin[slot] = prompt
            if self.plan is not None and plan is not None:
                self.plan[slot] = plan[slot]

    def live(self, outputs: Outputs) -> list[int]:
        """Slots whose prompt is still decoding."""
        return [i for i, prompt in enumerate(self.origin) if outputs.running(prompt)]


class Outputs:
    """Per-prompt tokens, counters and completions of one generate(); applies the stop rules."""

    def __init__(self, n_prompts: int, sampling: SamplingParams, stop_fn: StopFn | None):
        self.sampling, self.stop_fn = sampling, stop_fn
        self.eos = set(sampling.eos_token_ids)
        self.tokens: list[list[int]] = [[] for _ in range(n_prompts)]
        scored = sampling.logprobs is not None
        self.logprobs: list[list[float]] | None = [[] for _ in range(n_prompts)] if scored else None
        self.top: list[list] | None = [[] for _ in range(n_prompts)] if scored else None
        self.stats = [SeqStats() for _ in range(n_prompts)]
        self.done: list[Completion | None] = [None] * n_prompts
        self.live = n_prompts  # prompts not finished (queued ones included)

    def running(self, prompt: int) -> bool:
        return prompt < len(self.done) and self.done[prompt] is None

    def record(self, origin: list[int], outcomes: list[RowOutcome]) -> list[int]:
        """Account a round; return the slots whose row finished in it. Stop strings are checked for all rows
        at once (`stop_fn.batch`, when the callback has it: one tokenizer call per round)."""
        finished, checks = [], []  # checks: (slot, prompt, reason so far) of rows the stop callback must see
        for i, (prompt, row) in enumerate(zip(origin, outcomes)):
            if not self.running(prompt):
                continue
            self.stats[prompt].observe(row)
            reason = self._append(prompt, row)
            if reason == "stop":
                finished.append((i, prompt, reason))
            elif self.stop_fn is not None:
                checks.append((i, prompt, reason))
            elif reason:
                finished.append((i, prompt, reason))
        if checks:
            batch = getattr(self.stop_fn, "batch", None)
            prompts = [prompt for _, prompt, _ in checks]
            seqs = [self.tokens[prompt] for prompt in prompts]
            if batch:
                cuts = batch(prompts, seqs, [len(outcomes[i].tokens) for i, _, _ in checks])
            else:
                cuts = [self.stop_fn(p, out) for p, out in zip(prompts, seqs)]
            for (i, prompt, reason), cut in zip(checks, cuts):
                if cut is not None:
                    self._cut(prompt, cut)
                    reason = "stop"
                if reason:
                    finished.append((i, prompt, reason))
        for _, prompt, reason in finished:
            self.done[prompt] = Completion(self.tokens[prompt], reason, self.stats[prompt],
                                           None if self.logprobs is None else self.logprobs[prompt],
                                           None if self.top is None else self.top[prompt])
        self.live -= len(finished)
        return sorted(i for i, _, _ in finished)

    def _append(self, prompt: int, row: RowOutcome) -> str | None:
        """Add a round's tokens (and their log-probabilities, when asked) to a row: "stop" at EOS, "length" at
        max_new_tokens (a stop string may still turn it into "stop"), else None."""
        out = self.tokens[prompt]
        for j, t in enumerate(row.tokens):
            out.append(t)
            if self.logprobs is not None:
                self.logprobs[prompt].append(row.logprobs[j])
                self.top[prompt].append(row.top_logprobs[j])
            if t in self.eos:
                return "stop"
            if len(out) >= self.sampling.max_new_tokens:
                return "length"
        return None

    def _cut(self, prompt: int, keep: int) -> None:
        """A stop string ends the row after `keep` tokens."""
        del self.tokens[prompt][keep:]
        if self.logprobs is not None:
            del self.logprobs[prompt][keep:]
            del self.top[prompt][keep:]
