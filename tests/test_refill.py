"""Continuous batching: a finished row's slot takes the next queued prompt at once. Every method's rows
decode to the same tokens with refill on, refill off and all at once (greedy and sampled), slots stay
busier, and the per-row statistics still add up."""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import METHOD_SPECS, parse_spec
from tests import tiny
from tests.helpers import TINY, TINY_HEAD, TINY_LDLP

SMALL = {  # small shapes keep the test quick; every registered method runs
    "eagle": {"k": 3}, "eagle2": {"top_k": 3, "depth": 3, "total_tokens": 8}, "draft-model": {"k": 3},
    "token-recycling": {"k": 3, "nodes": 8, "max_depth": 3}, "retrieval": {"k": 3, "branches": 2},
    "oracle": {"k_max": 4, "top_k": 3}, "ddd": {"top_k": 3, "max_depth": 4, "total_tokens": 12, "check_depths": [2]},
    "opt-tree": {"n": 3, "max_depth": 4}, "ldlp-tree": {"top_k": 3, "nodes_per_level": 3, "max_depth": 4},
    "rasd": {"top_k": 3, "depth": 3, "total_tokens": 8, "k": 3, "branches": 2, "datastore_tokens": 256},
}
LENGTHS = [3, 14, 1, 9, 20, 2, 6, 11]  # each row's own stopping point: rows finish at very different rounds


@pytest.fixture(scope="module")
def tgt(tmp_path_factory):
    target = load_target(str(TINY), dtype="float32", device="cpu")
    target.early_exit_dir = tiny.early_exit_head(TINY, tmp_path_factory.mktemp("ee") / "ee", exit_layer=1, noise=0.05)
    return target


def engine(tgt, method):
    needs = METHOD_SPECS[method].needs
    draft = {"eagle": TINY_HEAD, "draft-model": TINY, "early-exit": tgt.early_exit_dir}.get(needs.get("draft"))
    return build_engine(tgt, parse_spec(method, SMALL.get(method, {})), draft=str(draft) if draft else None,
                        ldlp=str(TINY_LDLP) if "ldlp" in needs else None)


def prompts_for(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(5, 400, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)]


def stop_at(prompt: int, tokens: list[int]):
    """Row `prompt` stops after LENGTHS[prompt] tokens (a stop string would, in a job)."""
    return LENGTHS[prompt] if len(tokens) >= LENGTHS[prompt] else None


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_refill_changes_no_tokens(tgt, method):
    """Greedy and T=0.8: the same tokens per row with refill on (1, 2 and 3 slots; prompts prefilled at once or a
    chunk of 3 or 4 positions per round), refill off, and all at once (sampled: three of the five settings)."""
    prompts, seeds = prompts_for(len(LENGTHS)), list(range(100, 100 + len(LENGTHS)))
    eng = engine(tgt, method)
    settings = ((2, True, False, 0), (3, True, True, 4), (3, False, True, 0), (1, True, True, 0), (2, True, True, 3))
    for sp in (SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.8)):
        whole, _ = eng.generate(prompts, sp, seeds, stop_at)
        ref = [c.tokens for c in whole]
        assert [len(t) for t in ref] == LENGTHS
        for slots, refill, overlap, chunk in settings if sp.greedy else settings[:3]:
            eng.overlap = overlap  # the next round launched before this one is recorded (the CUDA default)
            outs, stats = eng.generate(prompts, sp, seeds, stop_at, slots=slots, refill=refill, prefill_chunk=chunk)
            assert [c.tokens for c in outs] == ref, (method, sp.temperature, slots, refill, overlap, chunk)
            assert (stats.prefill_chunks > 0) == (chunk > 0), (chunk, stats.prefill_chunks)  # prompts of up to 11
            assert stats.rows.rounds == sum(c.stats.rounds for c in outs)
            assert stats.rows.emitted >= sum(LENGTHS)
        eng.overlap = False


def test_refill_keeps_slots_busy(tgt):
    prompts = prompts_for(len(LENGTHS))
    eng = engine(tgt, "eagle")
    sp = SamplingParams(max_new_tokens=24)
    _, on = eng.generate(prompts, sp, None, stop_at, slots=4, refill=True)
    _, off = eng.generate(prompts, sp, None, stop_at, slots=4, refill=False)
    assert on.busy_slot_rounds == off.busy_slot_rounds  # the same row-rounds of work...
    assert on.target_passes < off.target_passes  # ...in fewer passes, as no slot waits for its batch's longest row
    assert on.occupancy > off.occupancy and on.occupancy >= 0.8, (on.occupancy, off.occupancy)
    assert on.slot_rounds >= on.busy_slot_rounds and off.slot_rounds > off.busy_slot_rounds  # idle slots counted
    _, one = eng.generate(prompts, sp, None, stop_at, slots=1)
    assert one.occupancy == 1.0
    eng.overlap = True  # each row's end is seen one launched round late: at most one idle round per row
    _, ahead = eng.generate(prompts, sp, None, stop_at, slots=1)
    assert ahead.busy_slot_rounds == one.busy_slot_rounds
    assert one.target_passes < ahead.target_passes <= one.target_passes + len(LENGTHS)


def test_refill_with_one_token_prompts_and_a_single_slot(tgt):
    prompts = [[17], [5, 9], [44], [3, 3, 3]]
    eng = engine(tgt, "eagle2")
    sp = SamplingParams(max_new_tokens=6)
    ref = [eng.generate([p], sp)[0][0].tokens for p in prompts]
    outs, _ = eng.generate(prompts, sp, slots=1)
    assert [c.tokens for c in outs] == ref


def test_refill_in_groups_waits_for_free_slots_and_changes_no_tokens(tgt):
    """refill_every=2 with 4 slots: a refill waits for 2 free slots (one prefill for both), except at the end."""
    prompts, seeds = prompts_for(len(LENGTHS)), list(range(len(LENGTHS)))
    eng = engine(tgt, "eagle2")
    sp = SamplingParams(max_new_tokens=24, temperature=0.8)
    ref = [c.tokens for c in eng.generate(prompts, sp, seeds, stop_at)[0]]
    _, each = eng.generate(prompts, sp, seeds, stop_at, slots=4)
    eng.refill_every = 2
    outs, grouped = eng.generate(prompts, sp, seeds, stop_at, slots=4)
    assert [c.tokens for c in outs] == ref
    assert grouped.busy_slot_rounds == each.busy_slot_rounds and grouped.occupancy <= each.occupancy
