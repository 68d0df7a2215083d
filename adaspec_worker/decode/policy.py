"""The cost-aware shape policy of the adaptive methods: which of a few pre-defined draft shapes a batch uses.

A CUDA graph has fixed shapes, so a round's cost is set by its shape (tree depth, node budget, width), not by
which nodes a row leaves empty. The policy therefore works at two levels:

  - per (batch bucket, sampling rule), once per generate() call: `ShapePolicy.choose` picks the shape of the
    method's menu (`menu`, the `none` shape included: back off to plain decoding, drafter idle) that
    maximises expected tokens per second = E[tokens per round | shape] / E[seconds per round | B, shape].
    E[tokens per round] is Thompson-sampled from a posterior per (rule, shape): a geometric prior from the
    spec's `accept_prior`, updated with the tokens the method's own rounds emitted (`RoundTally`).
    E[seconds per round] is what the method's own rounds of that shape took (the engine's phase clock, median
    over a call), and for a shape not yet run the cost model's `round_seconds` scaled by what the measured
    rounds took over what it predicted for them (`Timings`): the graphs timed by the cost model leave out a
    round's tree building, verification, commit and host work, which cost about as much again at batch 1.
    Nothing of the call's batch companions enters the choice (only B, the rule, the cost model and earlier
    calls), and with the lossless verification rules a row's text never depends on the shape anyway;
  - per row, inside the chosen shape: the method's own signal (LDLP length, entropy, beam mass) sets how
    deep that row's tree may go, and the row's node budget is spent on the best nodes within that depth
    (`ranked.grow_ranked`): a row predicted short drafts wide, a row predicted long drafts deep.

Knows nothing of models, drafters or verification: it reads a `cost.CostModel` and counts tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .cost import CostModel
from .sampling import SamplingParams

DEPTHS = (1, 2, 3, 4, 6, 8, 10, 12, 16)  # the depths a menu may offer (few shapes: few graphs)


@dataclass(frozen=True)
class Shape:
    """A round's draft shape: tree depth, node budget (root excluded) and width (top-k per level)."""

    depth: int
    nodes: int
    width: int

    @property
    def drafts(self) -> bool:
        return self.depth > 0


NO_DRAFT = Shape(0, 0, 0)


def menu(max_depth: int, width: int, nodes_per_level: int) -> list[Shape]:
    """`none`, then one shape per depth in DEPTHS up to max_depth with nodes_per_level x depth nodes (capped at
    the candidates a tree of that width and depth has)."""
    out = [NO_DRAFT]
    for d in DEPTHS:
        if d <= max_depth:
            out.append(Shape(d, min(nodes_per_level * d, width + (d - 1) * width * width), width))
    if max_depth not in DEPTHS and max_depth > 0:
        d = max_depth
        out.append(Shape(d, min(nodes_per_level * d, width + (d - 1) * width * width), width))
    return out


def round_seconds(cost: CostModel, B: int, shape: Shape) -> float:
    """One round of `shape` at batch B: the target pass over root + nodes, depth - 1 drafter levels of the
    shape's width, and the drafter's catch-up over the path (depth + 1 entries); `none` is the target pass."""
    if not shape.drafts:
        return cost.target(B, 1)
    return (
        cost.target(B, 1 + shape.nodes)
        + (shape.depth - 1) * cost.draft(B, shape.width)
        + cost.draft(B, shape.depth + 1)
    )


def prior_tokens(shape: Shape, accept: float) -> float:
    """Prior tokens per round: each level accepted with probability a, a rising with the nodes per level
    (at least one of them right), a geometric chain over the depth, plus the bonus token."""
    if not shape.drafts:
        return 1.0
    per_level = max(shape.nodes / shape.depth, 1.0)
    a = 1 - (1 - accept) ** per_level
    return 1.0 + sum(a**d for d in range(1, shape.depth + 1))


def rule_key(sampling: SamplingParams) -> tuple:
    """What of the sampling settings changes acceptance: greedy, or the temperature / top-k / top-p."""
    return ("greedy",) if sampling.greedy else (sampling.temperature, sampling.top_k, sampling.top_p)


@dataclass
class Posterior:
    """Tokens per round of one (rule, shape): prior pseudo-rounds plus the observed rounds."""

    prior_mean: float
    prior_rounds: float = 4.0
    rounds: float = 0.0
    tokens: float = 0.0
    squares: float = 0.0

    @property
    def mean(self) -> float:
        return (self.prior_rounds * self.prior_mean + self.tokens) / (self.prior_rounds + self.rounds)

    @property
    def sd(self) -> float:
        """Standard error of the mean: the observed spread (prior spread 1 token) over the rounds seen."""
        var = 1.0
        if self.rounds > 1:
            var = max(self.squares / self.rounds - (self.tokens / self.rounds) ** 2, 0.05)
        return math.sqrt(var / (self.prior_rounds + self.rounds))


class Timings:
    """Measured seconds per round by (batch bucket, rule, shape): the median of each call's rounds, averaged over
    calls; and for shapes not yet run, the cost model's prediction scaled by the measured / predicted ratio of
    the shapes that were (at the same batch bucket if any ran there, else at any)."""

    def __init__(self):
        self.seen: dict[tuple, list[float]] = {}  # (B, rule, shape) -> per-call medians
        self.ratios: dict[int, list[float]] = {}  # B -> measured / predicted, per call

    def add(self, B: int, rule: tuple, shape: Shape, seconds: float, predicted: float) -> None:
        self.seen.setdefault((B, rule, shape), []).append(seconds)
        self.ratios.setdefault(B, []).append(seconds / predicted)

    def seconds(self, B: int, rule: tuple, shape: Shape, predicted: float) -> float:
        own = self.seen.get((B, rule, shape))
        if own:
            return sum(own) / len(own)
        near = self.ratios.get(B) or [r for rs in self.ratios.values() for r in rs]
        return predicted * (sum(near) / len(near) if near else 1.0)


class ShapePolicy:
    """Thompson sampling over a menu of shapes, scored by tokens per second under a cost model."""

    def __init__(self, shapes: list[Shape], accept_prior: float, cost: CostModel | None = None, seed: int = 0):
        self.shapes = shapes
        self.accept_prior = accept_prior
        self.cost = cost or CostModel.nominal()
        self.rng = random.Random(seed)  # the choice is a function of the calls seen, never of wall time
        self.posteriors: dict[tuple, Posterior] = {}
        self.timings = Timings()  # what rounds measured (kept only with a measured cost model: see `timed`)
        self.last: dict = {}  # the last choice and its evidence (for stats and tests)

    def posterior(self, rule: tuple, shape: Shape) -> Posterior:
        key = (rule, shape)
        if key not in self.posteriors:
            accept = self.accept_prior if rule == ("greedy",) else 0.8 * self.accept_prior
            self.posteriors[key] = Posterior(prior_tokens(shape, accept))
        return self.posteriors[key]

    def seconds(self, B: int, rule: tuple, shape: Shape) -> float:
        """Expected seconds of one round of `shape` at batch B (measured, or the cost model's, calibrated)."""
        return self.timings.seconds(B, rule, shape, round_seconds(self.cost, B, shape))

    def expected_rate(self, B: int, rule: tuple, shape: Shape) -> float:
        """Posterior-mean tokens per second (per row) of `shape` at batch B."""
        return self.posterior(rule, shape).mean / self.seconds(B, rule, shape)

    def timed(self, B: int, rule: tuple, shape: Shape, seconds: float) -> None:
        """A call's median round of `shape` at batch B took `seconds`. Kept only when the cost model was measured
        (the nominal stand-in's units are not seconds), so CPU tests without one choose as before."""
        if self.cost.measured and seconds > 0:
            self.timings.add(B, rule, shape, seconds, round_seconds(self.cost, B, shape))

    def choose(self, B: int, sampling: SamplingParams) -> Shape:
        rule = rule_key(sampling)
        draws = {}
        for shape in self.shapes:
            post = self.posterior(rule, shape)
            tokens = post.mean if not shape.drafts else max(self.rng.gauss(post.mean, post.sd), 1.0)
            draws[shape] = tokens / self.seconds(B, rule, shape)
        best = max(self.shapes, key=lambda s: draws[s])
        self.last = {
            "batch": B,
            "rule": list(rule),
            "shape": vars(best).copy(),
            "expected_tokens_per_round": self.posterior(rule, best).mean,
            "expected_round_seconds": self.seconds(B, rule, best),
            "measured_shapes": sum(1 for b, r, _ in self.timings.seen if (b, r) == (B, rule)),
        }
        return best

    def update(self, rule: tuple, shape: Shape, rounds: float, tokens: float, squares: float) -> None:
        post = self.posterior(rule, shape)
        post.rounds += rounds
        post.tokens += tokens
        post.squares += squares


class RoundTally:
    """The rounds of one generate() call, counted on the host as they land (`Budgeted.landed`), handed to the policy
    at the next begin(): tokens and seconds by the shape each round ran (a call's rounds may change shape)."""

    def __init__(self):
        self.rule: tuple | None = None  # the call's sampling rule; None: no call pending
        self.evidence = True  # False: the call's shape was forced (warm-up), its tokens say nothing of acceptance
        self.B = 0  # the batch bucket the call began at
        self.tokens: dict[Shape, list[float]] = {}  # shape -> [row-rounds, tokens emitted, squares]
        self.seconds: dict[tuple[int, Shape], list[float]] = {}  # (batch bucket, shape) -> landed rounds' seconds

    def start(self, rule: tuple, evidence: bool = True, B: int = 0) -> None:
        """A call begins at batch bucket B; a forced call (`evidence` False) is timed at B only (its dummy rows drain
        through smaller sizes in a few rounds each)."""
        self.rule, self.evidence, self.B = rule, evidence, B
        self.tokens, self.seconds = {}, {}

    def add(self, shape: Shape, emitted: list[int]) -> None:
        """A landed round of `shape`: the tokens each row in it emitted."""
        sums = self.tokens.setdefault(shape, [0.0, 0.0, 0.0])
        sums[0] += len(emitted)
        sums[1] += sum(emitted)
        sums[2] += sum(e * e for e in emitted)

    def time(self, B: int, seconds: float, shape: Shape) -> None:
        """A landed round's seconds at batch bucket B, of `shape`."""
        if self.rule is not None and (self.evidence or B == self.B):
            self.seconds.setdefault((B, shape), []).append(seconds)

    def flush(self, policy: ShapePolicy) -> None:
        """Hand the last call's counts (unless forced) and round times to the policy (once per generate()). Times go
        as the median per batch bucket and shape: a call's first rounds of a shape compile and capture."""
        if self.rule is not None:
            if self.evidence:
                for shape, (rounds, tokens, squares) in self.tokens.items():
                    if rounds > 0:
                        policy.update(self.rule, shape, rounds, tokens, squares)
            for (B, shape), times in self.seconds.items():
                policy.timed(B, self.rule, shape, sorted(times)[len(times) // 2])
        self.rule, self.tokens, self.seconds = None, {}, {}
