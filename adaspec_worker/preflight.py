"""Preflight of a job's models, before any actor starts (and in `--dry-run`): torch-free checks that the
target, draft and LDLP directories exist, hold what the method needs, and fit together.

Checked: a local directory with config.json, weights and (for the target) a tokenizer; an architecture
and RoPE our model implements (`decode.config.ModelConfig`, the same parser the loader uses), or, with
`speculative.method: none`, any config with a `model_type` (decoded through transformers: the slower
fallback, said in a one-line warning; its context from `decode.config.fallback_context`); the
draft's hidden size (EAGLE head), vocabulary (draft model) or exit layer (early-exit head) against the
target's; the LDLP's input
size; `decoding.max_new_tokens` within the target's context; `decoding.top_logprobs` within its
vocabulary; a chat template when the input
has chat rows. Each failure is a `ModelLoadError` whose
message starts with the manifest field at fault (exit 2).

Reads only JSON files and directory listings: no torch, no weights loaded.
"""

from __future__ import annotations

import logging
import os

from jobs.inputs import inspect_file
from jobs.manifest_schema import Manifest
from jobs.plan import input_storage_options, list_inputs

from .decode.config import ModelConfig, ModelLoadError, UnsupportedModel, fallback_context, read_json

log = logging.getLogger("adarun.preflight")

_WEIGHTS = (".safetensors", ".bin")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _directory(field: str, path: str) -> str:
    if "://" in path:
        raise ModelLoadError(f"{field}: {path}: models must be local directories (on every node)")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{field}: {path} does not exist or is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{field}: {path} has no config.json")
    return path


def _json(field: str, path: str) -> dict:
    try:
        return read_json(os.path.join(_directory(field, path), "config.json"))
    except ValueError as e:
        raise ModelLoadError(f"{field}: {path}/config.json is not valid JSON ({e})") from None


def _config(field: str, path: str, default_arch: str | None = None) -> tuple[dict, ModelConfig]:
    raw = _json(field, path)
    if default_arch:
        raw.setdefault("architectures", [default_arch])
    try:
        return raw, ModelConfig.from_hf(raw, where=os.path.join(path, "config.json"))
    except ModelLoadError as e:  # UnsupportedModel stays itself: method none falls back on it
        raise type(e)(f"{field}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{field}: {path}/config.json lacks or mistypes {e}") from None


def _weights(field: str, path: str) -> None:
    if not any(f.endswith(_WEIGHTS) for f in os.listdir(path)):
        raise ModelLoadError(f"{field}: {path} has no *.safetensors or *.bin weights")


def _uses_chat(m: Manifest) -> bool:
    """Whether the input has chat rows: a messages column named or detected in the first file (JSONL: never
    known before reading, so its chat rows without a template become error rows)."""
    if m.input.messages_column:
        return True
    try:
        opts = input_storage_options(m.input.path, m.output.path, m.output.storage_options)
        info = inspect_file(list_inputs(m.input.path, opts)[0], m.input, opts)
    except Exception:  # the plan reports input problems itself
        return False
    return bool(info.columns and info.columns.chat)


def _has_chat_template(target: str) -> bool:
    if any(os.path.isfile(os.path.join(target, f)) for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return bool(read_json(os.path.join(target, "tokenizer_config.json")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _fallback(m: Manifest, error: UnsupportedModel) -> int | None:
    """A target our model does not implement: fine for `method: none` (transformers decodes it; warned once),
    refused for every other method. Returns its context (None: the config names none)."""
    if m.speculative.method != "none":
        raise ModelLoadError(
            f"{error}; speculative.method {m.speculative.method!r} needs adarun's own model "
            "(method none decodes it through transformers)"
        ) from None
    raw = _json("model.target", m.model.target)
    if not raw.get("model_type"):
        raise ModelLoadError(f"{error}; and config.json has no model_type for transformers") from None
    log.warning(
        "model.target: %s is not implemented by adarun's own model: decoding through transformers "
        "(the slower fallback, method none only)",
        (raw.get("architectures") or [raw["model_type"]])[0],
    )
    return fallback_context(raw)


def _early_exit(raw: dict, head: ModelConfig, target: ModelConfig) -> None:
    """An early-exit head (train-draft --early-exit N) made for this target: shapes and N within its layers."""
    n = raw.get("early_exit_layer")
    if not isinstance(n, int) or not 1 <= n <= target.num_layers:
        raise ModelLoadError(
            f"model.draft: early_exit_layer {n!r} is not a layer of the target (1..{target.num_layers}); "
            "method eesd needs a head from adarun train-draft --early-exit N"
        )
    if (head.hidden_size, head.vocab_size) != (target.hidden_size, target.vocab_size):
        raise ModelLoadError("model.draft: the early-exit head was trained for another target (hidden or vocab size)")


def check_models(m: Manifest) -> ModelConfig | None:
    """Raise ModelLoadError naming the field at fault; return the target's config (None: the transformers
    fallback decodes it)."""
    target, context = None, None
    try:
        _, target = _config("model.target", m.model.target)
        context = target.max_position_embeddings
    except UnsupportedModel as e:
        context = _fallback(m, e)
    _weights("model.target", m.model.target)
    if not any(os.path.isfile(os.path.join(m.model.target, f)) for f in _TOKENIZER):
        raise ModelLoadError(f"model.target: {m.model.target} has no tokenizer ({' / '.join(_TOKENIZER)})")
    if context is not None and m.decoding.max_new_tokens + 1 > context:
        raise ModelLoadError(
            f"decoding.max_new_tokens: {m.decoding.max_new_tokens} plus a prompt exceeds the "
            f"target's context of {context} tokens"
        )
    vocab = target.vocab_size if target is not None else _json("model.target", m.model.target).get("vocab_size")
    if isinstance(vocab, int) and m.decoding.top_logprobs > vocab:
        raise ModelLoadError(
            f"decoding.top_logprobs: {m.decoding.top_logprobs} exceeds the target's vocabulary of {vocab} tokens"
        )
    if _uses_chat(m) and not _has_chat_template(m.model.target):
        raise ModelLoadError(
            f"model.target: {m.model.target} has no chat template (tokenizer_config.json chat_template or "
            "chat_template.jinja), which the input's chat column needs (input.messages_column)"
        )
    needs = m.speculative.spec().needs
    if "draft" in needs:
        kind = needs["draft"]
        raw, draft = _config("model.draft", m.model.draft, "LlamaForCausalLM" if kind == "eagle" else None)
        _weights("model.draft", m.model.draft)
        if kind == "eagle" and draft.hidden_size != target.hidden_size:
            raise ModelLoadError(
                f"model.draft: hidden_size {draft.hidden_size} does not match the target's "
                f"{target.hidden_size} (a head trained for another target?)"
            )
        if kind == "early-exit":
            _early_exit(raw, draft, target)
        if kind == "draft-model" and draft.vocab_size != target.vocab_size:
            raise ModelLoadError(
                f"model.draft: vocab_size {draft.vocab_size} differs from the target's "
                f"{target.vocab_size} (draft models must share the target's tokenizer)"
            )
    if "ldlp" in needs:
        cfg = _json("model.ldlp", m.model.ldlp)
        if cfg.get("in_dim") != 2 * target.hidden_size:
            raise ModelLoadError(
                f"model.ldlp: in_dim {cfg.get('in_dim')} does not match 2 x the target's hidden "
                f"size {target.hidden_size} (an LDLP fitted for another target?)"
            )
        _weights("model.ldlp", m.model.ldlp)
    return target
