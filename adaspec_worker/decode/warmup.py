"""Engine warm-up: every round shape a job may run, compiled, captured and timed before the job's first row.

    seconds = warm(engine, slots=64, sampling=sp, prompt_len=longest_prompt)

For each variant the proposer may run (`Proposer.variants()`: one for the fixed methods, the whole menu of an
adaptive policy, plain decoding included), one call of `slots` dummy rows runs at least `rounds` rounds with
that variant forced. On CUDA the first round compiles, the second captures the round's graphs and the rest
replay them, so no call of the job compiles or captures a draft or verify graph; an adaptive policy keeps each
variant's median round time (`policy.Timings`, through the proposer's `timed`), so it prices every shape it may
choose, `none` included, from this device's measurement instead of extrapolating from the shapes it has run.
The dummy rows' tokens are no evidence of what the job's rows accept: forced calls never update the policy's
acceptance posteriors.

The workspace is sized as the job's first batch will size it (`prompt_len`: the longest prompt queued with the
job's first rows), so the graphs captured here are the ones the job replays (a larger cache would slow every
round, a smaller one would be reallocated and recaptured). Refill prefills are captured on first use.

Knows nothing of the job: its caller says how many slots, which sampling rule and how long the prompts are.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .batch import bucket
from .sampling import SamplingParams
from .stream import slack


def warm(engine, slots: int, sampling: SamplingParams, prompt_len: int, rounds: int = 8) -> float:
    """Run every variant of `engine`'s proposer for >= `rounds` rounds on `slots` dummy rows of `prompt_len` tokens
    with `sampling`'s rule; returns the seconds it took. Once per (batch bucket, rule, prompt length) per engine:
    a repeated call returns 0."""
    if getattr(engine, "proposer", None) is None:  # the transformers fallback: nothing compiled or captured
        return 0.0
    assert slots >= 1 and rounds >= 1, f"warm-up needs slots >= 1 and rounds >= 1, got {slots}, {rounds}"
    B = bucket(slots) if engine.fast else slots
    rule = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.logprobs)
    key = (B, rule, prompt_len)
    done = engine.__dict__.setdefault("warmed", set())
    if key in done:
        return 0.0
    start = time.perf_counter()
    proposer = engine.proposer
    assert prompt_len >= 1, f"prompt_len must be >= 1, got {prompt_len}"
    engine._workspace(B, prompt_len + sampling.max_new_tokens + slack(proposer))  # as the job's first batch sizes it
    g = torch.Generator().manual_seed(0)  # the same dummy rows on every actor
    prompts = torch.randint(engine.target.cfg.vocab_size, (B, prompt_len), generator=g).tolist()
    try:
        for variant, per_round in proposer.variants():
            proposer.force(variant)
            new = min(rounds * per_round, sampling.max_new_tokens)
            sp = dataclasses.replace(sampling, max_new_tokens=new, eos_token_ids=())  # no row ends early
            engine.generate(prompts, sp, seeds=list(range(B)), slots=B)
    finally:
        proposer.force(None)
    done.add(key)
    seconds = time.perf_counter() - start
    engine.warmup_seconds += seconds  # reported with the next call's stats, as a first call's compile would be
    return seconds
