"""`adarun bench --cost-model [--shape 8b]`: the measured cost curves, and what the shape policy makes of them.

Measures `decode.cost.CostModel` for the bench's target and its EAGLE head, and with `--shape NAME` for a
random-weight target of a real shape built on the device (`cost.SHAPES`, e.g. `8b`), over the bench's batch
sizes. For each model and batch size it records the shape the policy would pick (expected tokens per second,
`policy.ShapePolicy`, at a few acceptance levels), so a memory-bound model is shown to draft differently
from a kernel-bound one. Writes `cost.png` (target pass and draft level time against tokens / width, one
line per batch size, per model) and returns the JSON section `cost_models` of bench.json.

Knows nothing of the method cells: `bench.py` calls `cost_section` and stores what it returns.
"""

from __future__ import annotations

import os

import torch

from jobs.specs import parse_spec

from .decode.build import build_engine
from .decode.cost import CostModel, measure_cost, shaped_target
from .decode.policy import ShapePolicy, menu

ACCEPT_LEVELS = (0.5, 0.7, 0.85)  # per-level acceptance the policy choices are shown at
POLICY_MENU = dict(max_depth=8, width=8, nodes_per_level=8)  # an eagle2-like menu (ldlp-tree's defaults)


def policy_choices(cost: CostModel, batches) -> list[dict]:
    """The shape of highest expected tokens/s (greedy) per batch size and acceptance level, and its rate."""
    shapes = menu(**POLICY_MENU)
    out = []
    for accept in ACCEPT_LEVELS:
        policy = ShapePolicy(shapes, accept, cost)
        for B in batches:
            rate = {s: policy.expected_rate(B, ("greedy",), s) for s in shapes}
            best = max(shapes, key=rate.get)
            out.append(
                {
                    "accept": accept,
                    "batch": B,
                    "depth": best.depth,
                    "nodes": best.nodes,
                    "speedup_vs_none": rate[best] / rate[shapes[0]],
                }
            )
    return out


def cost_section(cfg, target, dev: torch.device, out: str, log=print) -> dict:
    """Measure the cost models, plot them, and return {"models": {...}, "policy": {...}}."""
    drafter = build_engine(target, parse_spec("eagle", {}), draft=cfg.draft).drafter if cfg.draft else None
    models = {
        "target": measure_cost(
            target, drafter, name=os.path.basename(cfg.target.rstrip("/")), batches=tuple(cfg.batch_sizes)
        )
    }
    log(f"cost model of the target measured in {models['target'].measure_seconds:.1f}s")
    if cfg.shape:
        big, head = shaped_target(cfg.shape, str(dev), target.dtype)
        if dev.type == "cuda":
            big.fuse()
            head.fuse()
        models[cfg.shape] = measure_cost(big, head, name=f"random {cfg.shape}", batches=tuple(cfg.batch_sizes))
        log(f"cost model of the {cfg.shape} shape measured in {models[cfg.shape].measure_seconds:.1f}s")
        del big, head
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    plot_costs(models, os.path.join(out, "cost.png"))
    return {
        "models": {k: m.to_json() for k, m in models.items()},
        "policy": {k: policy_choices(m, cfg.batch_sizes) for k, m in models.items()},
    }


def plot_costs(models: dict[str, CostModel], path: str) -> None:
    """Two panels: target pass (ms) against tokens per row, draft level (ms) against width; a line per batch size,
    a line style per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ("-", "--", ":", "-.")
    for j, (label, m) in enumerate(models.items()):
        for i, B in enumerate(m.batches):
            color = plt.cm.viridis(i / max(len(m.batches) - 1, 1))
            axes[0].plot(
                m.tokens,
                [1e3 * v for v in m.target_s[i]],
                styles[j % 4],
                marker="o",
                color=color,
                label=f"{label} B={B}",
            )
            if any(m.draft_s[i]):
                axes[1].plot(
                    m.widths,
                    [1e3 * v for v in m.draft_s[i]],
                    styles[j % 4],
                    marker="s",
                    color=color,
                    label=f"{label} B={B}",
                )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="tokens per row",
        ylabel="ms per target pass",
        title="target pass (verification)",
    )
    axes[1].set(xscale="log", yscale="log", xlabel="nodes per row", ylabel="ms per draft level", title="draft level")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
