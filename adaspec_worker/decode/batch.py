"""The engine's per-batch state: slot buffers (`Workspace`), what sits in each slot (`Batch`), the rows
to decode (`Request`) and the decoding rows' results with their stop rules (`Outputs`).

The engine decodes rows through B batch *slots*. The workspace holds every per-slot buffer at
capacity (rows and cache slots), so shapes and addresses repeat across rounds and calls, which is
what captured CUDA graphs need. `Batch.origin[i]` says which row slot i decodes (the engine's row
number; a negative one marks a padding slot); with continuous batching the engine re-points a slot
at the next row when its row finishes (`Batch.refill`), and without it shrinks the batch to a
smaller bucket (`Batch.select`).

Knows nothing of models, drafting or verification: the engine fills the buffers.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .drafters import Drafter
from .model import CausalLM
from .proposers.base import Proposer
from .sampling import SamplingParams
from .stats import RowOutcome, SeqStats, outcome_width

# (row tag, tokens so far) -> keep this many tokens, or None; may also have `.batch(tags, token lists, new
# tokens per row)` -> [cut]. Called every few tokens of a row (`Outputs.STOP_EVERY`), not after each one: it must
# find a stop anywhere in the tokens not yet seen, and cut at its first appearance.
StopFn = Callable[[int, list[int]], "int | None"]


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: SeqStats
    logprobs: list[float] | None = None  # per token, when SamplingParams.logprobs asked (logprobs.py)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: its k most likely (id, logprob)


def on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of `values` on `device`, copied without waiting for the device (a plain copy from pageable
    memory synchronises the stream, which would stall the round launched ahead)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def bucket(n: int) -> int:
    """Static batch sizes: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def shrunk(n: int) -> int:
    """The static size a shrinking batch takes for n live rows: powers of two up to 16, multiples of 8 above, so a
    64-slot batch drains through 56, 48, ... rather than running 64 slots until half its rows are done (a few more
    graphs captured per shape, once, against idle slots in every batch's last rounds)."""
    return bucket(n) if n <= 16 else -(-n // 8) * 8


def padding(alive: list[int], n: int, B: int) -> list[int]:
    """The dead slots that fill places len(alive)..n-1 of a batch shrunk from B to n slots around its live slots
    `alive` (ascending): a place's own slot where it is dead (it stays put), else the highest dead slots, which no
    move overwrites, so the cache's rows move one by one with no temporary copy (`kv_cache.move_rows`)."""
    kept, A = set(alive), len(alive)
    spare = [i for i in range(B - 1, -1, -1) if i not in kept and not A <= i < n]
    return [p if p not in kept else spare.pop(0) for p in range(A, n)]


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
        self.staging: StagedRefill | None = None  # captured refill prefills (CUDA graphs): their fixed buffers
        self.prompt_rows: dict[tuple[int, int], torch.Tensor] = {}  # (B, W) -> a batch's prompts for its prefill
        self.scratch: dict[str, object] = {}  # chunked refills' scratch caches by owner, kept for the next one
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

    def stage(self, prompts: list[list[int]], W: int) -> torch.Tensor:
        """A batch's prompts right-padded with 0 to W tokens, then each one's length: [B, W + 1] in a fixed device
        buffer per (B, W), one copy to the device, for the batch's captured prefill to read."""
        key = (len(prompts), W)
        rows = self.prompt_rows.get(key)
        if rows is None:
            rows = self.prompt_rows[key] = torch.zeros(*key[:1], W + 1, dtype=torch.long, device=self.cache.kv.device)
        rows.copy_(on_device([(p + [0] * W)[:W] + [len(p)] for p in prompts], rows.device))
        return rows

    def scratch_cache(self, owner: str, new_cache, B: int, S: int):
        """A cache of B rows and at least S positions (a multiple of 256, at most the workspace's) from `new_cache`
        (B, S), kept under `owner` for the next caller and grown only: chunked refills allocate nothing each time."""
        S = min(-(-S // 256) * 256, self.S)
        cache = self.scratch.get(owner)
        if cache is None or cache.full_kv.shape[0] < B or cache.capacity < S:
            rows = B if cache is None else max(B, cache.full_kv.shape[0])
            cache = self.scratch[owner] = new_cache(rows, max(S, 0 if cache is None else cache.capacity))
        cache.view(B)
        return cache

    def view(self, B: int) -> None:
        self.B = B
        for name, buffer in self.full.items():
            setattr(self, name, buffer[:B])
        self.cache.view(B)

    def select(self, rows: torch.Tensor, order: list[int] | None = None) -> None:
        """Keep slots `rows` [n] (device; `order`: the same on the host, for the cache's moves), moved to the front."""
        n = rows.shape[0]
        for buffer in self.full.values():
            buffer[:n] = buffer[rows]
        self.cache.select(rows, order)
        self.view(n)


class Batch:
    """Everything aligned by slot during one generate(): `select` re-orders all of it together, `refill`
    re-points slots at new prompts."""

    def __init__(self, workspace: Workspace, proposer: Proposer, drafter: Drafter | None, origin: list[int]):
        self.workspace, self.proposer, self.drafter = workspace, proposer, drafter
        self.origin = origin  # [B] the row each slot decodes (negative: padding)
        self.plan: list[int] | None = None  # [B] the proposer's plan for the next round, on the host

    def select(self, order: list[int]) -> None:
        """Keep slots `order`, in that order: workspace, proposer and drafter state, origin and plan."""
        index = on_device(order, self.workspace.root.device)
        self.workspace.select(index, order)
        self.proposer.select(index)
        if self.drafter is not None:
            self.drafter.select(index, order)
        self.origin = [self.origin[i] for i in order]
        if self.plan is not None:
            self.plan = [self.plan[i] for i in order]

    def refill(self, slots: list[int], rows: list[int], plan: list[int] | None) -> None:
        """Slots `slots` now decode `rows` (the buffers were filled by the engine); plan [B]: the proposer's
        plan for every slot, of which the refilled slots' entries are taken."""
        for slot, row in zip(slots, rows):
            self.origin[slot] = row
            if self.plan is not None and plan is not None:
                self.plan[slot] = plan[slot]

    def live(self, outputs: Outputs) -> list[int]:
        """Slots whose row is still decoding."""
        return [i for i, row in enumerate(self.origin) if outputs.running(row)]


@dataclass
class Request:
    """One row to decode, with everything that is its own: a stream's rows may come from different shards.
    Rows decode together only when their `sampling` is equal (its rule is baked into captured graphs)."""

    prompt: list[int]
    sampling: SamplingParams
    seed: int = 0
    stop_fn: StopFn | None = None  # called with (tag, tokens so far)
    tag: Any = None  # the caller's name for the row: handed back with its Completion, and to stop_fn
    group: Hashable = None  # rows accounted together (a shard): the stream keeps EngineStats per group


@dataclass
class Ended:
    """A row that finished in a round: where it sat, and its result."""

    slot: int
    row: int
    request: Request
    completion: Completion


@dataclass
class _Live:
    """A decoding row's results so far."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top: list | None = None
    stats: SeqStats = field(default_factory=SeqStats)
    unchecked: int = 0  # tokens not yet seen by the stop rule


class Outputs:
    """Per-row tokens, counters and stop rules of the rows in the slots (row numbers are the engine's, a slot
    with a negative one pads); a finished row's Completion is handed back once and forgotten.

    Stop strings are looked for once a row has `STOP_EVERY` tokens the rule has not seen (and always when it
    ends otherwise): the tokenizer call is most of a round's host work at 64 slots. The cut is where the string
    first appears either way, so a row's tokens do not change; it may decode a few rounds past it."""

    STOP_EVERY = 4

    def __init__(self):
        self.rows: dict[int, _Live] = {}

    def add(self, row: int, request: Request) -> None:
        scored = request.sampling.logprobs is not None
        # rows start at counts staggered by their own seed, so a round checks about 1/STOP_EVERY of them (no round
        # of all rows at once) and a row's rounds still depend on nothing but itself
        self.rows[row] = _Live(request, logprobs=[] if scored else None, top=[] if scored else None,
                               unchecked=request.seed % self.STOP_EVERY)

    @property
    def live(self) -> int:
        return len(self.rows)

    def running(self, row: int) -> bool:
        return row in self.rows

    def record(self, origin: list[int], outcomes: list[RowOutcome]) -> list[Ended]:
        """Account a round; return the rows that finished in it, by slot. Stop strings are checked for all rows
        of one stop rule at once (`stop_fn.batch`, when the callback has it: one tokenizer call per check)."""
        finished, checks = [], {}  # checks: stop rule -> [(slot, row, reason so far)] the callback must see
        for i, (row, out) in enumerate(zip(origin, outcomes)):
            live = self.rows.get(row)
            if live is None:
                continue
            live.stats.observe(out)
            before = len(live.tokens)
            reason = self._append(live, out)
            stop_fn = live.request.stop_fn
            live.unchecked += len(live.tokens) - before
            if stop_fn is None or (reason is None and live.unchecked < self.STOP_EVERY):
                if reason:
                    finished.append((i, row, reason))
            else:
                checks.setdefault(id(stop_fn), []).append((i, row, reason))
        for group in checks.values():
            stop_fn = self.rows[group[0][1]].request.stop_fn
            batch = getattr(stop_fn, "batch", None)
            tags = [self.rows[row].request.tag for _, row, _ in group]
            seqs = [self.rows[row].tokens for _, row, _ in group]
            if batch:
                cuts = batch(tags, seqs, [self.rows[row].unchecked for _, row, _ in group])
            else:
                cuts = [stop_fn(tag, out) for tag, out in zip(tags, seqs)]
            for _, row, _ in group:
                self.rows[row].unchecked = 0
            for (i, row, reason), cut in zip(group, cuts):
                if cut is not None:
                    self._cut(self.rows[row], cut)
                    reason = "stop"
                if reason:
                    finished.append((i, row, reason))
        ended = []
        for i, row, reason in sorted(finished):
            live = self.rows.pop(row)
            done = Completion(live.tokens, reason, live.stats, live.logprobs, live.top)
            ended.append(Ended(i, row, live.request, done))
        return ended

    @staticmethod
    def _append(live: _Live, out: RowOutcome) -> str | None:
        """Add a round's tokens (and their log-probabilities, when asked) to a row: "stop" at EOS, "length" at
        max_new_tokens (a stop string may still turn it into "stop"), else None."""
        sampling = live.request.sampling
        for j, t in enumerate(out.tokens):
            live.tokens.append(t)
            if live.logprobs is not None:
                live.logprobs.append(out.logprobs[j])
                live.top.append(out.top_logprobs[j])
            if t in sampling.eos_token_ids:
                return "stop"
            if len(live.tokens) >= sampling.max_new_tokens:
                return "length"
        return None

    @staticmethod
    def _cut(live: _Live, keep: int) -> None:
        """A stop string ends the row after `keep` tokens."""
        del live.tokens[keep:]
        if live.logprobs is not None:
            del live.logprobs[keep:]
            del live.top[keep:]


class StagedRefill:
    """Fixed buffers for continuous batching's refill prefills, so they can be captured as CUDA graphs: a refill
    of k rows whose longest prompt has n tokens runs as a prefill of bucket(k) rows of `width(n)` tokens (the
    extra rows repeat the first prompt and are dropped), reading `rows` [kb, W + 3] (token ids, then the prompt
    length, the slot and the seed per row: one host-to-device copy) and writing a scratch cache of `capacity`
    slots shared by every shape (and the drafter's). Grown only; growing drops the refill graphs captured over
    the old one."""

    STEP = 64  # prompt widths are multiples of STEP

    def __init__(self, target: CausalLM, B: int, capacity: int):
        self.cache = target.new_cache(B, capacity)  # kv [B, capacity, L, 2, Hkv, D]
        self.draft_cache = None  # the drafter's, of the same capacity (the engine makes it when a refill drafts)
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # (kb, W) -> rows [kb, W + 3] on the device

    @classmethod
    def width(cls, n: int) -> int:
        return -(-n // cls.STEP) * cls.STEP

    def fits(self, B: int, W: int) -> bool:
        return self.cache.full_kv.shape[0] >= B and self.cache.capacity >= W

    def stage(self, prompts: list[list[int]], slots: list[int], seeds: list[int], W: int) -> torch.Tensor:
        """The refill's rows, padded to bucket(k) rows of W tokens, copied into their fixed device buffer."""
        kb = bucket(len(prompts))
        pad = [0] * W
        host = [(prompts[j] + pad)[:W] + [len(prompts[j]), slots[j], seeds[j]]
                for j in (i if i < len(prompts) else 0 for i in range(kb))]  # padding rows repeat the first row
        rows = self.inputs.get((kb, W))
        if rows is None:
            rows = self.inputs[(kb, W)] = torch.zeros(kb, W + 3, dtype=torch.long, device=self.cache.kv.device)
        rows.copy_(on_device(host, rows.device))
        return rows
