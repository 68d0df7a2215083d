"""Each round's draft depth, chosen on the host between rounds from how the rows' last rounds went.

`policy.ShapePolicy` decides once per generate() call whether a batch drafts at all and which menu shape it
starts with. While it drafts, `DepthPolicy` picks every next round's shape among the menu's drafting shapes
(each its own captured graphs, so the choice costs no capture) from what the landed rounds said:

  - a row's *context* is how its last landed round went: the tokens it accepted, and whether that was its whole
    tree (a row that took all it was offered is in an easy stretch; one that stopped early, in a hard one), or
    `FRESH` for a row's first round. With overlapped rounds the next round is already queued when a round lands,
    so a choice made then sets the round after it (`lag` 2): the counts pair each round with the context its
    shape was chosen from (the row's round `lag` rounds before it);
  - per context c and level i, h[c, i] = P(level i of the row's tree is accepted | level i - 1 was), counted from
    every landed round that offered level i to a row whose level i - 1 was accepted. Rounds cut short by their
    tree's depth say nothing past it (Kaplan-Meier). Each context's counts shrink to the pooled counts of all
    contexts, and those to an optimistic prior, so a depth not yet drafted gets tried;
  - a row in context c expects 1 + sum_{i <= d} prod_{j <= i} h[c, j] tokens from a tree of depth d; the batch,
    the mean over its rows. The chosen shape maximises that over the shape's expected seconds per round (the
    call-level policy's: measured rounds of that shape, else the calibrated cost model).

The choice never changes a row's text (verification is lossless whatever the tree), and is a function
of the landed outcomes and measured times only.

Knows nothing of models, drafters or trees: it reads `stats.RowOutcome`s and prices shapes through a callable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .policy import Shape
from .stats import RowOutcome

FRESH = 0  # the context of a row's first round


class DepthPolicy:
    """Per-round shape choice among `shapes` (drafting shapes of one menu) from the rows' acceptance history."""

    def __init__(self, shapes: list[Shape], prior: float, strength: float = 2.0):
        self.shapes = [s for s in shapes if s.drafts]
        assert self.shapes, "DepthPolicy needs at least one drafting shape"
        assert 0.0 < prior < 1.0, f"prior must be in (0, 1), got {prior}"
        self.D = max(s.depth for s in self.shapes)
        self.prior, self.strength = prior, strength
        contexts = 1 + 2 * (self.D + 1)  # FRESH, then (accepted a in 0..D) x (took its whole tree or not)
        self.offered = [[0] * self.D for _ in range(contexts)]  # [C][D] rounds offering level i + 1 after level i
        self.taken = [[0] * self.D for _ in range(contexts)]  # [C][D] of those, rounds that accepted level i + 1
        self.all_offered, self.all_taken = [0] * self.D, [0] * self.D  # [D] the same summed over contexts
        self.slots: dict[int, tuple[int, list[int]]] = {}  # slot -> (its row, its last contexts, newest first)
        self.chosen: Counter[int] = Counter()  # rounds chosen per depth (for stats)

    def context(self, accepted: int, depth: int) -> int:
        return 1 + 2 * min(accepted, self.D) + int(depth > 0 and accepted >= depth)

    def observe(self, origin: list[int], outcomes: list[RowOutcome], lag: int = 1) -> None:
        """A landed round: origin [B] the row per slot (-1: none decoding), outcomes [B] what each slot did; the next
        round launched is `lag` rounds after this one."""
        assert lag >= 1, f"lag must be >= 1, got {lag}"
        seen = {}
        for slot, (row, out) in enumerate(zip(origin, outcomes)):
            if row < 0:  # padding, or a row frozen in its slot
                continue
            was_row, history = self.slots.get(slot, (-1, []))
            history = history if was_row == row else []
            c = history[lag - 1] if len(history) >= lag else FRESH  # what this round's shape was chosen from
            d = min(out.draft_depth, self.D)
            offered, taken = self.offered[c], self.taken[c]
            for i in range(min(d, out.n_accepted + 1)):  # level i + 1 offered, level i accepted
                offered[i] += 1
                self.all_offered[i] += 1
                if i < out.n_accepted:
                    taken[i] += 1
                    self.all_taken[i] += 1
            seen[slot] = (row, [self.context(out.n_accepted, out.draft_depth), *history[: lag - 1]])
        self.slots = seen

    def pooled(self) -> list[float]:
        """[D] h over all contexts, shrunk to the prior."""
        m = self.strength
        return [(t + m * self.prior) / (o + m) for t, o in zip(self.all_taken, self.all_offered)]

    def expected_tokens(self, c: int, pooled: list[float]) -> list[float]:
        """[D + 1] tokens per round a row in context c expects from a tree of depth d (entry d)."""
        m, out, survive = self.strength, [1.0], 1.0
        for i in range(self.D):
            survive *= (self.taken[c][i] + m * pooled[i]) / (self.offered[c][i] + m)  # P(levels 1..i + 1 accepted)
            out.append(out[-1] + survive)
        return out

    def choose(self, seconds: Callable[[Shape], float]) -> Shape | None:
        """The shape for the next round to launch, for the rows of the last landed round; None when none is live.
        `seconds(shape)` prices a round of that shape at the batch's size."""
        if not self.slots:
            return None
        counts = Counter(history[0] for _, history in self.slots.values())
        pooled = self.pooled()
        per_context = {c: self.expected_tokens(c, pooled) for c in counts}
        n = sum(counts.values())
        tokens = [sum(k * per_context[c][d] for c, k in counts.items()) / n for d in range(self.D + 1)]  # batch mean
        best = max(self.shapes, key=lambda s: tokens[s.depth] / seconds(s))
        self.chosen[best.depth] += 1
        return best

    def forget_slots(self) -> None:
        """A new batch: no slot's row is known."""
        self.slots = {}
