"""Speculative methods as the manifest names them: typed parameters, defaults, sources, what each needs.

Torch-free on purpose: the controller (`jobs/`) validates `speculative.method` and `speculative.params`
with this module alone, and the decoder (`adaspec_worker.decode`) receives the parsed spec object,
never the (name, params) pair. One registry, `METHOD_SPECS` (`method_spec.py`, with the parser), maps a
manifest name to its spec class; the decoder keys its proposers by that class (`@implements(Eagle2Spec)`),
and a test asserts that every spec class has exactly one proposer. Adding a method = one spec here (or in
`specs_drafting.py`: drafting without a trained EAGLE head, from the job's own text, or by early exit;
re-exported here) + one proposer class.

Each spec class declares, as class attributes (not parameters):
  - `needs`: the `model.*` paths the method needs and what kind each must be, e.g.
    `{"draft": "eagle", "ldlp": "ldlp"}` (`draft` kinds: "eagle" head, independent "draft-model",
    or "early-exit" head);
  - `autotune_grid`: the settings per-job autotune measures, each merged over the given parameters.
  - `since_hash`: parameters added after the method shipped, with their defaults: at the default they stay
    out of the config hash (`method_spec.hashed_params`), so outputs written before them still resume.
"""

from __future__ import annotations

from .method_spec import (
    METHOD_SPECS,
    MethodSpec,
    SpecError,
    _non_negative,
    _positive,
    autotune_candidates,
    hashed_params,
    method,
    parse_spec,
)
from .specs_drafting import EagleThompsonSpec, EESDSpec, RASDSpec, RetrievalSpec, TokenRecyclingSpec


@method("none")
class NoneSpec(MethodSpec):
    """Plain autoregressive decoding: the baseline every speedup is measured against."""


@method("eagle")
class EagleSpec(MethodSpec):
    """EAGLE-1 chain (Li et al., 2024): the head drafts k tokens greedily; verified as a chain."""

    k: int = 5
    needs = {"draft": "eagle"}
    autotune_grid = ({"k": 2}, {"k": 3}, {"k": 4}, {"k": 6})

    def check(self):
        _positive("k", self.k)


@method("eagle-tree")
class EagleTreeSpec(MethodSpec):
    """EAGLE-1 static tree: fixed paths of child ranks (default: an 18-node tree of depth 5)."""

    tree: tuple[tuple[int, ...], ...] = ()  # paths such as [[0], [1], [0, 0]]; empty = the default tree
    needs = {"draft": "eagle"}

    def check(self):
        for p in self.tree:
            if not isinstance(p, (list, tuple)) or not p or not all(isinstance(r, int) and r >= 0 for r in p):
                raise SpecError(f"tree: each path must be a non-empty list of ranks >= 0, got {p!r}")


@method("eagle2")
class Eagle2Spec(MethodSpec):
    """EAGLE-2 dynamic tree (Li et al., 2024): top_k expansion per level, global rerank to total_tokens."""

    top_k: int = 10
    depth: int = 6
    total_tokens: int = 60
    needs = {"draft": "eagle"}
    autotune_grid = (
        {"depth": 4, "total_tokens": 30},
        {"depth": 6, "total_tokens": 60},
        {"depth": 8, "total_tokens": 80},
        {"depth": 5, "total_tokens": 40},
    )

    def check(self):
        for n in ("top_k", "depth", "total_tokens"):
            _positive(n, getattr(self, n))


@method("draft-model")
class DraftModelSpec(MethodSpec):
    """Classic speculative decoding with an independent draft model (Leviathan et al., 2023): a chain of k."""

    k: int = 4
    needs = {"draft": "draft-model"}
    autotune_grid = ({"k": 2}, {"k": 4}, {"k": 6})

    def check(self):
        _positive("k", self.k)


# ---------------------------------------------------------------- adaptive methods


@method("adaeagle")
class AdaEagleSpec(MethodSpec):
    """AdaEAGLE (Zhang et al., 2024): a chain whose length is LDLP's prediction each round (may be 0).
    k_max 0 = the LDLP artifact's own k_max."""

    k_max: int = 0
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = ({"k_max": 4}, {"k_max": 6}, {"k_max": 10})

    def check(self):
        _non_negative("k_max", self.k_max)


@method("adaeagle-ddd")
class AdaEagleDDDSpec(MethodSpec):
    """AdaEAGLE-DDD (Zhang et al., 2024): LDLP's length plus the cumulative draft log-probability
    threshold; drafting stops only when both say stop (bounded by k_max)."""

    threshold: float = -0.6
    k_max: int = 0
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = ({"threshold": -0.3}, {"threshold": -0.6}, {"threshold": -1.0})

    def check(self):
        _non_negative("k_max", self.k_max)


@method("adaedl")
class AdaEDLSpec(MethodSpec):
    """AdaEDL (Agrawal et al., 2024): stop drafting when 1 - sqrt(gamma * H) < lambda, H the draft's
    (untempered) entropy in nats. The bound and gamma = 0.2 are the paper's; adapting lambda each round
    (EMA of the acceptance rate with beta1, lambda +/- eps against the target rate alpha, then
    lambda <- 0.9 lambda + 0.1 lambda') follows later re-implementations; lam0 and k_max are ours."""

    gamma: float = 0.2
    lam0: float = 0.7
    beta1: float = 0.5
    alpha: float = 0.9
    eps: float = 0.01
    k_max: int = 8
    needs = {"draft": "eagle"}
    autotune_grid = ({"lam0": 0.5}, {"lam0": 0.7}, {"lam0": 0.85})

    def check(self):
        _positive("k_max", self.k_max)
        if not (self.gamma > 0 and 0 <= self.beta1 <= 1 and 0 < self.alpha <= 1 and self.eps >= 0):
            raise SpecError("gamma must be > 0, beta1 in [0, 1], alpha in (0, 1], eps >= 0")


@method("ddd")
class DDDSpec(MethodSpec):
    """Dynamic Depth Decoding (Brown et al., 2024): EAGLE-2 beams, continue while log(sum of the beams'
    probabilities) stays above `threshold`, checked only at `check_depths` (one host sync each)."""

    top_k: int = 8
    max_depth: int = 10
    total_tokens: int = 60
    threshold: float = -1.5
    check_depths: tuple[int, ...] = (3, 5, 7)
    needs = {"draft": "eagle"}
    autotune_grid = ({"threshold": -1.0}, {"threshold": -1.5}, {"threshold": -2.5})

    def check(self):
        for n in ("top_k", "max_depth", "total_tokens"):
            _positive(n, getattr(self, n))
        if not all(d >= 1 for d in self.check_depths):
            raise SpecError(f"check_depths must be a list of depths >= 1, got {list(self.check_depths)!r}")


@method("opt-tree")
class OptTreeSpec(MethodSpec):
    """OPT-Tree (Wang et al., 2024), level-wise: keep the globally best n nodes per level by path
    probability; stop when the expected acceptance length E = sum of path probabilities grows by
    less than delta (checked per level)."""

    n: int = 8
    max_depth: int = 10
    delta: float = 0.2
    needs = {"draft": "eagle"}
    autotune_grid = ({"delta": 0.1}, {"delta": 0.2}, {"delta": 0.4})

    def check(self):
        _positive("n", self.n)
        _positive("max_depth", self.max_depth)
        if self.delta < 0:
            raise SpecError(f"delta must be >= 0, got {self.delta}")


@method("ldlp-tree")
class LDLPTreeSpec(MethodSpec):
    """Ours: LDLP's predicted length sets the EAGLE-2 tree depth each round (depth = prediction + 1,
    within [min_depth, max_depth]) and the node budget scales with it (nodes_per_level x depth)."""

    top_k: int = 8
    nodes_per_level: int = 10
    min_depth: int = 1
    max_depth: int = 8
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = (
        {"nodes_per_level": 6, "max_depth": 6},
        {"nodes_per_level": 10, "max_depth": 8},
        {"nodes_per_level": 4, "max_depth": 6},
    )

    def check(self):
        for n in ("top_k", "nodes_per_level", "min_depth", "max_depth"):
            _positive(n, getattr(self, n))
        if self.max_depth < self.min_depth:
            raise SpecError(f"max_depth ({self.max_depth}) must be >= min_depth ({self.min_depth})")


@method("oracle")
class OracleSpec(MethodSpec):
    """Benchmark-only ceiling: each round drafts the ideal chain length, read off the target's own
    greedy continuation computed ahead (greedy decoding only)."""

    k_max: int = 10
    needs = {"draft": "eagle"}

    def check(self):
        _positive("k_max", self.k_max)


__all__ = [
    "METHOD_SPECS",
    "EESDSpec",
    "EagleThompsonSpec",
    "MethodSpec",
    "RASDSpec",
    "RetrievalSpec",
    "SpecError",
    "TokenRecyclingSpec",
    "autotune_candidates",
    "hashed_params",
    "method",
    "parse_spec",
]
