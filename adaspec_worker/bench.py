"""`adarun bench`: every decoding method side by side, in one process, on the same prompts and settings.

Rows: transformers `generate` (plain), transformers assisted generation (prompt lookup; an assistant
model with the `heuristic` schedule; batch 1 only, as transformers allows), adarun `none`, and each
adarun method given. Columns: batch sizes x temperatures. Per cell: output tokens/s, ms per output
token, speedup over adarun `none` and over transformers `generate`, tau, the time split
(`draft_seconds`, `verify_seconds`, `other_seconds`, as `EngineStats` names them), peak GPU memory;
one warm-up run excluded, then the median of `repeats` runs (`timing.measure`). Every row
decodes exactly `new_tokens` tokens (EOS ignored) so cells compare equal work; `--workload natural`
(`bench_natural.py`) instead lets rows stop as a job's do and compares continuous batching on and off.

Writes bench.json (cells + provenance: command line, git commit, device, driver, library versions),
bench.md and PNG plots (speedup vs batch size per method; tau per method).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from jobs.manifest_schema import ResourcesCfg
from jobs.specs import parse_spec

from .bench_natural import add_refill_ratios, natural_cells, natural_markdown
from .decode.build import build_engine
from .decode.engine import Engine
from .decode.model import load_target
from .decode.sampling import SamplingParams
from .decode.stats import EngineStats
from .decode.warmup import warm
from .timing import measure

SPLIT = ("draft_seconds", "verify_seconds", "other_seconds")  # the time split a cell records


@dataclass
class BenchConfig:
    target: str
    draft: str | None = None  # EAGLE head
    draft_model: str | None = None  # small LM: transformers' assistant and adarun's draft-model method
    early_exit_head: str | None = None  # early-exit head (train-draft --early-exit N) for eesd
    ldlp: str | None = None
    prompts: str = ""
    prompt_column: str = "prompt"
    n_prompts: int = 16  # prompts per cell at batch 1 (max(batch, n_prompts) in general)
    max_prompt_tokens: int = 384
    methods: tuple = ("none", "eagle2")
    batch_sizes: tuple = (1, 4, 16, 64)
    temperatures: tuple = (0.0, 0.7)
    new_tokens: int = 128
    repeats: int = 3
    baselines: tuple = ("hf", "hf-lookup", "hf-assist")
    hf_prompts: int = 2
    dtype: str = "auto"
    device: str = "auto"
    out: str = "bench/results/run"
    profile: bool = False  # count CUDA kernels per round per adarun cell (torch.profiler)
    cost_model: bool = False  # measure the cost model (bench_cost.py): bench.json "cost_models", cost.png
    shape: str = ""  # also measure it for a random-weight target of this shape (decode/cost.py SHAPES, e.g. 8b)
    workload: str = "fixed"  # fixed: exactly new_tokens per row, EOS ignored; natural: see bench_natural.py
    prefill_chunk: int = ResourcesCfg.prefill_chunk  # natural workload: a refill's prompt positions per round


def parse_method(text: str) -> tuple[str, dict, str]:
    """'eagle2:depth=8:total_tokens=80' -> ('eagle2', {'depth': 8, 'total_tokens': 80}, label)."""
    import yaml

    name, *kvs = text.split(":")
    params = {}
    for kv in kvs:
        k, _, v = kv.partition("=")
        params[k] = yaml.safe_load(v)
    return name, params, text


# the engine's switches for comparison runs (read where each kernel or policy is chosen, under adaspec_worker/decode):
# a cell's numbers depend on them, so the JSON records those set. An allow-list: other ADARUN_ variables may hold a
# job's storage options, which are never written to disk.
ENGINE_SETTINGS = ("ADARUN_ATTN_SPLITS", "ADARUN_ATTN_SPLIT_PROGRAMS", "ADARUN_COMPILE", "ADARUN_COMPILE_MAX_TOKENS",
                   "ADARUN_COMPILE_ROUND", "ADARUN_DEPTH_POLICY", "ADARUN_TOPK_KERNEL", "ADARUN_TOPK_SPLIT",
                   "ADARUN_TREE_KERNEL")


def provenance(argv: list[str], dev) -> dict:
    def cmd(*a):
        try:
            return subprocess.run(a, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    import transformers

    gpu = driver = None
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name()
        driver = cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()[:1]
        driver = driver[0] if driver else None
    return {"command": " ".join(["adarun", "bench", *argv]),
            "git_commit": os.environ.get("ADARUN_GIT_COMMIT") or cmd("git", "rev-parse", "HEAD") or "unknown",
            "device": str(dev), "gpu": gpu, "driver": driver, "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "engine_settings": {k: os.environ[k] for k in ENGINE_SETTINGS if k in os.environ}}


def load_prompts(cfg: BenchConfig, tok) -> list[list[int]]:
    import pyarrow.parquet as pq

    texts = pq.read_table(cfg.prompts, columns=[cfg.prompt_column]).column(cfg.prompt_column).to_pylist()
    need = max(max(cfg.batch_sizes), cfg.n_prompts)
    ids = [tok(t, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens:] for t in texts if t]
    while len(ids) < need:  # small prompt files: repeat
        ids += ids
    return ids[:need]


def timed(fn, dev, repeats: int) -> dict:
    """One warm-up, then the median of `repeats` synchronised runs; fn() returns the cell's counts."""
    m = measure(fn, dev, warmup=1, repeats=repeats)
    return {"seconds": m.seconds, "all_seconds": m.all_seconds, "peak_mem_mib": m.peak_mem_mib, **m.result}


def bench_adarun(engine: Engine, prompts, B: int, n: int, sampling: SamplingParams) -> dict:
    todo = prompts[: max(B, n)]
    emitted, total = 0, EngineStats()
    for i in range(0, len(todo), B):
        outs, stats = engine.generate(todo[i: i + B], sampling, seeds=list(range(i, i + B)))
        emitted += sum(len(o.tokens) for o in outs)
        total = total + stats
    return {"tokens": emitted, "tau": total.rows.tau if total.rows.rounds else None,
            "draft_seconds": total.draft_seconds, "verify_seconds": total.verify_seconds,
            "other_seconds": total.other_seconds, "prefill_seconds": total.prefill_seconds,
            "warmup_seconds": total.warmup_seconds, "rounds": total.target_passes,
            "reference_seconds": total.reference_seconds,
            "draft_depths": {str(d): n for d, n in sorted(total.rows.draft_lengths.items())}}  # row-rounds per depth


def kernels_per_round(engine: Engine, prompts, B: int, sampling: SamplingParams) -> dict:
    """CUDA kernels per decode round at batch B: two profiled generate() calls of different lengths, so prefill
    and per-call work cancel out (kernels replayed from CUDA graphs count one by one)."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    counts, names, times = [], [], []
    for n in (16, sampling.max_new_tokens):
        engine.generate(prompts[:B], replace(sampling, max_new_tokens=n), seeds=list(range(B)))  # warm this length
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, stats = engine.generate(prompts[:B], replace(sampling, max_new_tokens=n), seeds=list(range(B)))
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        counts.append((len(kernels), stats.target_passes, sum(e.device_time for e in kernels)))
        names.append(Counter(e.name[:100] for e in kernels))
        times.append(Counter())
        for e in kernels:
            times[-1][e.name[:100]] += e.device_time  # us
    (k0, r0, t0), (k1, r1, t1) = counts
    rounds = max(r1 - r0, 1)
    by_name = {name: round((names[1][name] - names[0][name]) / rounds, 2) for name in names[1]}
    by_name = dict(sorted(((k, v) for k, v in by_name.items() if v > 0), key=lambda kv: -kv[1]))
    us = {name: round((times[1][name] - times[0][name]) / rounds, 2) for name in times[1]}
    us = dict(sorted(((k, v) for k, v in us.items() if v > 0), key=lambda kv: -kv[1])[:40])
    return {"kernels_per_round": (k1 - k0) / rounds, "gpu_kernel_ms_per_round": (t1 - t0) / 1e3 / rounds,
            "kernels_by_name": by_name,  # per round, the most frequent first: where the count comes from
            "kernel_us_by_name": us}  # GPU microseconds per round, the 40 costliest names first: where the time goes


def bench_hf(model, prompts, B, n, temperature, new_tokens, dev, **kw) -> dict:
    todo = prompts[: max(B, n)]
    emitted = 0
    for i in range(0, len(todo), B):
        batch = todo[i: i + B]
        L = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long, device=dev)
        att = torch.zeros_like(ids)
        for j, p in enumerate(batch):  # left padding
            ids[j, L - len(p):] = torch.tensor(p, device=dev)
            att[j, L - len(p):] = 1
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=temperature > 0, pad_token_id=0)
        if temperature > 0:
            gen.update(temperature=temperature, top_k=0, top_p=1.0)
        out = model.generate(input_ids=ids, attention_mask=att, **gen, **kw)
        emitted += (out.shape[1] - L) * len(batch)
    return {"tokens": emitted, "tau": None, **dict.fromkeys(SPLIT)}


def run_bench(cfg: BenchConfig, argv: list[str], log=print) -> dict:
    from transformers import AutoTokenizer

    from .decode.model import resolve_device

    dev = torch.device(resolve_device(cfg.device))
    torch.manual_seed(0)
    assert cfg.workload in ("fixed", "natural"), f"unknown workload {cfg.workload!r}"
    tok = AutoTokenizer.from_pretrained(cfg.target)
    prompts = load_prompts(cfg, tok)
    target = load_target(cfg.target, cfg.dtype, str(dev))
    cells: list[dict] = []
    meta = provenance(argv, dev)
    log(json.dumps(meta))

    def record(method, label, B, T, res, kind):
        res.update(method=method, label=label, batch=B, temperature=T, kind=kind,
                   tokens_per_s=res["tokens"] / res["seconds"], ms_per_token=1e3 * res["seconds"] / res["tokens"])
        cells.append(res)
        tau = res["tau"] if res["tau"] is None else round(res["tau"], 2)
        log(f"{label:32s} B={B:<3d} T={T:<4} {res['tokens_per_s']:10.1f} tok/s  {res['ms_per_token']:8.3f} ms/tok  "
            f"tau={tau}")

    extra = {}
    if cfg.cost_model or cfg.shape:
        from .bench_cost import cost_section

        extra["cost_models"] = cost_section(cfg, target, dev, cfg.out, log)
    if cfg.baselines and cfg.workload == "fixed":
        bench_transformers(cfg, prompts, dev, record)
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the transformers models are gone with bench_transformers' frame
    cost = None  # the measured cost model, handed to every engine's policy (as the worker does at warm-up)
    if extra:
        from .decode.cost import CostModel

        cost = CostModel.from_json(extra["cost_models"]["models"]["target"])
    for label in ["none"] + [m for m in cfg.methods if m != "none"]:
        if cfg.workload == "natural":
            name, engine = method_engine(cfg, target, label, cost)
            natural_cells(cfg, engine, name, label, prompts, tok, eos_ids(target, tok), dev, record, timed, cells)
        else:
            bench_method(cfg, target, label, prompts, dev, record, cost)
        write_outputs({"meta": meta, "config": {}, "cells": cells, "partial": True, **extra}, cfg.out)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    result = {"meta": meta, "config": config, "cells": cells, **extra}
    write_outputs(result, cfg.out)
    return result


def eos_ids(target, tok) -> tuple[int, ...]:
    """The target's end-of-sequence tokens (its config's, else the tokenizer's)."""
    return tuple(target.cfg.eos_token_ids or ((tok.eos_token_id,) if tok.eos_token_id is not None else ()))


def bench_transformers(cfg: BenchConfig, prompts, dev, record) -> None:
    """transformers `generate`, prompt lookup and assisted generation (the last two at batch 1 only)."""
    from transformers import AutoModelForCausalLM

    from .decode.model import resolve_dtype

    hf = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=resolve_dtype(cfg.dtype, str(dev))).to(dev).eval()
    assistant = None
    if "hf-assist" in cfg.baselines and cfg.draft_model:
        assistant = AutoModelForCausalLM.from_pretrained(cfg.draft_model, dtype=hf.dtype).to(dev).eval()
        assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
    for T in cfg.temperatures:
        for B in cfg.batch_sizes:
            kinds = [("hf-generate", {})]
            if B == 1 and "hf-lookup" in cfg.baselines:
                kinds.append(("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10}))
            if B == 1 and assistant is not None:
                kinds.append(("hf-assisted", {"assistant_model": assistant}))
            n = cfg.hf_prompts if B == 1 else B
            for name, kw in kinds:
                run = lambda B=B, T=T, n=n, kw=kw: bench_hf(hf, prompts, B, n, T, cfg.new_tokens, dev, **kw)
                with torch.inference_mode():
                    res = timed(run, dev, cfg.repeats)
                record(name, name, B, T, res, "transformers")


def method_engine(cfg: BenchConfig, target, label: str, cost=None) -> tuple[str, Engine]:
    """The method name of a `parse_method` label, and its engine over `target` (with the measured cost model)."""
    name, params, _ = parse_method(label)
    spec = parse_spec(name, params)
    draft = {"draft-model": cfg.draft_model, "early-exit": cfg.early_exit_head}.get(spec.drafter_kind, cfg.draft)
    return name, build_engine(target, spec, draft=draft, ldlp=cfg.ldlp, cost=cost)


def bench_method(cfg: BenchConfig, target, label: str, prompts, dev, record, cost=None) -> None:
    """One adarun method (a `parse_method` label) over every batch size and temperature."""
    name, engine = method_engine(cfg, target, label, cost)
    for T in cfg.temperatures:
        sampling = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=T)
        for B in cfg.batch_sizes:
            calls: list[dict] = []  # every run's counts: the first is the untimed warm-up

            def run(B=B, sampling=sampling, calls=calls):
                calls.append(bench_adarun(engine, prompts, B, cfg.n_prompts, sampling))
                return calls[-1]
            warmed = warm(engine, B, sampling, max(map(len, prompts[: max(B, cfg.n_prompts)])))  # every shape
            res = timed(run, dev, cfg.repeats)
            res["warm_seconds"] = warmed  # decode/warmup.py: compile, capture and time every round shape
            res["warmup_run_seconds"] = calls[0]["warmup_seconds"]  # compile + capture met in the warm-up run
            res["seconds"] -= res["reference_seconds"]  # the oracle's reference verification is not charged to it
            if cfg.profile and dev.type == "cuda":
                res.update(kernels_per_round(engine, prompts, B, sampling))
            record(name, label, B, T, res, "adarun")


def add_ratios(cells: list[dict]) -> None:
    """Speedups and memory as ratios within this run (same batch size and temperature)."""
    for c in cells:
        def same(label, c=c):
            return next((x for x in cells if x["label"] == label and x["batch"] == c["batch"]
                         and x["temperature"] == c["temperature"] and x.get("refill") == c.get("refill")), None)
        base, hfg = same("none"), same("hf-generate")
        c["speedup_vs_none"] = c["tokens_per_s"] / base["tokens_per_s"] if base else None
        c["speedup_vs_hf_generate"] = c["tokens_per_s"] / hfg["tokens_per_s"] if hfg else None
        has_mem = base and c["peak_mem_mib"] and base["peak_mem_mib"]
        c["mem_vs_none"] = c["peak_mem_mib"] / base["peak_mem_mib"] if has_mem else None


def write_outputs(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    add_ratios(result["cells"])
    add_refill_ratios(result["cells"])
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown(result))
    plots(result, out)


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    where = m["gpu"] or m["cpu"]
    lines = [f"# adarun bench: {where}", "",
             f"`{m['command']}`  ",
             f"commit `{m['git_commit']}`, device {m['device']} ({where}, driver {m['driver']}), "
             f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}, {m['date']}"
             + "".join(f", {k}={v}" for k, v in m.get("engine_settings", {}).items()), "",
             "| method | batch | temp | tok/s | ms/tok | vs none | vs HF generate | tau | draft/verify/other s "
             "| prefill s | warm-up s | kernels/round | peak MiB | mem vs none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda c: (c["temperature"], c["batch"], c["kind"] != "transformers", c["label"])
    for c in sorted((c for c in result["cells"] if c["kind"] != "natural"), key=order):
        split = "" if c.get("draft_seconds") is None else "/".join(f"{c[k]:.2f}" for k in SPLIT)
        lines.append(f"| {c['label']} | {c['batch']} | {c['temperature']} | {c['tokens_per_s']:.1f} | "
                     f"{c['ms_per_token']:.3f} | {_f(c['speedup_vs_none'])} | {_f(c['speedup_vs_hf_generate'])} | "
                     f"{_f(c['tau'])} | {split} | {_f(c.get('prefill_seconds'))} | {_f(c.get('warmup_run_seconds'))} | "
                     f"{_f(c.get('kernels_per_round'), '{:.0f}')} | {_f(c['peak_mem_mib'], '{:.0f}')} | "
                     f"{_f(c['mem_vs_none'])} |")
    return "\n".join(lines + natural_markdown(result["cells"])) + "\n"


def plots(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["kind"] == "adarun"]
    if not cells:  # a natural-workload run: its table says it all
        return
    temps = sorted({c["temperature"] for c in cells})
    _speedup_plot(plt, cells, temps, os.path.join(out, "speedup.png"))
    _tau_plot(plt, cells, temps, os.path.join(out, "tau.png"))


def _speedup_plot(plt, cells: list[dict], temps: list[float], path: str) -> None:
    """Speedup over adarun none against batch size, one panel per temperature."""
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    names = list(dict.fromkeys(c["label"] for c in cells))
    if len(names) <= 20:
        colors = plt.cm.tab20(range(len(names)))
    else:
        colors = plt.cm.viridis([i / len(names) for i in range(len(names))])
    markers = "os^Dvx*P<>hX"
    for ax, T in zip(axes[0], temps):
        for i, label in enumerate(names):  # a distinct colour and marker per method
            pts = sorted((c["batch"], c["speedup_vs_none"]) for c in cells
                         if c["label"] == label and c["temperature"] == T)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], color=colors[i],
                        label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="batch size", ylabel="speedup over adarun none", title=f"temperature {T}")
    # the legend of the panel with every method
    handles = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))
    axes[0][-1].legend(*handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tau_plot(plt, cells: list[dict], temps: list[float], path: str) -> None:
    """tau per method at the smallest batch size, one bar per temperature."""
    fig, ax = plt.subplots(figsize=(7, 4))
    smallest = min(c["batch"] for c in cells)
    spec = [c for c in cells if c["tau"] is not None and c["batch"] == smallest]
    labels = list(dict.fromkeys(c["label"] for c in spec))
    for j, T in enumerate(temps):
        vals = [next((c["tau"] for c in spec if c["label"] == lab and c["temperature"] == T), 0) for lab in labels]
        ax.bar([i + 0.4 * j for i in range(len(labels))], vals, width=0.4, label=f"T={T}")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="tau (tokens per target pass)", title="tau per method (smallest batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
