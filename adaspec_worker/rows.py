"""Rows between text and tokens: per-row settings and seeds, chat rendering, prompt checks and tokenization,
stop strings, detokenization.

`RowCodec` wraps the target's tokenizer (and its chat template) for one job. A row's settings are the
job's `decoding` section overridden by its own values (`row_settings`, one-line error naming the
column when a value is out of range). A sample's seed and a row's place in the measured-baseline
sample are pure functions of (seed, row id, sample index), so a row's text never depends on its batch
or shard companions, or on which attempt decoded it; sample 0 keeps the seed adarun used before
`decoding.n` existed.

Knows nothing of the engine, Ray or storage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from jobs.manifest import MAX_TOP_LOGPROBS


def row_seed(seed: int, row_id: str, sample_index: int = 0) -> int:
    """Each sample's sampling seed: a pure function of (seed, row id, sample index); sample 0 hashes as
    rows did before samples existed, so n=1 outputs are unchanged."""
    key = f"{seed}:{row_id}" if sample_index == 0 else f"{seed}:{row_id}:{sample_index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 62) - 1)


@dataclass(frozen=True)
class RowSettings:
    """The decoding settings of one row: the job's `decoding` section with the row's own values on top.
    Rows with equal settings (seed and n aside) share engine batches."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int
    n: int
    logprobs: bool = False
    top_logprobs: int = 0  # > 0 implies logprobs

    @property
    def batch_key(self) -> tuple:
        """Rows with equal keys decode in one engine call. Log-probability settings are not part of it: a group
        asks the engine for its largest k (`group_logprobs`) and each row keeps its own (`trim_logprobs`)."""
        return (self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.stop)

    @property
    def scored(self) -> int | None:
        """The engine's `SamplingParams.logprobs`: None (not asked) or k, the top alternatives per token."""
        return self.top_logprobs if self.logprobs or self.top_logprobs else None

    def trim_logprobs(self, logprobs: list[float] | None, top: list[list] | None) -> tuple[list | None, list | None]:
        """A completion decoded for its group's largest k -> this row's own columns: (None, None) when the row did
        not ask, its top lists cut to its own k (None when k is 0)."""
        if self.scored is None or logprobs is None:
            return None, None
        return logprobs, [t[: self.top_logprobs] for t in top] if self.top_logprobs else None


def group_logprobs(settings: list[RowSettings]) -> int | None:
    """The engine's `SamplingParams.logprobs` for rows decoded together: None when none asked, else the largest k."""
    ks = [st.scored for st in settings if st.scored is not None]
    return max(ks) if ks else None


_BOUNDS = {  # name -> (type check, low, high, inclusive low)
    "max_new_tokens": (int, 1, 1_000_000, True),
    "temperature": (float, 0, 100, True),
    "top_p": (float, 0, 1, False),
    "top_k": (int, 0, 1_000_000, True),
    "seed": (int, 0, 2**63 - 1, True),
    "n": (int, 1, 1024, True),
    "top_logprobs": (int, 0, MAX_TOP_LOGPROBS, True),
}


def row_settings(decoding, own: dict) -> tuple[RowSettings | None, str | None]:
    """(settings, None), or (None, a one-line reason naming the column) when a row's value is unusable."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "n", "logprobs", "top_logprobs")
    values = {k: getattr(decoding, k) for k in names}
    values["stop"] = tuple(decoding.stop)
    for k, v in own.items():
        if k == "logprobs":
            if not isinstance(v, bool):
                return None, f"logprobs: must be true or false, got {v!r}"
            values[k] = v
            continue
        if k == "stop":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
                return None, f"stop: must be a list of non-empty strings, got {v!r}"
            values[k] = tuple(v)
            continue
        kind, lo, hi, incl = _BOUNDS[k]
        if isinstance(v, float) and kind is int and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            return None, f"{k}: must be {'an integer' if kind is int else 'a number'}, got {v!r}"
        if not (v >= lo if incl else v > lo) or v > hi or v != v:
            return None, f"{k}: must be in {'[' if incl else '('}{lo}, {hi}], got {v!r}"
        values[k] = kind(v)
    return RowSettings(**values), None


def in_baseline_sample(row_id: str, fraction: float) -> bool:
    """Whether a row is among those decoded a second time with plain decoding (the measured baseline)."""
    h = int.from_bytes(hashlib.sha256(f"baseline:{row_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


@dataclass
class Row:
    """One sample of an input row, ready to decode."""

    id: str
    prompt: str  # the text decoded from (a chat row's rendered template)
    tokens: list[int]
    seed: int
    sample_index: int = 0
    settings: RowSettings | None = None  # None: the job's decoding section
    input_index: int = 0  # the row's place in its shard (for carried columns)
    sp: object = None  # the engine's sampling parameters for these settings (set by the worker)


class RowCodec:
    def __init__(self, tokenizer, stop: list[str], max_new_tokens: int, context: int, system_prompt: str | None = None):
        self.tok, self.stop = tokenizer, list(stop)
        self.max_new_tokens, self.context = max_new_tokens, context
        self.system_prompt = system_prompt
        self._token_texts: dict[int, str] = {}

    def render(self, messages) -> tuple[str | None, str | None]:
        """A chat row (list of {role, content}) as text through the tokenizer's chat template, with the
        generation prompt added and `input.system_prompt` first when the row has no system message."""
        if not messages or not all(isinstance(x, dict) and x.get("content") is not None for x in messages):
            return None, "empty chat (no messages, or a message without content)"
        msgs = [{"role": x.get("role") or "user", "content": x["content"]} for x in messages]
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), None
        except Exception as e:  # no template, or the template refuses these roles
            return None, f"chat template: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    def encode(self, prompt, max_new_tokens: int | None = None) -> tuple[list[int] | None, str | None]:
        """(tokens, None) for a usable prompt, else (None, a one-line reason for errors/)."""
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if prompt is None:
            return None, "empty prompt (null)"
        if not isinstance(prompt, str):
            return None, f"undecodable prompt (type {type(prompt).__name__})"
        if not prompt.strip():
            return None, "empty prompt"
        toks = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not toks:
            return None, "prompt tokenizes to nothing"
        if len(toks) + max_new > self.context:
            return None, f"prompt too long: {len(toks)} tokens + max_new_tokens {max_new} > context {self.context}"
        return toks, None

    def top_logprobs(self, per_token: list[list[tuple[int, float]]]) -> list[list[dict]]:
        """The engine's (token id, logprob) alternatives per completion token as the output column's structs,
        each token's text decoded alone (cached: a vocabulary is finite)."""
        texts = self._token_texts
        for top in per_token:
            for tid, _ in top:
                if tid not in texts:
                    texts[tid] = self.tok.decode([tid])
        return [[{"token_id": t, "token": texts[t], "logprob": v} for t, v in top] for top in per_token]

    def text(self, tokens: list[int], stop: tuple[str, ...] | None = None) -> str:
        """A completion's text, cut before the first stop string."""
        text = self.tok.decode(tokens, skip_special_tokens=True)
        for s in self.stop if stop is None else stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def stop_fn(self, stop: tuple[str, ...] | None = None) -> StopStrings | None:
        """The engine's stop rule for stop strings: where to cut a row's tokens once one appears."""
        stops = self.stop if stop is None else list(stop)
        return StopStrings(self.tok, stops) if stops else None


class StopStrings:
    """Where to cut a row's tokens once a stop string appears in their text. Called every few tokens of a row,
    so a stop string not in a row's tail was already caught in an earlier call: only the tail is decoded (by the Rust
    tokenizer directly, where the tokenizer has one and its decode() adds nothing to it)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, list(stops)
        self.reach = max(len(s.encode()) for s in stops) + 2  # tokens: each decodes to at least one byte
        rust = getattr(tokenizer, "_tokenizer", None)  # the same text as decode() unless it cleans up spaces
        same = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        # one Rust decode per tail: decode_batch hands the tails to a thread pool, which waits for the cores the
        # decode loop's own threads hold (profiled inside the loop: 0.56 ms a call, against 0.13 ms for the decodes)
        self._decode_fast = getattr(rust, "decode", None) if same else None

    def _decode(self, toks: list[int]) -> str:
        return self.tok.decode(toks, skip_special_tokens=True)

    def __call__(self, _row: int, toks: list[int]) -> int | None:
        return self.batch([_row], [toks])[0]

    def batch(self, _rows: list[int], seqs: list[list[int]], new: list[int] | None = None) -> list[int | None]:
        """For each row's tokens so far (of which the last new[i] arrived since the last call; default: up to
        16): keep this many tokens, or None (no stop string yet)."""
        new = new or [16] * len(seqs)
        tails = [toks[-(n + self.reach) :] for toks, n in zip(seqs, new)]
        if self._decode_fast is not None:
            texts = [self._decode_fast(t, skip_special_tokens=True) for t in tails]
        else:
            texts = [self._decode(t) for t in tails]
        return [self._cut(toks) if self._holds(text) else None for toks, text in zip(seqs, texts)]

    def _cut(self, toks: list[int]) -> int | None:
        """The shortest prefix that already holds a stop string (once per stopped row). With the Rust decode
        alone a longer prefix only adds bytes at the end, so holding a stop string is monotone in the prefix
        length and a binary search finds it; a tokenizer whose decode() cleans up spaces (" ." -> ".") can lose one as
        the text grows, so there the prefixes are scanned in order."""
        if self._decode_fast is None:
            return next((k for k in range(1, len(toks) + 1) if self._holds(self._decode(toks[:k]))), None)
        found = lambda k: self._holds(self._decode_fast(toks[:k], skip_special_tokens=True))  # noqa: E731
        if not found(len(toks)):
            return None
        lo, hi = 0, len(toks)  # not found(lo), found(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if found(mid) else (mid, hi)
        return hi

    def _holds(self, text: str) -> bool:
        return any(s in text for s in self.stops)
