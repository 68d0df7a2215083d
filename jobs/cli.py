"""The `adarun` command: job commands (submit, resume, status, report) and model commands (train-draft,
fit-ldlp, bench). Exit codes, one map for every command: 0 done, 1 job failed, 2 bad usage or input.

Bad input never produces a traceback: manifest, plan, conflict and model-loading errors print one line
naming the field or file and exit 2 (`EXIT_CODES`). Torch-free at import: the model commands and the
worker class are imported from `adaspec_worker` only when a command runs (the CLI is the one place
that wires the two sides together).
"""

from __future__ import annotations

import json
import sys

import click

from .controller import JobConflict, JobFailed, plan_job, run_job
from .layout import ShardFiles, total
from .manifest import ManifestError, load_manifest, manifest_from_dict
from .plan import PlanError
from .progress import Progress
from .specs import SpecError
from .storage import Store

# exception type -> (exit code, prefix); first match wins. ValueError covers the model side's
# ModelLoadError and bad option values; anything else is a bug and keeps its traceback.
EXIT_CODES: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    ((JobFailed,), 1, "job failed"),
    ((ManifestError, PlanError, JobConflict, SpecError, FileNotFoundError, ValueError), 2, "error"),
]


def fail(e: BaseException | str, code: int = 2, prefix: str = "error"):
    click.echo(f"adarun: {prefix}: {e}", err=True)
    sys.exit(code)


class AdarunGroup(click.Group):
    """Runs every command under the one exit-code map."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except tuple(t for types, _, _ in EXIT_CODES for t in types) as e:
            code, prefix = next((c, p) for types, c, p in EXIT_CODES if isinstance(e, types))
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code, prefix)


@click.group(cls=AdarunGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ADARUN"})
@click.version_option(package_name="adarun")
def cli():
    """adarun: batch generation over Parquet prompts with adaptive speculative decoding on Ray.

    \b
    Example:
      adarun submit manifests/job.yaml
      adarun status out/job
    """


def main():
    sys.exit(cli.main(standalone_mode=True))


# ------------------------------------------------------------------ job commands


def _run(m, force: bool, dry_run: bool):
    if dry_run:
        click.echo(json.dumps(plan_job(m).describe(m), indent=2))
        return
    from adaspec_worker.worker import ShardWorker

    with Progress(m) as progress:
        state = run_job(m, ShardWorker, force=force, listener=progress.on_event)
    total_shards = len(state.plan)
    click.echo(
        f"{m.name}: {state.skipped + state.committed}/{total_shards} shards committed "
        f"({state.skipped} skipped as already committed, {state.committed} run now, {len(state.retries)} retried); "
        f"rows {state.rows}, error rows {state.error_rows}, completion tokens {state.completion_tokens}; "
        f"output {m.output.path}"
    )


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option(
    "--output", envvar="ADARUN_OUTPUT", help="Output URL or path (overrides output.path). Env: ADARUN_OUTPUT."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    envvar="ADARUN_SET",
    metavar="KEY=VALUE",
    help="Override a manifest field, e.g. decoding.temperature=0.7. Env: ADARUN_SET (space-separated).",
)
@click.option("--dry-run", is_flag=True, help="Print the shard plan and exit.")
@click.option("--force", is_flag=True, help="Discard another job's shards found in the output.")
def submit(manifest, output, overrides, dry_run, force):
    """Run a job: shard the input, decode on Ray actors, commit Parquet shards.

    \b
    Example:
      adarun submit manifests/job.yaml --set decoding.temperature=0.7 --output s3://bucket/run1
    Rerunning the same command resumes: committed shards are skipped.
    """
    sets = list(overrides) + ([f"output.path={output}"] if output else [])
    _run(load_manifest(manifest, sets), force, dry_run)


def _open_job(output: str, storage_options: dict | None = None) -> tuple[ShardFiles, dict]:
    files = ShardFiles(Store(output, storage_options or {}))
    doc = files.job()
    if doc is None:
        fail(f"{output}: no job.json (not an adarun output)")
    return files, doc


@cli.command()
@click.argument("output")
def resume(output):
    """Resume the job recorded in OUTPUT/job.json, skipping committed shards.

    \b
    Example:
      adarun resume out/job
    """
    _, doc = _open_job(output)
    _run(manifest_from_dict(doc["manifest"]), force=False, dry_run=False)


def job_status(files: ShardFiles, doc: dict) -> dict:
    """Progress of a job from its committed shards: counts, tokens, ETA, and the report's headline once any is done."""
    plan = doc["plan"]
    commits = files.committed()
    stats = [s for s in files.committed_stats() if s.shard in commits]
    t = total(stats)
    done_rows = sum(p["rows"] for p in plan if p["index"] in commits)
    total_rows = sum(p["rows"] for p in plan)
    eta = None
    if len(commits) >= 2 and done_rows < total_rows:
        last = max(c.committed_at for c in commits.values())
        rate = done_rows / max(last - t.started_at, 1e-9)
        eta = (total_rows - done_rows) / rate if rate > 0 else None
    out = {
        "name": doc["name"],
        "job_hash": doc["job_hash"],
        "shards_done": len(commits),
        "shards_total": len(plan),
        "rows": t.rows,
        "error_rows": t.error_rows,
        "input_rows_done": done_rows,
        "input_rows_total": total_rows,
        "completion_tokens": t.completion_tokens,
        "prompt_tokens": t.prompt_tokens,
        "eta_seconds": eta,
        "complete": len(commits) == len(plan),
    }
    if stats:
        from .report import load_run, summarize

        rep = summarize(load_run(files))
        out.update({k: rep[k] for k in ("cost_usd", "completion_tokens_per_second", "tau", "measured_speedup")})
    return out


@cli.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(output, as_json):
    """Show a job's progress: shards done/total, rows, tokens, errors, ETA.

    \b
    Example:
      adarun status out/job --json
    """
    files, doc = _open_job(output)
    s = job_status(files, doc)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    eta = "done" if s["complete"] else (f"{s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else "unknown")
    click.echo(
        f"{s['name']}: shards {s['shards_done']}/{s['shards_total']}, rows {s['rows']} (+{s['error_rows']} errors) "
        f"of {s['input_rows_total']}, completion tokens {s['completion_tokens']}, ETA {eta}"
    )
    if "cost_usd" in s:
        tps, tau, sp = s["completion_tokens_per_second"], s["tau"], s["measured_speedup"]
        click.echo(
            f"  cost ${s['cost_usd']:.4f}, {tps or 0:.1f} tok/s, tau {tau or 0:.2f}, "
            f"measured speedup {'n/a' if sp is None else f'{sp:.2f}x'}"
        )


@cli.command()
@click.argument("outputs", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["md", "html", "json"]),
    default="md",
    show_default=True,
    help="What to print; all three files are written under OUTPUT/report/ either way.",
)
def report(outputs, fmt):
    """Cost and speedup report of a run (OUTPUT), or two runs side by side (A B).

    \b
    Examples:
      adarun report out/quickstart
      adarun report out/last-night out/tonight
    """
    from .report import compare_md, write_report

    if len(outputs) > 2:
        fail("report takes one output, or two to compare")
    reps, opened = [], []
    for out in outputs:
        files, _ = _open_job(out)
        if not files.committed():
            fail(f"{out}: no committed shards yet")
        reps.append(write_report(files))
        opened.append(files)
    if len(reps) == 2:
        click.echo(compare_md(*reps))
        return
    if fmt == "json":
        click.echo(json.dumps(reps[0], indent=2, default=str))
    elif fmt == "md":
        click.echo(opened[0].read_report_file("report.md").decode())
    else:
        click.echo(opened[0].report_path("report.html"))


# ------------------------------------------------------------------ model commands


@cli.command("train-draft")
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
@click.option("--max-files", type=int, default=None, help="Use at most this many corpus texts.")
@click.option("--max-tokens", type=int, default=None, help="Use at most this many corpus tokens.")
@click.option(
    "--max-seconds", type=float, default=None, help="Stop training after this long (the head is still saved)."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
def train_draft(target, corpus, out, text_column, quiet, **opts):
    """Train an EAGLE-1/2 draft head for TARGET on a corpus; rerun to resume from its checkpoint.

    Held-out files (shared README's sha1 rule) are always left out.

    \b
    Example:
      adarun train-draft --target ../shared/models/pycoder-22m \\
          --corpus '/usr/lib/python3*/**/*.py' --out heads/pycoder-22m --steps 3000
    """
    from adaspec_worker.train.draft_head import DraftTrainConfig
    from adaspec_worker.train.draft_head import train_draft as run

    cfg = DraftTrainConfig(**{k: v for k, v in opts.items() if v is not None})
    report = run(target, corpus, out, cfg, text_column=text_column, progress=not quiet)
    click.echo(json.dumps({k: report[k] for k in ("steps_run", "train_seconds", "val_before", "val_after")}))


@cli.command("fit-ldlp")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False), help="Target model directory.")
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Its EAGLE head.")
@click.option("--corpus", required=True, help="Glob of text or Parquet files; random prefixes become prompts.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory for the LDLP.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--prompts", type=int, default=None, help="Prefixes to decode for labels (default 400).")
@click.option("--new-tokens", type=int, default=None, help="Tokens decoded per prefix (default 96).")
@click.option("--batch-size", type=int, default=None, help="Prefixes decoded together (default 16).")
@click.option(
    "--draft-cost",
    type=float,
    default=None,
    help="Draft step cost relative to a verification pass, for selection (default 0.15).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def fit_ldlp(target, draft, corpus, out, text_column, **opts):
    """Fit AdaEAGLE's draft-length predictor (LDLP) for TARGET and its head.

    Labels: the accepted length of a greedy EAGLE chain of 10 on corpus prefixes. Width, lambda and
    k_max are chosen on held-out rounds; the choice and its validation scores go in config.json.

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


@cli.command("bench")
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
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False), help="Parquet file of prompts.")
@click.option("--prompt-column", default="prompt", show_default=True)
@click.option(
    "--methods",
    default="eagle2",
    show_default=True,
    callback=_csv(str),
    help="Comma-separated adarun methods, parameters after colons: eagle2:depth=8:total_tokens=80 "
    "(none is always run).",
)
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, callback=_csv(int))
@click.option("--temperatures", default="0,0.7", show_default=True, callback=_csv(float))
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--n-prompts", default=8, show_default=True, help="Prompts per cell (at least the batch size).")
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
