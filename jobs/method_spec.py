"""The machinery behind the method specs: the registry, the spec base class, parsing and autotune candidates.

`@method("name")` makes a spec class a frozen dataclass and registers it in `METHOD_SPECS`; `parse_spec`
turns a manifest's (name, params) into that class, checking types against the annotations and then the
class's own `check()`. The spec classes themselves live in `specs.py` (plain and adaptive methods) and
`specs_drafting.py` (drafting without a trained EAGLE head, from what the job wrote, or by early exit);
import them from `jobs.specs`, which re-exports everything here. Torch-free, like every `jobs` module.
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
    autotune_grid: ClassVar[tuple[dict, ...]] = ()
    since_hash: ClassVar[dict[str, Any]] = {}  # parameters added after the method shipped -> their defaults

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


def hashed_params(name: str, params: dict) -> dict:
    """Params as the config hash sees them: parameters added after a method shipped (`since_hash`) count only
    when they differ from their default, so outputs written before they existed still resume."""
    added = getattr(METHOD_SPECS.get(name), "since_hash", {})
    return {k: v for k, v in params.items() if not (k in added and v == added[k])}


def autotune_candidates(spec: MethodSpec) -> list[MethodSpec]:
    """The settings per-job autotune measures: the given spec first, then each grid entry merged over it."""
    out = [spec]
    for change in spec.autotune_grid:
        cand = spec.with_params(**change)
        if cand not in out:
            out.append(cand)
    return out
