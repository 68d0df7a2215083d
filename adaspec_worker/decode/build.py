"""From a method spec and model paths to a ready `Engine`: the one place that loads artifacts.

    build_engine(target, spec, draft="heads/x-eagle", ldlp="models/x-ldlp")

loads the drafter the spec needs (`spec.needs["draft"]`, a kind in `drafters.DRAFTERS`) and the LDLP
(when `"ldlp" in spec.needs`), builds the proposer registered for the spec's class, and hands the
built parts to the engine. `draft` and `ldlp` may also be already-loaded objects (autotune reuses
them: `build_engine(target, candidate, draft=engine.drafter, ldlp=engine.ldlp)`); `cost`, a measured
`cost.CostModel`, goes to the proposer (`set_cost`) for the policies that read one.

`load_model(dir, spec, dtype, device)` loads the target: our own model, or, when it does not implement the
checkpoint's architecture (or RoPE) and the method is `none`, transformers' (`hf_engine.HFTarget`, the slower
fallback); `build_engine` on such a target gives an `hf_engine.HFEngine`.

Importing this module registers every proposer (fixed, adaptive, training-free, retrieval-fused and
Thompson-sampled) and the early-exit drafter kind, explicitly. Knows nothing of
manifests, Ray or Parquet: the spec arrives parsed.
"""
from __future__ import annotations

import os

from jobs.specs import EagleThompsonSpec, EESDSpec, MethodSpec, NoneSpec, RASDSpec, RetrievalSpec, TokenRecyclingSpec

from . import early_exit  # noqa: F401  (importing it registers the "early-exit" drafter kind)
from .config import UnsupportedModel
from .drafters import DRAFTERS, Drafter
from .engine import Engine, RoundHook
from .hf_engine import HFEngine, HFTarget, load_hf_target
from .ldlp import LDLP, load_ldlp
from .model import CausalLM, ModelLoadError, load_target
from .proposers import (  # noqa: F401  (importing them registers every proposer in PROPOSERS)
    adaptive,
    fixed,
    oracle,
    rasd,
    recycling,
    retrieval,
    thompson_chain,
)
from .proposers.base import PROPOSERS, Proposer

__all__ = ["build_engine", "build_proposer", "load_drafter", "load_model", "set_cost"]


def load_model(model_dir: str, spec: MethodSpec, dtype: str = "auto", device: str = "auto") -> CausalLM | HFTarget:
    """The target `spec` decodes with: our own model, else (method `none` only) transformers' for an architecture
    or RoPE type ours does not implement. Any other method keeps the UnsupportedModel error, which says so."""
    try:
        return load_target(model_dir, dtype, device)
    except UnsupportedModel as e:
        if not isinstance(spec, NoneSpec):
            raise UnsupportedModel(f"{e} (speculative.method none decodes it through transformers)") from None
        return load_hf_target(model_dir, dtype, device)


def build_engine(target: CausalLM | HFTarget, spec: MethodSpec, draft: str | os.PathLike | Drafter | None = None,
                 ldlp: str | os.PathLike | LDLP | None = None, fast: bool = True, *,
                 on_round: RoundHook | None = None, cost=None) -> Engine | HFEngine:
    """An engine running `spec` on `target`. draft / ldlp: a path or a loaded object; ignored when the
    spec does not need it; ModelLoadError naming model.draft / model.ldlp when it does and is missing.
    fast on CUDA also fuses target and drafter weights in place and compiles their decode passes.
    A transformers target (`load_model`'s fallback) gets an HFEngine, which runs `none` only."""
    if isinstance(target, HFTarget):
        return HFEngine(target, spec)
    drafter = load_drafter(target, spec, draft)
    if fast and target.device.type == "cuda":  # fused weights, compiled decode passes (plain ops on CPU)
        target.fuse()
        if drafter is not None:
            drafter.fuse()
    engine = Engine(target, build_proposer(target, spec, ldlp, drafter), drafter, on_round=on_round, fast=fast)
    if cost is not None:
        set_cost(engine, cost)
    return engine


def set_cost(engine: Engine | HFEngine, cost) -> None:
    """Hand a measured `cost.CostModel` to the engine's proposer (policies that read one; others ignore it)."""
    if isinstance(engine, Engine):  # the transformers fallback runs `none` only: nothing reads a cost model
        engine.proposer.cost = cost


def load_drafter(target: CausalLM, spec: MethodSpec, draft) -> Drafter | None:
    kind = spec.drafter_kind
    if kind is None:
        return None
    if draft is None:
        raise ModelLoadError(f"method {spec.name!r} needs a {kind} drafter: set model.draft")
    if isinstance(draft, (str, os.PathLike)):
        return DRAFTERS[kind](os.fspath(draft), target)
    return draft


def build_proposer(target: CausalLM, spec: MethodSpec, ldlp=None, drafter: Drafter | None = None) -> Proposer:
    cls = PROPOSERS.get(type(spec))
    if cls is None:
        raise ValueError(f"no proposer implements {type(spec).__name__} (method {spec.name!r})")
    if "ldlp" in spec.needs:
        if ldlp is None:
            raise ModelLoadError(f"method {spec.name!r} needs an LDLP: set model.ldlp")
        return cls(spec, load_ldlp(os.fspath(ldlp), target) if isinstance(ldlp, (str, os.PathLike)) else ldlp)
    if isinstance(spec, TokenRecyclingSpec):
        return cls(spec, vocab_size=target.cfg.vocab_size)
    if isinstance(spec, (RetrievalSpec, RASDSpec)):
        return cls(spec, context=target.cfg.max_position_embeddings)
    if isinstance(spec, (EESDSpec, EagleThompsonSpec)):
        cost = spec.draft_cost
        if not cost and isinstance(spec, EESDSpec) and drafter is not None:  # 0: the head's share of the layers
            cost = len(drafter.stack()) / target.cfg.num_layers
        return cls(spec, draft_cost=cost)
    return cls(spec)
