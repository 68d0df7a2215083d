"""Speculative methods as the manifest names them: typed parameters, defaults, sources, what each needs.

Torch-free on purpose: the controller (`jobs/`) validates `speculative.method` and `speculative.params`
with this module alone, and the decoder (`adaspec_worker.decode`) receives the parsed spec object,
never the (name, params) pair. One registry, `METHOD_SPECS`, maps a manifest name to its spec
class; the decoder keys its proposers by that class (`@implements(Eagle2Spec)`), and a test asserts
that every spec class has exactly one proposer. Adding a method = one spec here + one proposer class.

Each spec class declares, as class attributes (not parameters):
  - `needs`: the `model.*` paths the method needs and what kind each must be, e.g.
    `{"draft": "eagle", "ldlp": "ldlp"}` (`draft` kinds: "eagle" head or independent "draft-model");
  - `autotune_grid`: the settings per-job autotune measures, each merged over the given parameters.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

METHOD_SPECS: dict[str, type[MethodSpec]] = {}


class SpecError(ValueError):
    """Bad method name or parameter; the message names it."""


class MethodSpec:
    """Base of every method spec (each subclass is a frozen dataclass made by `@method`)."""

    name: ClassVar[str]
    needs: ClassVar[dict[str, str]] = {}
    added_since_hash: ClassVar[dict] = {}  # parameters added after outputs were written -> their defaults
    autotune_grid: ClassVar[tuple[dict, ...]] = ()

    def check(self) -> None:
        """Raise SpecError naming a bad parameter (types are checked before this runs)."""

    @property
    def drafter_kind(self) -> str | None:
        return self.needs.get("draft")

    def params(self) -> dict:
        """Every parameter with its resolved value: what job.json records."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def with_params(self, **changes) -> MethodSpec:
        return parse_spec(self.name, {**self.params(), **changes})


def method(name: str):
    """Register a spec class under its manifest name (and make it a frozen dataclass)."""

    def deco(cls):
        assert issubclass(cls, MethodSpec), f"{cls.__name__} must derive from MethodSpec"
        assert name not in METHOD_SPECS, f"method {name!r} registered twice"
        cls.name = name
        METHOD_SPECS[name] = cls
        return dataclass(frozen=True)(cls)

    return deco


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

    added_since_hash = {"accept_prior": 0.6}  # at these values: the config hash of outputs written before

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
    added_since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}


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
    added_since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}


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
    added_since_hash = {"accept_prior": 0.6, "top_k": 2, "nodes_per_level": 2}

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
    added_since_hash = {"top_k": 8, "total_tokens": 0}

    def check(self):
        _positive("k_max", self.k_max)
        _positive("top_k", self.top_k)
        _non_negative("total_tokens", self.total_tokens)


# ---------------------------------------------------------------- training-free drafting


@method("token-recycling")
class TokenRecyclingSpec(MethodSpec):
    """Token Recycling (Luo et al., 2024, arXiv 2408.08696): a token-indexed adjacency matrix [V, k] holds,
    for each token, the target's top-k next tokens the last time it was seen (at any node of any verified
    tree: rejected candidates are recycled too); each round drafts a static tree from the root by
    breadth-first lookup through the matrix and writes the round's new top-k back. No drafter, no
    training; the matrix lives per engine (actor) and stays warm across rows and shards; k = 8 as in the
    paper. Ours: the default template is the `nodes` most likely paths (depth <= max_depth) under a fixed
    per-rank acceptance prior (the paper hand-designs an ~80-node tree); `tree` (paths of child ranks,
    each rank < k) overrides it; on a token seen at several nodes of one round, the accepted path wins,
    then the later row, then the later node, so the matrix is deterministic."""

    k: int = 8
    nodes: int = 64
    max_depth: int = 8
    tree: tuple[tuple[int, ...], ...] = ()
    autotune_grid = ({"nodes": 24}, {"nodes": 40}, {"nodes": 80})

    def check(self):
        for n in ("k", "nodes", "max_depth"):
            _positive(n, getattr(self, n))
        for p in self.tree:
            if not isinstance(p, (list, tuple)) or not p or not all(isinstance(r, int) and 0 <= r < self.k for r in p):
                raise SpecError(f"tree: each path must be a non-empty list of ranks in [0, k), got {p!r}")
            if len(p) > 1 and tuple(p[:-1]) not in {tuple(q) for q in self.tree}:
                raise SpecError(f"tree: path {list(p)!r} lacks its parent {list(p[:-1])!r}")


@method("retrieval")
class RetrievalSpec(MethodSpec):
    """Prompt lookup (Saxena, 2023; the retrieval half of RASD, arXiv 2503.03434): the longest suffix of
    the row's text (up to max_ngram tokens, at least min_ngram) that occurred earlier in the row's own
    prompt + emitted tokens; the k tokens that followed its most recent occurrence are the draft. No
    drafter, no training, per-row state only. Ours: `branches` > 1 drafts the continuations of the best
    `branches` matches (longest, then most recent) as chains sharing the root, verified as one tree;
    branches = 1 is plain prompt lookup."""

    k: int = 8
    max_ngram: int = 4
    min_ngram: int = 1
    branches: int = 1
    autotune_grid = ({"k": 4}, {"k": 12}, {"branches": 3})

    def check(self):
        for n in ("k", "max_ngram", "min_ngram", "branches"):
            _positive(n, getattr(self, n))
        if self.min_ngram > self.max_ngram:
            raise SpecError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")


def _non_negative(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SpecError(f"{name} must be an integer >= 0, got {v!r}")


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"{name} must be an integer >= 1, got {v!r}")


def _plain(v):
    """Spec values as plain JSON data (tuples -> lists)."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _coerce(name: str, v: Any, hint) -> Any:
    """A parameter value checked against its annotation; lists become tuples where the spec wants tuples."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(v, bool):
            raise SpecError(f"{name} must be true or false, got {v!r}")
    elif hint is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise SpecError(f"{name} must be an integer, got {v!r}")
    elif hint is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SpecError(f"{name} must be a number, got {v!r}")
        return float(v)
    elif origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise SpecError(f"{name} must be a list, got {v!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(name, x, item) for x in v)
    return v


def parse_spec(name: str, params: dict | None) -> MethodSpec:
    """Method name + params mapping -> the method's frozen spec; SpecError names what is wrong."""
    if name not in METHOD_SPECS:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(sorted(METHOD_SPECS))}")
    cls = METHOD_SPECS[name]
    if params is not None and not isinstance(params, dict):
        raise SpecError(f"params must be a mapping, got {params!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for k in params or {}:
        if k not in known:
            raise SpecError(f"method {name!r} has no parameter {k!r}; known: {', '.join(known) or 'none'}")
    spec = cls(**{k: _coerce(k, v, hints[k]) for k, v in (params or {}).items()})
    spec.check()
    return spec


def autotune_candidates(spec: MethodSpec) -> list[MethodSpec]:
    """The settings per-job autotune measures: the given spec first, then each grid entry merged over it."""
    out = [spec]
    for change in spec.autotune_grid:
        cand = spec.with_params(**change)
        if cand not in out:
            out.append(cand)
    return out


__all__ = ["METHOD_SPECS", "MethodSpec", "SpecError", "autotune_candidates", "method", "parse_spec"]
