"""The cost model: what a target pass and a draft level cost on the device the job runs on, measured there.

    cost = measure_cost(target, drafter)        # a few dozen timed calls (CUDA-graph replays on CUDA)
    cost.target(B, tokens)                      # seconds of one target pass: B rows x `tokens` new tokens each
    cost.draft(B, width)                        # seconds of one draft level: the drafter over `width` nodes per row,
                                                # plus the log-softmax and top-k that grow a tree level
    CostModel.from_json(cost.to_json())         # a named, JSON-serialisable record (shard stats, bench.json)

Both are measured on a grid (batch buckets x tokens per row, batch buckets x widths) at a fixed committed
context and interpolated linearly in each axis (extrapolated linearly past the grid, never below half its
smallest value). `shaped_target` builds a random-weight target of a named real shape (`SHAPES`, e.g. `8b`:
Llama-3-8B's 32 layers, hidden 4096, 32/8 heads, vocab 128256) directly on the device, with an EAGLE head
of the same shape, so the curves of a memory-bound model can be compared with the job's own.

Knows nothing of proposers, methods or acceptance: policies (`policy.py`) combine these costs with what a
method expects to accept. The measurement allocates its own caches and restores the drafter's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .config import ModelConfig
from .model import CausalLM, causal_tree

TARGET_TOKENS = (1, 2, 4, 8, 16, 32, 64)  # tokens per row of a target pass
DRAFT_WIDTHS = (1, 2, 4, 8, 16)  # nodes per row of a draft level
BATCHES = (1, 4, 16, 64)


@dataclass
class CostModel:
    """Seconds per target pass [batch][tokens] and per draft level [batch][width], measured on `device`."""

    name: str  # what was measured, e.g. "pycoder-22m bfloat16 on NVIDIA H200"
    device: str
    batches: list[int]
    tokens: list[int]
    widths: list[int]
    target_s: list[list[float]]  # [len(batches)][len(tokens)] seconds per target pass
    draft_s: list[list[float]]  # [len(batches)][len(widths)] seconds per draft level (0 without a drafter)
    context: int = 256  # committed slots per row while timing
    measure_seconds: float = 0.0  # what measuring took
    meta: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """False for the `nominal` stand-in, whose numbers are not seconds."""
        return self.device != "none"

    def target(self, B: float, tokens: float) -> float:
        """Seconds of one target pass over `tokens` new tokens in each of B rows."""
        return _interp2(self.batches, self.tokens, self.target_s, B, tokens)

    def draft(self, B: float, width: float) -> float:
        """Seconds of one draft level over `width` nodes in each of B rows (0 for width 0)."""
        return 0.0 if width <= 0 else _interp2(self.batches, self.widths, self.draft_s, B, width)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CostModel:
        return cls(**d)

    @classmethod
    def nominal(cls) -> CostModel:
        """An unmeasured stand-in (CPU tests, engines built without a measurement): a flat target pass of 1 and a
        draft level of 0.1, growing gently with batch x tokens: speculation pays unless the batch is large."""
        tgt = [[1.0 + 0.002 * b * t for t in TARGET_TOKENS] for b in BATCHES]
        drf = [[0.1 + 0.0005 * b * w for w in DRAFT_WIDTHS] for b in BATCHES]
        return cls("nominal", "none", list(BATCHES), list(TARGET_TOKENS), list(DRAFT_WIDTHS), tgt, drf, context=0)


def _interp1(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends, floored at half the smallest y."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(y, 0.5 * min(ys))


def _interp2(rows: list[int], cols: list[int], grid: list[list[float]], r: float, c: float) -> float:
    """Bilinear: first along columns within each grid row, then across rows."""
    return _interp1(rows, [_interp1(cols, line, c) for line in grid], r)


def _timer(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(); on CUDA fn is captured once into a graph and its replays are timed."""
    fn()  # first use: compile, allocate
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def measure_cost(
    target: CausalLM,
    drafter=None,
    name: str = "",
    batches=BATCHES,
    tokens=TARGET_TOKENS,
    widths=DRAFT_WIDTHS,
    context: int = 256,
    repeats: int = 5,
    top_k: int = 8,
) -> CostModel:
    """Time target passes and draft levels over the grid (len(batches) x (len(tokens) + len(widths)) calls)."""
    t0 = time.perf_counter()
    device = target.device
    context = min(context, target.cfg.max_position_embeddings - max(tokens) - max(widths) - 2)
    old_cache = getattr(drafter, "cache", None)
    g = torch.Generator(device="cpu").manual_seed(0)
    target_s, draft_s = [], []
    for B in batches:
        target_s.append(_time_target(target, B, tokens, context, repeats, g))
        draft_s.append(
            _time_draft(drafter, target, B, widths, context, repeats, g, top_k)
            if drafter is not None
            else [0.0] * len(widths)
        )
    if drafter is not None:
        drafter.cache = old_cache
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return CostModel(
        name=f"{name or 'target'} {str(target.dtype).removeprefix('torch.')} on {where}",
        device=str(device),
        batches=list(batches),
        tokens=list(tokens),
        widths=list(widths),
        target_s=target_s,
        draft_s=draft_s,
        context=context,
        measure_seconds=time.perf_counter() - t0,
    )


def measure_for_actor(target: CausalLM, drafter, name: str, batch_size: int) -> CostModel:
    """The start-up measurement of a worker decoding batches of up to `batch_size` rows: batch buckets up to that
    size's bucket (1, 4, 16, 64 on CUDA; 1 and the bucket elsewhere) and a short grid on the CPU."""
    from .batch import bucket

    cuda = target.device.type == "cuda"
    top = bucket(max(batch_size, 1))
    batches = sorted({b for b in (BATCHES if cuda else (1,)) if b <= top} | {top})
    if cuda:
        return measure_cost(target, drafter, name=name, batches=batches)
    return measure_cost(target, drafter, name=name, batches=batches, tokens=(1, 4, 16), widths=(1, 4), context=32,
                        repeats=2)

def _time_target(target: CausalLM, B: int, tokens, context: int, repeats: int, g) -> list[float]:
    """Seconds of a target pass of T new tokens per row, for each T, over `context` committed slots."""
    device = target.device
    cache = target.new_cache(B, context + max(tokens) + 1)
    cache.lens.fill_(context)  # [B] committed slots (zeros: timing does not read values)
    line = []
    for T in tokens:
        ids = torch.randint(0, target.cfg.vocab_size, (B, T), generator=g).to(device)  # [B, T]
        pos = (context + torch.arange(T, device=device)).expand(B, T)  # [B, T]
        mask = causal_tree(B, T, device)  # [B, T, T]
        line.append(_timer(lambda ids=ids, pos=pos, mask=mask: target(ids, pos, cache, mask), device, repeats))
    return line


def _time_draft(drafter, target: CausalLM, B: int, widths, context: int, repeats: int, g, top_k: int) -> list[float]:
    """Seconds of one draft level of W nodes per row (drafter step, log-softmax, top-k), for each W."""
    device, H = target.device, target.cfg.hidden_size
    drafter.cache = drafter.new_cache(B, context + max(widths) + 1)
    drafter.cache.lens.fill_(context)
    line = []
    for W in widths:
        toks = torch.randint(0, target.cfg.vocab_size, (B, W), generator=g).to(device)  # [B, W]
        hidden = torch.zeros(B, W, H, dtype=target.dtype, device=device)  # [B, W, H]
        own = torch.eye(W, dtype=torch.bool, device=device).expand(B, W, W)  # [B, W, W]

        def level(toks=toks, hidden=hidden, own=own):
            logits, _ = drafter.step(toks, hidden, 1, 0, own)  # [B, W, V]
            return torch.log_softmax(logits.float(), -1).topk(min(top_k, logits.shape[-1]), dim=-1)

        line.append(_timer(level, device, repeats))
    return line


SHAPES = {  # real model shapes a cost model can be measured for with random weights (HF config fields)
    "8b": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,  # CPU-sized, for checks
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
}


def shaped_target(shape: str, device: str, dtype: torch.dtype):
    """(target, EAGLE head) of a named shape with random weights, built on the device (no checkpoint)."""
    from .drafters import EagleHead

    cfg = ModelConfig.from_hf(SHAPES[shape], where=f"--shape {shape}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            target = CausalLM(cfg).eval().requires_grad_(False)
            head = EagleHead(cfg, fc_bias=True).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    for p in list(target.parameters()) + list(head.parameters()):
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    return target, head.attach(target)
