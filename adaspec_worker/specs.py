"""Speculative method names and their parameters: typed, validated, one source of defaults.

Torch-free on purpose: the controller (`jobs/`) validates `speculative.method` and
`speculative.params` from a manifest with this module alone. `methods.py` binds each name to the
proposer that implements it; a test asserts the two registries name the same methods.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

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


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"{name} must be an integer >= 1, got {v!r}")


def parse_spec(name: str, params: dict | None):
    """Method name + params mapping -> the method's frozen spec; SpecError names what is wrong."""
    if name not in METHOD_SPECS:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(sorted(METHOD_SPECS))}")
    cls = METHOD_SPECS[name]
    params = dict(params or {})
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
        if want in ("tuple", tuple):
            params[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, (list, tuple)) else v
    spec = cls(**params)
    if hasattr(spec, "check"):
        spec.check()
    return spec


def spec_params(spec) -> dict:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


__all__ = ["METHOD_SPECS", "SpecError", "parse_spec", "spec_params", "field"]
