"""Speculative method names and their parameters: typed, validated, one source of defaults.

Torch-free on purpose: the controller (`jobs/`) validates `speculative.method` and
`speculative.params` from a manifest with this module alone. `methods.py` binds each name to the
proposer that implements it; a test asserts the two registries name the same methods.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

METHOD_SPECS: dict[str, type] = {}


def method(name: str):
    def deco(cls):
        cls.method_name = name
        METHOD_SPECS[name] = cls
        return dataclass(frozen=True)(cls)
    return deco


class SpecError(ValueError):
    """Bad method name or parameter; the message names it."""


@method("none")
class NoneSpec:
    """Plain autoregressive decoding: the baseline every speedup is measured against."""
    drafter = None


@method("eagle")
class EagleSpec:
    """EAGLE-1 chain (Li et al., 2024): the head drafts k tokens greedily; verified as a chain."""
    k: int = 5
    drafter = "eagle"

    def check(self):
        _positive("k", self.k)


@method("eagle-tree")
class EagleTreeSpec:
    """EAGLE-1 static tree: fixed paths of child ranks (default: an 18-node tree of depth 5)."""
    tree: tuple = ()  # paths such as [[0], [1], [0, 0]]; empty = the default tree
    drafter = "eagle"

    def check(self):
        for p in self.tree:
            if not isinstance(p, (list, tuple)) or not p or not all(isinstance(r, int) and r >= 0 for r in p):
                raise SpecError(f"tree: each path must be a non-empty list of ranks >= 0, got {p!r}")


@method("eagle2")
class Eagle2Spec:
    """EAGLE-2 dynamic tree (Li et al., 2024): top_k expansion per level, global rerank to total_tokens."""
    top_k: int = 10
    depth: int = 6
    total_tokens: int = 60
    drafter = "eagle"

    def check(self):
        for n in ("top_k", "depth", "total_tokens"):
            _positive(n, getattr(self, n))


@method("draft-model")
class DraftModelSpec:
    """Classic speculative decoding with an independent draft model (Leviathan et al., 2023): a chain of k."""
    k: int = 4
    drafter = "draft-model"

    def check(self):
        _positive("k", self.k)


# ---------------------------------------------------------------- adaptive methods (issue: adaptive structures)

@method("adaeagle")
class AdaEagleSpec:
    """AdaEAGLE (Zhang et al., 2024): a chain whose length is LDLP's prediction each round (may be 0).
    k_max 0 = the LDLP artifact's own k_max."""
    k_max: int = 0
    drafter = "eagle"
    uses_ldlp = True

    def check(self):
        _non_negative("k_max", self.k_max)


@method("adaeagle-ddd")
class AdaEagleDDDSpec:
    """AdaEAGLE-DDD (Zhang et al., 2024): LDLP's length plus the cumulative draft log-probability
    threshold; drafting stops only when both say stop (bounded by k_max)."""
    threshold: float = -0.6
    k_max: int = 0
    drafter = "eagle"
    uses_ldlp = True

    def check(self):
        _non_negative("k_max", self.k_max)


@method("adaedl")
class AdaEDLSpec:
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
    drafter = "eagle"

    def check(self):
        _positive("k_max", self.k_max)
        if not (self.gamma > 0 and 0 <= self.beta1 <= 1 and 0 < self.alpha <= 1 and self.eps >= 0):
            raise SpecError("gamma must be > 0, beta1 in [0, 1], alpha in (0, 1], eps >= 0")


@method("ddd")
class DDDSpec:
    """Dynamic Depth Decoding (Brown et al., 2024): EAGLE-2 beams, continue while log(sum of the beams'
    probabilities) stays above `threshold`, checked only at `check_depths` (one host sync each)."""
    top_k: int = 8
    max_depth: int = 10
    total_tokens: int = 60
    threshold: float = -1.5
    check_depths: tuple = (3, 5, 7)
    drafter = "eagle"

    def check(self):
        for n in ("top_k", "max_depth", "total_tokens"):
            _positive(n, getattr(self, n))


@method("opt-tree")
class OptTreeSpec:
    """OPT-Tree (Wang et al., 2024), level-wise: keep the globally best n nodes per level by path
    probability; stop when the expected acceptance length E = sum of path probabilities grows by
    less than delta (checked per level)."""
    n: int = 8
    max_depth: int = 10
    delta: float = 0.2
    drafter = "eagle"

    def check(self):
        _positive("n", self.n)
        _positive("max_depth", self.max_depth)
        if self.delta < 0:
            raise SpecError(f"delta must be >= 0, got {self.delta}")


@method("ldlp-tree")
class LDLPTreeSpec:
    """Ours: LDLP's predicted length sets the EAGLE-2 tree depth each round (depth = prediction + 1,
    within [min_depth, max_depth]) and the node budget scales with it (nodes_per_level x depth)."""
    top_k: int = 8
    nodes_per_level: int = 10
    min_depth: int = 1
    max_depth: int = 8
    drafter = "eagle"
    uses_ldlp = True

    def check(self):
        for n in ("top_k", "nodes_per_level", "min_depth", "max_depth"):
            _positive(n, getattr(self, n))
        if self.max_depth < self.min_depth:
            raise SpecError(f"max_depth ({self.max_depth}) must be >= min_depth ({self.min_depth})")


@method("oracle")
class OracleSpec:
    """Benchmark-only ceiling: each round drafts the ideal chain length, read off the target's own
    greedy continuation computed ahead (greedy decoding only)."""
    k_max: int = 10
    drafter = "eagle"

    def check(self):
        _positive("k_max", self.k_max)


def _non_negative(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SpecError(f"{name} must be an integer >= 0, got {v!r}")


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"{name} must be an integer >= 1, got {v!r}")


# ---------------------------------------------------------------- per-job tuning (ours)

AUTOTUNE_KEYS = ("autotune", "autotune_fraction")

# candidate settings `autotune` measures, per method (each merged over the given params)
AUTOTUNE_CANDIDATES: dict[str, list[dict]] = {
    "eagle": [{"k": k} for k in (2, 3, 4, 6)],
    "eagle2": [{"depth": d, "total_tokens": t} for d, t in ((4, 30), (6, 60), (8, 80), (5, 40))],
    "draft-model": [{"k": k} for k in (2, 4, 6)],
    "adaeagle": [{"k_max": k} for k in (4, 6, 10)],
    "adaeagle-ddd": [{"threshold": t} for t in (-0.3, -0.6, -1.0)],
    "adaedl": [{"lam0": x} for x in (0.5, 0.7, 0.85)],
    "ddd": [{"threshold": t} for t in (-1.0, -1.5, -2.5)],
    "opt-tree": [{"delta": x} for x in (0.1, 0.2, 0.4)],
    "ldlp-tree": [{"nodes_per_level": n, "max_depth": d} for n, d in ((6, 6), (10, 8), (4, 6))],
}


def split_autotune(params: dict | None) -> tuple[dict, dict]:
    """Separate the job-level keys `autotune` (bool) and `autotune_fraction` (0..0.5) from method params."""
    params = dict(params or {})
    tune = {k: params.pop(k) for k in AUTOTUNE_KEYS if k in params}
    if "autotune" in tune and not isinstance(tune["autotune"], bool):
        raise SpecError(f"autotune must be true or false, got {tune['autotune']!r}")
    frac = tune.setdefault("autotune_fraction", 0.02)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 0.5:
        raise SpecError(f"autotune_fraction must be in (0, 0.5], got {frac!r}")
    tune.setdefault("autotune", False)
    return params, tune


def autotune_candidates(name: str, params: dict) -> list[dict]:
    """Full parameter sets to measure: the given params first, then each candidate merged over them."""
    base = spec_params(parse_spec(name, params))
    out = [base]
    for c in AUTOTUNE_CANDIDATES.get(name, []):
        merged = spec_params(parse_spec(name, {**base, **c}))
        if merged not in out:
            out.append(merged)
    return out


def parse_spec(name: str, params: dict | None):
    """Method name + params mapping -> the method's frozen spec; SpecError names what is wrong."""
    if name not in METHOD_SPECS:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(sorted(METHOD_SPECS))}")
    cls = METHOD_SPECS[name]
    params, _ = split_autotune(params)
    known = {f.name: f for f in fields(cls)}
    for k in params:
        if k not in known:
            raise SpecError(f"method {name!r} has no parameter {k!r}; known: {', '.join(known) or 'none'}")
    for k, v in params.items():
        want = known[k].type  # a string under postponed annotations
        if want in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
            raise SpecError(f"{k} must be an integer, got {v!r}")
        if want in ("float", float) and not isinstance(v, (int, float)):
            raise SpecError(f"{k} must be a number, got {v!r}")
        if want in ("bool", bool) and not isinstance(v, bool):
            raise SpecError(f"{k} must be true or false, got {v!r}")
        if want in ("tuple", tuple) and k == "check_depths":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and x >= 1 for x in v):
                raise SpecError(f"{k} must be a list of depths >= 1, got {v!r}")
            params[k] = tuple(v)
            continue
        if want in ("tuple", tuple):
            params[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, (list, tuple)) else v
    spec = cls(**params)
    if hasattr(spec, "check"):
        spec.check()
    return spec


def spec_params(spec) -> dict:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


__all__ = ["METHOD_SPECS", "SpecError", "parse_spec", "spec_params", "split_autotune", "autotune_candidates"]
