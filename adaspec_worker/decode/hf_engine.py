"""Plain decoding through transformers, for checkpoints our own model does not implement (GPT-2, GPT-NeoX, OPT,
...: any local directory `AutoModelForCausalLM` loads). The slower fallback of `speculative.method: none`.

`load_hf_target(dir, dtype, device)` loads the checkpoint as an `HFTarget` (the HF model plus the few config
facts the worker reads: `cfg.eos_token_ids`, `cfg.max_position_embeddings`, `cfg.vocab_size`); `HFEngine` has
`Engine`'s interface (`generate(prompts, sampling, seeds, stop_fn) -> (completions, EngineStats)`, `spec`,
`target`, `drafter`, `ldlp`, `warmup_seconds`). Its loop is our own, not `model.generate`: one batched
prefill of left-padded prompts (attention mask, position ids counted from each row's first real token), then
one forward per token over the model's own KV cache. Each row's token is drawn by `sampling.py` from the row's
seed and output position (the uniform plain decoding uses: `STREAM_BONUS`), so a row's text depends only on its
seed, never on its batch companions, and greedy is the argmax, as transformers' greedy `generate`. Requested
log-probabilities come from the same logits (`logprobs.py`: the raw distribution). Stop rules
(EOS, stop strings, max_new_tokens) are `batch.Outputs`'. Finished rows leave the batch (the cache's
`reorder_cache`).

What it does not know: drafting (any method but `none` is refused), CUDA graphs or compilation, our own model
and cache, tokenization, files beyond what `from_pretrained` reads. A model whose forward takes no
`position_ids` numbers left-padded rows from the pad, so its text can then depend on the batch's longest prompt.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

from .batch import Completion, Outputs, Request, StopFn
from .config import ModelLoadError, fallback_context, read_json
from .logprobs import next_token_logprobs
from .model import resolve_device, resolve_dtype
from .sampling import STREAM_BONUS, SamplingParams, sample, target_probs, uniform
from .stats import EngineStats, PhaseClock, RowOutcome, SeqStats, host_logprobs
from .stream import CallStream, Source

UNBOUNDED_CONTEXT = 1 << 20  # a config naming no context (no position embeddings): the prompt-length check's limit


@dataclass(frozen=True)
class FallbackConfig:
    """The config facts the worker and the engine read, for a checkpoint outside our own model."""

    architecture: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...] = ()


class HFTarget:
    """A transformers causal LM with a `FallbackConfig` (`cfg`), its device and dtype."""

    def __init__(self, model, cfg: FallbackConfig):
        self.model, self.cfg = model, cfg
        params = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache):
        """ids, positions [B, T]; attention [B, S] (1 = a real token, over cache + new) -> (logits [B, V] at the
        last new token, the updated cache)."""
        kw = {"position_ids": positions} if self.takes_positions else {}
        if self.takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=attention, past_key_values=cache, use_cache=True, **kw)
        return out.logits[:, -1], out.past_key_values


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def load_hf_target(model_dir: str, dtype: str = "auto", device: str = "auto") -> HFTarget:
    """`AutoModelForCausalLM.from_pretrained` on a local directory (no download), in eval mode."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, dev), local_files_only=True)
    except Exception as e:  # unknown model_type, missing weights, ...: the job cannot start
        raise ModelLoadError(f"{model_dir}: transformers could not load it ({type(e).__name__}: {e})") from None
    model = model.to(dev).eval().requires_grad_(False)
    raw = read_json(os.path.join(model_dir, "config.json"))
    gen = getattr(model, "generation_config", None)
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(raw.get("eos_token_id"))
    cfg = FallbackConfig(
        architecture=(raw.get("architectures") or [raw.get("model_type", "?")])[0],
        vocab_size=int(model.config.vocab_size),
        max_position_embeddings=fallback_context(raw) or UNBOUNDED_CONTEXT,
        eos_token_ids=eos,
    )
    return HFTarget(model, cfg)


class HFEngine:
    """`Engine`'s interface over an `HFTarget`: plain autoregressive decoding only."""

    drafter = None
    ldlp = None

    def __init__(self, target: HFTarget, spec):
        if spec.name != "none":
            raise ModelLoadError(
                f"method {spec.name!r} needs adarun's own model; {target.cfg.architecture} decodes through "
                "transformers with speculative.method none only"
            )
        self.target, self.spec = target, spec
        self.warmup_seconds = 0.0  # nothing compiled or captured

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        seeds: list[int] | None = None,
        stop_fn: StopFn | None = None,
        slots: int | None = None,
        refill: bool = True,
        prefill_chunk: int = 0,
    ) -> tuple[list[Completion], EngineStats]:
        """Decode every prompt to completion, `slots` prompts at a time (no continuous batching here: `refill` and
        `prefill_chunk` are accepted for the engine's interface); one Completion per prompt, in order, and the
        call's stats."""
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        width = slots or len(prompts)
        done, stats = [], EngineStats()
        for i in range(0, len(prompts), width):
            chunk = range(i, min(i + width, len(prompts)))
            stop = None if stop_fn is None else (lambda p, toks, i=i: stop_fn(p + i, toks))
            out, st = self._generate_batch([prompts[j] for j in chunk], sampling, [seeds[j] for j in chunk], stop)
            done += out
            stats = stats + st
        return done, stats

    def stream(self, source: Source, slots: int, refill: bool = True, prefill_chunk: int = 0) -> CallStream:
        """`Engine.stream`'s interface: each run of arrived rows that share their settings in one generate()."""
        return CallStream(self, source, slots, refill, prefill_chunk)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int], stop_fn: StopFn | None
    ) -> tuple[list[Completion], EngineStats]:
        n = len(prompts)
        assert n > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
        device, stats = self.target.device, EngineStats()
        clock = PhaseClock(device)
        clock.mark("prefill")
        longest = max(len(p) for p in prompts)
        limit = self.target.cfg.max_position_embeddings
        assert longest + sampling.max_new_tokens <= limit, (
            f"prompt ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's context {limit}"
        )
        ids = torch.zeros(n, longest, dtype=torch.long, device=device)  # [B, T] left-padded prompts
        attention = torch.zeros(n, longest, dtype=torch.long, device=device)  # [B, T] 1 = real token
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p, device=device)
            attention[i, longest - len(p) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [B, T] each row counts from its first real token
        logits, cache = self.target.forward(ids, attention, positions, None)  # logits [B, V]
        seed = torch.tensor(seeds if seeds is not None else [0] * n, dtype=torch.long, device=device)  # [B]
        counter = torch.zeros(n, dtype=torch.long, device=device)  # [B] tokens emitted so far
        origin = list(range(n))  # prompt index of each batch row
        outputs, done = Outputs(), [None] * n
        for i, p in enumerate(prompts):
            outputs.add(i, Request(p, sampling, seeds[i], stop_fn, tag=i))
        while True:
            clock.mark("other")
            token = self._pick(logits, sampling, seed, counter)  # [B]
            ended = outputs.record(origin, self._outcomes(logits, token, sampling))
            for e in ended:
                done[e.row] = e.completion
            finished = [e.slot for e in ended]
            stats.target_passes += 1
            if not outputs.live:
                break
            if finished and hasattr(cache, "reorder_cache"):  # finished rows leave the batch
                gone = set(finished)
                keep = [i for i in range(len(origin)) if i not in gone]
                index = torch.tensor(keep, device=device)
                cache.reorder_cache(index)
                token, seed, counter = token[index], seed[index], counter[index]
                attention, positions = attention[index], positions[index]
                origin = [origin[i] for i in keep]
            counter += 1
            attention = torch.cat([attention, attention.new_ones(len(origin), 1)], 1)  # [B, S + 1]
            positions = positions[:, -1:] + 1  # [B, 1]
            clock.mark("verify")
            logits, cache = self.target.forward(token[:, None], attention, positions, cache)
            clock.flush(stats)
        clock.mark("other")
        clock.flush(stats)
        stats.rows = sum((c.stats for c in done), SeqStats())
        return done, stats

    @staticmethod
    def _outcomes(logits: torch.Tensor, token: torch.Tensor, sampling: SamplingParams) -> list[RowOutcome]:
        """One emitted token per row, with its raw log-probability and top alternatives when asked (logprobs.py)."""
        rows = [RowOutcome(0, 0, 0, [t], None) for t in token.tolist()]
        if sampling.logprobs is not None:
            for row, (chosen, top) in zip(rows, host_logprobs(next_token_logprobs(logits, token, sampling.logprobs))):
                row.logprobs, row.top_logprobs = chosen, top
        return rows

    @staticmethod
    def _pick(logits: torch.Tensor, sampling: SamplingParams, seed: torch.Tensor, counter: torch.Tensor):
        """logits [B, V] -> tokens [B]: the argmax (greedy), else the row's seeded draw at its output position."""
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if sampling.greedy:
            return logits.argmax(-1)
        return sample(target_probs(logits, sampling), uniform(seed, counter, STREAM_BONUS, 1)[:, 0])
