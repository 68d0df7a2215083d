"""The per-round depth choice (decode/depth_policy.py): what it counts from landed rounds and what it then picks."""
from __future__ import annotations

import pytest

from adaspec_worker.decode.depth_policy import FRESH, DepthPolicy
from adaspec_worker.decode.policy import menu
from adaspec_worker.decode.stats import RowOutcome

SHAPES = menu(8, 4, 4)  # none, depths 1, 2, 3, 4, 6, 8


def outcome(accepted: int, depth: int) -> RowOutcome:
    return RowOutcome(n_accepted=accepted, n_drafted=4 * depth, draft_depth=depth, tokens=[7] * (accepted + 1),
                      plan=None)


def linear_cost(base: float = 4.0, per_level: float = 1.0):
    return lambda shape: base + per_level * shape.depth


def test_levels_past_a_rounds_tree_or_its_first_rejection_are_not_counted():
    p = DepthPolicy(SHAPES, prior=0.8)
    p.observe([0], [outcome(2, 4)])  # levels 1, 2 accepted, 3 rejected, 4 never reached
    assert p.offered[FRESH] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert p.taken[FRESH] == [1, 1, 0, 0, 0, 0, 0, 0]
    c = p.context(2, 4)
    p.observe([0], [outcome(3, 3)])  # the same row: its whole tree of 3 taken, nothing said of level 4
    assert p.offered[c] == [1, 1, 1, 0, 0, 0, 0, 0] and p.taken[c] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert p.slots == {0: (0, [p.context(3, 3)])} and p.context(3, 3) != p.context(3, 4)


def test_expected_tokens_follow_the_counted_acceptance_and_shrink_to_the_prior_where_unseen():
    p = DepthPolicy(SHAPES, prior=0.5, strength=1e-9)  # (almost) no prior where there are counts
    for _ in range(100):
        p.observe([0, 1], [outcome(1, 2), outcome(2, 2)])  # level 1 always, level 2 half the time
        p.slots = {}  # every round a fresh row's
    tokens = p.expected_tokens(FRESH, p.pooled())
    assert tokens[:3] == pytest.approx([1.0, 2.0, 2.5])
    assert tokens[3] == pytest.approx(2.5 + 0.5 * 0.5)  # level 3 never offered: the prior's 0.5


def test_a_slot_given_to_another_row_starts_fresh():
    p = DepthPolicy(SHAPES, prior=0.8)
    p.observe([5], [outcome(4, 4)])
    p.observe([6], [outcome(0, 4)])  # row 6 took the slot: its round counts under FRESH, not row 5's context
    assert p.offered[FRESH][0] == 2 and p.offered[p.context(4, 4)][0] == 0
    p.observe([-1], [outcome(0, 4)])  # a frozen slot says nothing
    assert p.slots == {} and p.choose(linear_cost()) is None


def markov_rounds(p: DepthPolicy, rounds: int, lag: int = 1) -> list[int]:
    """A row in an easy stretch accepts its whole tree, in a hard one nothing; stretches last 10 rounds. A choice
    sets the round `lag` rounds later (the rounds in between are already queued). [rounds] each round's depth."""
    depths = [p.shapes[-1].depth] * lag
    for i in range(rounds):
        easy = (i // 10) % 2 == 0
        p.observe([0], [outcome(depths[i] if easy else 0, depths[i])], lag)
        depths.append(p.choose(linear_cost()).depth)
    return depths[:rounds]


@pytest.mark.parametrize("lag", [1, 2])
def test_deep_in_an_easy_stretch_shallow_in_a_hard_one(lag):
    p = DepthPolicy(SHAPES, prior=0.8)
    depths = markov_rounds(p, 400, lag)
    inside = [i for i in range(200, 400) if i % 10 >= lag]  # rounds chosen from a round of the same stretch
    easy = [depths[i] for i in inside if (i // 10) % 2 == 0]
    hard = [depths[i] for i in inside if (i // 10) % 2 == 1]
    assert min(easy) == 8 and max(hard) == 1, (easy, hard)


def test_without_contexts_the_choice_cannot_tell_stretches_apart(monkeypatch):
    """The check above fails when the context is ignored (every round counted as a fresh row's)."""
    p = DepthPolicy(SHAPES, prior=0.8)
    monkeypatch.setattr(p, "context", lambda accepted, depth: FRESH)
    depths = markov_rounds(p, 400)[200:]
    assert len(set(depths)) == 1


def test_with_a_lag_the_counts_pair_a_round_with_the_context_its_shape_was_chosen_from():
    p = DepthPolicy(SHAPES, prior=0.8)
    p.observe([0], [outcome(4, 4)], lag=2)  # round 1: fresh
    p.observe([0], [outcome(0, 4)], lag=2)  # round 2: queued before round 1 landed, so chosen fresh too
    assert p.offered[FRESH][0] == 2
    p.observe([0], [outcome(1, 4)], lag=2)  # round 3: chosen when round 1 (all 4 taken) landed
    assert p.offered[p.context(4, 4)][:2] == [1, 1] and p.offered[p.context(0, 4)] == [0] * 8


def test_the_batch_chooses_for_its_rows_mean():
    p = DepthPolicy(SHAPES, prior=0.8)
    for _ in range(50):  # slot 0 always takes everything, slot 1 nothing
        p.observe([0, 1], [outcome(8, 8), outcome(0, 8)])
    alone = DepthPolicy(SHAPES, prior=0.8)
    for _ in range(50):
        alone.observe([0], [outcome(8, 8)])
    levels = linear_cost(base=4.0, per_level=3.0)  # depth pays for a row that takes all, not for half of one
    assert alone.choose(levels).depth == 8
    assert p.choose(levels).depth == 1
