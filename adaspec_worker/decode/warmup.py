"""Engine warm-up: every round shape a job may run, compiled, captured and timed before the job's first row.

    seconds = warm(engine, slots=64, sampling=sp, prompt_len=longest_prompt)

For each variant the proposer may run (`Proposer.variants()`: one for the fixed methods, the whole menu of an
adaptive policy, plain decoding included), one call of `slots` short dummy rows runs at least `rounds` rounds
with that variant forced. On CUDA the first round compiles, the second captures the round's graphs and the rest
replay them, so the job's calls at that batch size and sampling rule replay graphs from their first round (batch
sizes a drain shrinks to, refills of fewer rows and a Thompson chain's other lengths are still captured on first
use). So is a batch's prefill, at every prompt width up to `prompt_len` (`_prefill_widths`, 512 tokens at most).
An adaptive policy keeps each variant's median round time (`policy.Timings`, through the proposer's `timed`;
rounds that compiled or captured are not timed), so it prices every shape it may choose, `none` included, from
this device's measurement instead of extrapolating from the shapes it has run. The dummy rows teach nothing:
forced calls never update the policy's acceptance posteriors, and what a proposer learns across calls (a
retrieval datastore, token-recycling's table) is put back as it was (`Proposer.learned` / `restore`).

The workspace is sized for the job's first batch (`prompt_len`: the longest prompt queued with the job's first
rows, plus max_new_tokens and the stream's slack), so the graphs captured here are the ones the job replays (a
larger cache would slow every round, a smaller one would be reallocated and its graphs recaptured).

Knows nothing of the job: its caller says how many slots, which sampling rule and how long the prompts are.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .batch import StagedRefill, bucket
from .sampling import SamplingParams
from .stream import slack

DUMMY_PROMPT = 16  # tokens per dummy row: the rounds' cost depends on the workspace's size, not on the prompts
# prompt widths whose prefill warm-up captures: 8 at most (longer prompts prefill in chunks of the default
# `resources.prefill_chunk`, 512 positions; a wider prefill first met in the job is captured at its second use)
PREFILL_WIDTHS = 512


def warm(engine, slots: int, sampling: SamplingParams, prompt_len: int, rounds: int = 8) -> float:
    """Run every variant of `engine`'s proposer for >= `rounds` rounds on `slots` dummy rows with `sampling`'s rule,
    over a workspace sized for prompts of up to `prompt_len` tokens; returns the seconds it took. Once per (batch
    bucket, rule) while the workspace warmed stays the engine's: a repeated call returns 0."""
    if getattr(engine, "proposer", None) is None:  # the transformers fallback: nothing compiled or captured
        return 0.0
    assert min(slots, rounds, prompt_len) >= 1, f"warm-up needs positive sizes, got {slots}, {rounds}, {prompt_len}"
    B = bucket(slots) if engine.fast else slots
    rule = sampling.graph_key
    proposer = engine.proposer
    S = prompt_len + sampling.max_new_tokens + slack(proposer)
    done = engine.__dict__.setdefault("warmed", {})  # (B, rule) -> the workspace its graphs were captured over
    work = engine.workspace
    if work is not None and done.get((B, rule)) is work and work.B_cap >= B and work.S >= S:
        return 0.0
    start = time.perf_counter()
    engine._workspace(B, S)  # as the job's first batch sizes it (grown only, never shrunk)
    g = torch.Generator().manual_seed(0)  # the same dummy rows on every actor; short: their prefill is not the job's
    prompts = torch.randint(engine.target.cfg.vocab_size, (B, min(prompt_len, DUMMY_PROMPT)), generator=g).tolist()
    learned = proposer.learned()
    prefilled = set()  # drafting or not: whether a prefill's graph includes the drafter's
    try:
        for variant in proposer.variants():
            proposer.force(variant.key)
            new = min(rounds * variant.max_emit, sampling.max_new_tokens)
            sp = dataclasses.replace(sampling, max_new_tokens=new, eos_token_ids=())  # no row ends early
            engine.generate(prompts, sp, seeds=list(range(B)), slots=B)
            if engine.graphs_on and proposer.drafting not in prefilled:
                prefilled.add(proposer.drafting)
                _prefill_widths(engine, B, sampling, prompt_len, g)
    finally:
        proposer.force(None)
        proposer.restore(learned)  # the dummy rows leave nothing in a datastore or recycling table
    done[(B, rule)] = engine.workspace
    return time.perf_counter() - start


def _prefill_widths(engine, B: int, sampling: SamplingParams, prompt_len: int, g: torch.Generator) -> None:
    """A batch's prefill at every prompt width up to `prompt_len`'s (`StagedRefill.STEP` apart, `PREFILL_WIDTHS` at
    most): each compiled, then captured, so a batch of B rows starts with one graph replay whatever its prompts'
    lengths."""
    sp = dataclasses.replace(sampling, max_new_tokens=1, eos_token_ids=())
    for W in range(StagedRefill.STEP, min(StagedRefill.width(prompt_len), PREFILL_WIDTHS) + 1, StagedRefill.STEP):
        prompts = torch.randint(engine.target.cfg.vocab_size, (B, W), generator=g).tolist()
        for _ in range(2):  # the first use compiles, the second captures
            engine.generate(prompts, sp, seeds=list(range(B)), slots=B)
