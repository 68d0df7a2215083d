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


class AdaptiveSpec(MethodSpec):
    """Shared by the adaptive methods (ours): each generate() call drafts one shape of the method's menu (depths
    1, 2, 3, 4, 6, 8, ... up to its bound, nodes_per_level x depth nodes, or none), the one with the most expected
    tokens per second under the measured cost model (Thompson sampling, prior: each level accepted with
    probability accept_prior, greedy); per row, the method's signal sets the depth and the row's nodes go
    to its best candidates within it. Where speculation does not pay the call backs off to plain decoding."""

    since_hash = {"accept_prior": 0.6}  # at these values: the config hash of outputs written before

    def check(self):
        if not 0 < self.accept_prior < 1:
            raise SpecError(f"accept_prior must be in (0, 1), got {self.accept_prior}")
        for n in ("top_k", "nodes_per_level", "n", "max_depth", "total_tokens", "min_depth"):
            if hasattr(self, n):
                _positive(n, getattr(self, n))
        _non_negative("k_max", getattr(self, "k_max", 0))


@method("adaeagle")
class AdaEagleSpec(AdaptiveSpec):
    """AdaEAGLE (Zhang et al., 2024): LDLP's predicted accepted length sets each row's draft depth (at least 1).
    k_max 0 = the LDLP artifact's own k_max. Ours: top_k > 1 spends a short row's budget on width."""

    k_max: int = 0
    top_k: int = 2
    nodes_per_level: int = 2
    accept_prior: float = 0.6
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = ({"k_max": 4}, {"k_max": 6}, {"k_max": 10})
    since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}


@method("adaeagle-ddd")
class AdaEagleDDDSpec(AdaptiveSpec):
    """AdaEAGLE-DDD (Zhang et al., 2024): LDLP's length, or deeper while the best path's cumulative draft
    log-probability stays above the threshold; a row stops only when both say stop (bounded by k_max)."""

    threshold: float = -0.6
    k_max: int = 0
    top_k: int = 2
    nodes_per_level: int = 2
    accept_prior: float = 0.6
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = ({"threshold": -0.3}, {"threshold": -0.6}, {"threshold": -1.0})
    since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}


@method("adaedl")
class AdaEDLSpec(AdaptiveSpec):
    """AdaEDL (Agrawal et al., 2024): a row stops drafting when 1 - sqrt(gamma * H) < lambda, H the draft's
    (untempered) entropy in nats along its best path. The bound and gamma = 0.2 are the paper's; adapting
    lambda each round per row (EMA of the acceptance rate with beta1, lambda +/- eps against the target rate
    alpha, then lambda <- 0.9 lambda + 0.1 lambda') follows later re-implementations; lam0, k_max, top_k ours."""

    gamma: float = 0.2
    lam0: float = 0.7
    beta1: float = 0.5
    alpha: float = 0.9
    eps: float = 0.01
    k_max: int = 8
    top_k: int = 2
    nodes_per_level: int = 2
    accept_prior: float = 0.6
    needs = {"draft": "eagle"}
    autotune_grid = ({"lam0": 0.5}, {"lam0": 0.7}, {"lam0": 0.85})
    since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}

    def check(self):
        super().check()
        _positive("k_max", self.k_max)
        if not (self.gamma > 0 and 0 <= self.beta1 <= 1 and 0 < self.alpha <= 1 and self.eps >= 0):
            raise SpecError("gamma must be > 0, beta1 in [0, 1], alpha in (0, 1], eps >= 0")


@method("ddd")
class DDDSpec(AdaptiveSpec):
    """Dynamic Depth Decoding (Brown et al., 2024): EAGLE-2 beams; a row stops at the first of `check_depths`
    where log(sum of its beams' probabilities) falls below `threshold`. Checked on the device, per row (the
    paper's host checks are gone); total_tokens / max_depth nodes per level of depth."""

    top_k: int = 8
    max_depth: int = 10
    total_tokens: int = 60
    threshold: float = -1.5
    check_depths: tuple[int, ...] = (3, 5, 7)
    accept_prior: float = 0.6
    needs = {"draft": "eagle"}
    autotune_grid = ({"threshold": -1.0}, {"threshold": -1.5}, {"threshold": -2.5})

    def check(self):
        super().check()
        if not all(d >= 1 for d in self.check_depths):
            raise SpecError(f"check_depths must be a list of depths >= 1, got {list(self.check_depths)!r}")


@method("opt-tree")
class OptTreeSpec(AdaptiveSpec):
    """OPT-Tree (Wang et al., 2024): the tree maximising E = sum of path probabilities for its node budget
    (n per level of depth: EAGLE-2's rerank by path probability); a row stops at the first level whose
    frontier adds less than delta to E (checked on the device, per row)."""

    n: int = 8
    max_depth: int = 10
    delta: float = 0.2
    accept_prior: float = 0.6
    needs = {"draft": "eagle"}
    autotune_grid = ({"delta": 0.1}, {"delta": 0.2}, {"delta": 0.4})

    def check(self):
        super().check()
        if self.delta < 0:
            raise SpecError(f"delta must be >= 0, got {self.delta}")


@method("ldlp-tree")
class LDLPTreeSpec(AdaptiveSpec):
    """Ours: LDLP's predicted length + 1 sets each row's EAGLE-2 tree depth (within [min_depth, max_depth]);
    nodes_per_level x depth nodes."""

    top_k: int = 8
    nodes_per_level: int = 10
    min_depth: int = 1
    max_depth: int = 8
    accept_prior: float = 0.6
    needs = {"draft": "eagle", "ldlp": "ldlp"}
    autotune_grid = (
        {"nodes_per_level": 6, "max_depth": 6},
        {"nodes_per_level": 10, "max_depth": 8},
        {"nodes_per_level": 4, "max_depth": 6},
    )

    def check(self):
        super().check()
        if self.max_depth < self.min_depth:
            raise SpecError(f"max_depth ({self.max_depth}) must be >= min_depth ({self.min_depth})")


@method("oracle")
class OracleSpec(MethodSpec):
    """Benchmark-only ceiling: each round the target verifies the largest tree (EAGLE-2, top_k x k_max levels,
    total_tokens nodes, 0 = every candidate) out of the timer; the round is then charged a chain of the
    accepted path only. Greedy or sampled."""

    k_max: int = 10
    top_k: int = 8
    total_tokens: int = 0
    needs = {"draft": "eagle"}
    since_hash = {"top_k": 8, "total_tokens": 0}

    def check(self):
        _positive("k_max", self.k_max)
        _positive("top_k", self.top_k)
        _non_negative("total_tokens", self.total_tokens)


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
