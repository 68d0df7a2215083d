"""The model commands of `adarun`: train-draft, fit-ldlp and bench (Click options and help only).

Torch-free at import: each command imports its implementation from `adaspec_worker` when it runs.
`jobs.cli` adds them to the `adarun` group, under its one exit-code map.
"""

from __future__ import annotations

import json
import sys

import click

from .manifest_schema import ResourcesCfg


@click.command("train-draft")
@click.option(
    "--target", required=True, type=click.Path(exists=True, file_okay=False), help="Target model directory (HF format)."
)
@click.option("--corpus", required=True, help="Glob of text files or Parquet files (use ** for recursion).")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Output directory for the head (EAGLE format)."
)
@click.option("--text-column", default="text", show_default=True, help="Text column of Parquet corpora.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default 2000).")
@click.option("--batch-size", type=int, default=None, help="Blocks per step (default 32).")
@click.option("--seq-len", type=int, default=None, help="Tokens per block (default 512).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 1e-3).")
@click.option("--noise", type=float, default=None, help="Width of uniform noise on input features (default 0.2).")
@click.option(
    "--unroll",
    type=int,
    default=None,
    help="Drafting steps each position trains on its own predictions (default 1: EAGLE's recipe; 3: the training-time"
    " test, for deeper drafts).",
)
@click.option(
    "--unroll-weight", type=float, default=None, help="Step s of the unroll weighs this ** (s-1) (default 0.8)."
)
@click.option("--max-files", type=int, default=None, help="Use at most this many corpus texts.")
@click.option("--max-tokens", type=int, default=None, help="Use at most this many corpus tokens.")
@click.option(
    "--max-seconds", type=float, default=None, help="Stop training after this long (the head is still saved)."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option(
    "--exclude-heldout",
    is_flag=True,
    default=None,
    help="Leave out the shared benchmark's held-out files (1 in 40 by a sha1 rule); off: every file trains.",
)
@click.option(
    "--early-exit",
    type=int,
    default=0,
    show_default=True,
    help="N > 0: train an early-exit head on the target's layer N instead (method eesd), by self-distillation.",
)
@click.option("--no-adapter", is_flag=True, help="With --early-exit: only a norm before the lm_head, no adapter layer.")
@click.option("--quiet", is_flag=True)
def train_draft(target, corpus, out, text_column, quiet, early_exit, no_adapter, **opts):
    """Train an EAGLE-1/2 draft head for TARGET on a corpus; rerun to resume from its checkpoint.
    With --early-exit N: an early-exit head (EESD) on the target's first N layers, for method eesd.

    Every corpus file is used; --exclude-heldout leaves out the benchmark's held-out files (how the
    shipped heads were trained, so they never saw a benchmark prompt's source).

    \b
    Example:
      adarun train-draft --target ../shared/models/pycoder-22m \\
          --corpus '/usr/lib/python3*/**/*.py' --out heads/pycoder-22m --steps 3000
    """
    from adaspec_worker.train.draft_head import DraftTrainConfig
    from adaspec_worker.train.draft_head import train_draft as run

    cfg = DraftTrainConfig(**{k: v for k, v in opts.items() if v is not None})
    if early_exit:
        from adaspec_worker.train.early_exit import train_early_exit

        report = train_early_exit(
            target, corpus, out, cfg, early_exit, not no_adapter, text_column=text_column, progress=not quiet
        )
    else:
        report = run(target, corpus, out, cfg, text_column=text_column, progress=not quiet)
    click.echo(json.dumps({k: report[k] for k in ("steps_run", "train_seconds", "val_before", "val_after")}))


@click.command("fit-ldlp")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False), help="Target model directory.")
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Its EAGLE head.")
@click.option("--corpus", required=True, help="Glob of text or Parquet files; random prefixes become prompts.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory for the LDLP.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--prompts", type=int, default=None, help="Prefixes to decode for labels (default 400).")
@click.option("--new-tokens", type=int, default=None, help="Tokens decoded per prefix (default 96).")
@click.option("--batch-size", type=int, default=None, help="Prefixes decoded together (default 16).")
@click.option("--steps", type=int, default=None, help="Training steps per grid point (default 400).")
@click.option("--lambdas", callback=lambda c, p, v: _csv(float)(c, p, v) if v else None, help="Loss asymmetries "
              "(default 1.5,2,3).")
@click.option("--offsets", callback=lambda c, p, v: _csv(float)(c, p, v) if v else None, help="Rounding thresholds: "
              "length = floor(prediction + offset) (default 0.5,1).")
@click.option("--widths", callback=lambda c, p, v: _csv(int)(c, p, v) if v else None, help="MLP widths (64,128,256).")
@click.option("--k-maxes", callback=lambda c, p, v: _csv(int)(c, p, v) if v else None, help="k_max grid (4,6,8,10).")
@click.option("--batch", type=int, default=None, help="Batch size the simulated tokens/s is for (default 1).")
@click.option("--cost-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A cost model JSON (e.g. from bench.json or shard stats); default: measured here.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def fit_ldlp(target, draft, corpus, out, text_column, **opts):
    """Fit AdaEAGLE's draft-length predictor (LDLP) for TARGET and its head.

    Labels: the accepted length of a greedy EAGLE chain of 10 on corpus prefixes. Width, lambda, k_max and
    the rounding offset are chosen on held-out rounds by simulated tokens/s under the cost model measured
    on this device; the choice, the grid and the cost model go in config.json.

    \b
    Example:
      adarun fit-ldlp --target models/pycoder-tiny --draft models/pycoder-tiny-eagle \\
          --corpus '/usr/lib/python3*/*.py' --out models/pycoder-tiny-ldlp
    """
    from adaspec_worker.train.fit_ldlp import LDLPFitConfig
    from adaspec_worker.train.fit_ldlp import fit_ldlp as run

    cfg = LDLPFitConfig(**{k: v for k, v in opts.items() if v is not None})
    meta = run(target, draft, corpus, out, cfg, text_column=text_column, log=lambda m: click.echo(m, err=True))
    click.echo(
        json.dumps(
            {
                k: meta[k]
                for k in (
                    "k_max",
                    "width",
                    "lambda",
                    "offset",
                    "val_mae",
                    "val_exact_share",
                    "constant_mae",
                    "val_simulated_speed",
                    "best_fixed_k_speed",
                    "oracle_speed",
                )
            }
        )
    )


def _csv(kind):
    return lambda ctx, param, v: tuple(kind(x) for x in v.split(",") if x.strip()) if isinstance(v, str) else v


def _methods(ctx, param, v):
    """Comma-separated methods; commas inside brackets belong to a list value (eesd:lengths=[2,4,8])."""
    if not isinstance(v, str):
        return v
    out, depth, cur = [], 0, ""
    for ch in v + ",":
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out += [cur.strip()] if cur.strip() else []
            cur = ""
        else:
            cur += ch
    return tuple(out)


@click.command("bench")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--draft", type=click.Path(exists=True, file_okay=False), help="EAGLE head for the EAGLE-based methods.")
@click.option(
    "--draft-model",
    type=click.Path(exists=True, file_okay=False),
    help="Small LM: transformers' assistant and the draft-model method.",
)
@click.option(
    "--ldlp", type=click.Path(exists=True, file_okay=False), help="LDLP for adaeagle, adaeagle-ddd, ldlp-tree."
)
@click.option(
    "--early-exit-head",
    type=click.Path(exists=True, file_okay=False),
    help="Early-exit head (adarun train-draft --early-exit N) for eesd.",
)
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False), help="Parquet file of prompts.")
@click.option("--prompt-column", default="prompt", show_default=True)
@click.option(
    "--methods",
    default="eagle2",
    show_default=True,
    callback=_methods,
    help="Comma-separated adarun methods, parameters after colons: eagle2:depth=8:total_tokens=80, "
    "eagle-thompson:lengths=[2,4,8] (none is always run).",
)
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, callback=_csv(int))
@click.option("--temperatures", default="0,0.7", show_default=True, callback=_csv(float))
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--n-prompts", default=16, show_default=True, help="Prompts per cell (at least the batch size).")
@click.option(
    "--repeats", default=3, show_default=True, help="Timed runs per cell (median reported) after one warm-up."
)
@click.option(
    "--baselines",
    default="hf,hf-lookup,hf-assist",
    show_default=True,
    callback=_csv(str),
    help="transformers baselines to run (empty string: none).",
)
@click.option("--hf-prompts", default=2, show_default=True, help="Prompts per transformers cell at batch 1.")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default="bench/results/run", show_default=True, type=click.Path(file_okay=False))
@click.option("--profile", is_flag=True, help="Count CUDA kernels per round per adarun cell (torch.profiler).")
@click.option("--cost-model", is_flag=True, help="Measure the cost model (target pass, draft level): JSON + cost.png.")
@click.option("--shape", default="", help="Also measure the cost model of a random-weight target of this shape (8b).")
@click.option(
    "--workload",
    type=click.Choice(["fixed", "natural"]),
    default="fixed",
    show_default=True,
    help="fixed: exactly --new-tokens per row, EOS ignored; natural: EOS and stop strings on, all --n-prompts "
    "through --batch-sizes slots with continuous batching on and off (occupancy, output lengths).",
)
@click.option(
    "--prefill-chunk",
    default=ResourcesCfg.prefill_chunk,
    show_default=True,
    help="Natural workload: a refill's prompts longer than this prefill that many positions per round (0: at once).",
)
def bench(**opts):
    """Benchmark methods side by side: JSON, Markdown table and PNG plots in --out.

    \b
    Example:
      adarun bench --target ../shared/models/pycoder-22m --draft heads/pycoder-22m-eagle \\
          --prompts ../shared/data/code-prompts.parquet --methods eagle2,adaeagle --ldlp heads/pycoder-22m-ldlp
    """
    from adaspec_worker.bench import BenchConfig, run_bench

    result = run_bench(
        BenchConfig(**opts), sys.argv[2:] if len(sys.argv) > 2 else [], log=lambda m: click.echo(m, err=True)
    )
    click.echo(f"{len(result['cells'])} cells -> {opts['out']}/bench.json, bench.md, speedup.png, tau.png")


MODEL_COMMANDS = [train_draft, fit_ldlp, bench]
