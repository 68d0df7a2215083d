"""`adarun bench`: every decoding method side by side, in one process, on the same prompts and settings.

Rows: transformers `generate` (plain), transformers assisted generation (prompt lookup; an assistant
model with the `heuristic` schedule; batch 1 only, as transformers allows), adarun `none`, and each
adarun method given. Columns: batch sizes x temperatures. Per cell: output tokens/s, ms per output
token, speedup over adarun `none` and over transformers `generate`, tau, the draft/verify/other time
split, peak GPU memory; one warm-up run excluded, then the median of `repeats` runs. Every row
decodes exactly `new_tokens` tokens (EOS ignored) so cells compare equal work.

Writes bench.json (cells + provenance: command line, git commit, device, driver, library versions),
bench.md and PNG plots (speedup vs batch size per method; tau per method).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .decode.engine import Engine
from .decode.model import load_target
from .decode.sampling import SamplingParams


@dataclass
class BenchConfig:
    target: str
    draft: str | None = None  # EAGLE head
    draft_model: str | None = None  # small LM: transformers' assistant and adarun's draft-model method
    ldlp: str | None = None
    prompts: str = ""
    prompt_column: str = "prompt"
    n_prompts: int = 8  # prompts per cell at batch 1 (max(batch, n_prompts) in general)
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


def parse_method(text: str) -> tuple[str, dict, str]:
    """'eagle2:depth=8:total_tokens=80' -> ('eagle2', {'depth': 8, 'total_tokens': 80}, label)."""
    import yaml

    name, *kvs = text.split(":")
    params = {}
    for kv in kvs:
        k, _, v = kv.partition("=")
        params[k] = yaml.safe_load(v)
    return name, params, text


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


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
            "git_commit": cmd("git", "rev-parse", "HEAD") or os.environ.get("ADARUN_GIT_COMMIT", "unknown"),
            "device": str(dev), "gpu": gpu, "driver": driver, "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load_prompts(cfg: BenchConfig, tok) -> list[list[int]]:
    import pyarrow.parquet as pq

    texts = pq.read_table(cfg.prompts, columns=[cfg.prompt_column]).column(cfg.prompt_column).to_pylist()
    need = max(max(cfg.batch_sizes), cfg.n_prompts)
    ids = [tok(t, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens:] for t in texts if t]
    while len(ids) < need:  # small prompt files: repeat
        ids += ids
    return ids[:need]


class Timer:
    """Median of repeated timed runs after one warm-up; also the engine's phase split and peak memory."""

    def __init__(self, dev, repeats):
        self.dev, self.repeats = dev, repeats

    def run(self, fn) -> dict:
        fn()  # warm-up (graph capture, allocator, kernels)
        times, extra = [], []
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(self.repeats):
            _sync(self.dev)
            t = time.perf_counter()
            info = fn()
            _sync(self.dev)
            times.append(time.perf_counter() - t)
            extra.append(info)
        i = times.index(statistics.median(times))
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.dev.type == "cuda" else None
        return {"seconds": times[i], "all_seconds": times, "peak_mem_mib": peak, **extra[i]}


def bench_adarun(eng: Engine, prompts, B: int, n: int, sp: SamplingParams) -> dict:
    todo = prompts[: max(B, n)]
    emitted, rounds, acc, split = 0, 0, 0, {"draft": 0.0, "verify": 0.0, "other": 0.0}
    for i in range(0, len(todo), B):
        outs, st = eng.generate(todo[i: i + B], sp, seeds=list(range(i, i + B)))
        emitted += sum(len(o.tokens) for o in outs)
        rounds += st.seq.rounds
        acc += st.seq.accepted
        for k in split:
            split[k] += getattr(st, f"{k}_s")
    return {"tokens": emitted, "tau": (acc + rounds) / rounds if rounds else None, "split_seconds": split}


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
    return {"tokens": emitted, "tau": None, "split_seconds": None}


def run_bench(cfg: BenchConfig, argv: list[str], log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .decode.model import resolve_device, resolve_dtype

    dev = torch.device(resolve_device(cfg.device))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(cfg.target)
    prompts = load_prompts(cfg, tok)
    target = load_target(cfg.target, cfg.dtype, str(dev))
    timer = Timer(dev, cfg.repeats)
    cells = []
    meta = provenance(argv, dev)
    log(json.dumps(meta))

    def record(method, label, B, T, res, kind):
        res.update(method=method, label=label, batch=B, temperature=T, kind=kind,
                   tokens_per_s=res["tokens"] / res["seconds"], ms_per_token=1e3 * res["seconds"] / res["tokens"])
        cells.append(res)
        log(f"{label:32s} B={B:<3d} T={T:<4} {res['tokens_per_s']:10.1f} tok/s  {res['ms_per_token']:8.3f} ms/tok  "
            f"tau={res['tau'] if res['tau'] is None else round(res['tau'], 2)}")

    # transformers baselines
    if cfg.baselines:
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
                for name, kw in kinds:
                    with torch.inference_mode():
                        res = timer.run(lambda: bench_hf(hf, prompts, B, cfg.hf_prompts if B == 1 else B,
                                                         T, cfg.new_tokens, dev, **kw))
                    record(name, name, B, T, res, "transformers")
        del hf, assistant
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    labels = ["none"] + [m for m in cfg.methods if m != "none"]
    for label in labels:
        name, params, _ = parse_method(label)
        eng = Engine.load(target, name, params, cfg.draft_model if name == "draft-model" else cfg.draft, cfg.ldlp)
        for T in cfg.temperatures:
            if name == "oracle" and T > 0:
                continue
            sp = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=T)
            for B in cfg.batch_sizes:
                res = timer.run(lambda: bench_adarun(eng, prompts, B, cfg.n_prompts, sp))
                record(name, label, B, T, res, "adarun")
        del eng
        write_outputs({"meta": meta, "config": {}, "cells": cells, "partial": True}, cfg.out)  # keep what is measured
    result = {"meta": meta, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, "cells": cells}
    write_outputs(result, cfg.out)
    return result


def add_ratios(cells: list[dict]) -> None:
    """Speedups and memory as ratios within this run (same batch size and temperature)."""
    for c in cells:
        same = lambda lab: next((x for x in cells if x["label"] == lab and x["batch"] == c["batch"] and x["temperature"] == c["temperature"]), None)  # noqa: E731
        base, hfg = same("none"), same("hf-generate")
        c["speedup_vs_none"] = c["tokens_per_s"] / base["tokens_per_s"] if base else None
        c["speedup_vs_hf_generate"] = c["tokens_per_s"] / hfg["tokens_per_s"] if hfg else None
        c["mem_vs_none"] = c["peak_mem_mib"] / base["peak_mem_mib"] if base and c["peak_mem_mib"] and base["peak_mem_mib"] else None


def write_outputs(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    add_ratios(result["cells"])
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown(result))
    plots(result, out)


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# adarun bench: {m['gpu'] or m['cpu']}", "",
             f"`{m['command']}`  ", f"commit `{m['git_commit']}`, device {m['device']} ({m['gpu'] or m['cpu']}, driver {m['driver']}), "
             f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}, {m['date']}", "",
             "| method | batch | temp | tok/s | ms/tok | vs none | vs HF generate | tau | draft/verify/other s | peak MiB | mem vs none |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(result["cells"], key=lambda c: (c["temperature"], c["batch"], c["kind"] != "transformers", c["label"])):
        sp = c["split_seconds"]
        split = "" if not sp else "/".join(f"{sp[k]:.2f}" for k in ("draft", "verify", "other"))
        lines.append(f"| {c['label']} | {c['batch']} | {c['temperature']} | {c['tokens_per_s']:.1f} | {c['ms_per_token']:.3f} | "
                     f"{_f(c['speedup_vs_none'])} | {_f(c['speedup_vs_hf_generate'])} | {_f(c['tau'])} | {split} | "
                     f"{_f(c['peak_mem_mib'], '{:.0f}')} | {_f(c['mem_vs_none'])} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["kind"] == "adarun"]
    temps = sorted({c["temperature"] for c in cells})
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    names = list(dict.fromkeys(c["label"] for c in cells))
    colors = plt.cm.tab20(range(len(names))) if len(names) <= 20 else plt.cm.viridis([i / len(names) for i in range(len(names))])
    markers = "os^Dvx*P<>hX"
    for ax, T in zip(axes[0], temps):
        for i, label in enumerate(names):  # a distinct colour and marker per method
            pts = sorted((c["batch"], c["speedup_vs_none"]) for c in cells if c["label"] == label and c["temperature"] == T)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], color=colors[i], label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="batch size", ylabel="speedup over adarun none", title=f"temperature {T}")
    handles = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))  # the panel with every method
    axes[0][-1].legend(*handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speedup.png"), dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    spec = [c for c in cells if c["tau"] is not None and c["batch"] == min(c2["batch"] for c2 in cells)]
    labels = list(dict.fromkeys(c["label"] for c in spec))
    for j, T in enumerate(temps):
        vals = [next((c["tau"] for c in spec if c["label"] == lab and c["temperature"] == T), 0) for lab in labels]
        ax.bar([i + 0.4 * j for i in range(len(labels))], vals, width=0.4, label=f"T={T}")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="tau (tokens per target forward)", title="Mean accepted length per method (smallest batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tau.png"), dpi=90)
    plt.close(fig)
