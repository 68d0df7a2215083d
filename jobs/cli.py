"""The `adarun` command: job commands (submit, resume, status, report) and model commands (train-draft,
fit-ldlp, bench). Exit codes, one map for every command: 0 done, 1 job failed, 2 bad usage or input.

Bad input never produces a traceback: manifest, plan, conflict and model-loading errors print one line
naming the field or file and exit 2 (`EXIT_CODES`). Torch-free at import: the model commands and the
worker class are imported from `adaspec_worker` only when a command runs (the CLI is the one place
that wires the two sides together).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from .controller import JobConflict, JobFailed, open_output, preflight, run_job
from .credentials import MASK
from .dispatch import Unplaceable
from .layout import ShardFiles
from .lease import LeaseHeld
from .manifest import ManifestError, load_manifest, manifest_from_dict
from .model_commands import MODEL_COMMANDS
from .plan import PlanError
from .progress import DEFAULT_INTERVAL_S, Progress, startup_lines
from .shard_stats import total
from .specs import SpecError
from .storage import StorageError, Store

# exception type -> (exit code, prefix); first match wins. ValueError covers the model side's
# ModelLoadError and bad option values; anything else is a bug and keeps its traceback.
EXIT_CODES: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    ((JobFailed,), 1, "job failed"),
    (
        (ManifestError, PlanError, JobConflict, LeaseHeld, Unplaceable, SpecError, FileNotFoundError, ValueError),
        2,
        "error",
    ),
]


def fail(e: BaseException | str, code: int = 2, prefix: str = "error"):
    click.echo(f"adarun: {prefix}: {e}", err=True)
    sys.exit(code)


class AdarunGroup(click.Group):
    """Runs every command under the one exit-code map."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StorageError as e:  # exit 2 when the manifest is at fault (path, credentials), 1 when the store is
            fail(e, e.code, "error" if e.code == 2 else "storage unavailable")
        except KeyboardInterrupt:
            _stop_local_ray()
            fail("interrupted; committed shards are kept (rerun the same command to resume)", 130, "stopped")
        except tuple(t for types, _, _ in EXIT_CODES for t in types) as e:
            code, prefix = next((c, p) for types, c, p in EXIT_CODES if isinstance(e, types))
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code, prefix)


@click.group(cls=AdarunGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ADARUN"})
@click.version_option(package_name="adarun")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Log level of adarun's own messages (stderr). Env: ADARUN_LOG_LEVEL.",
)
def cli(log_level):
    """adarun: batch generation over Parquet prompts with adaptive speculative decoding on Ray.

    \b
    Example:
      adarun submit manifests/job.yaml
      adarun status out/job
    """

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("adarun").setLevel(log_level.upper())
    if log_level.lower() != "debug":  # third-party chatter on every run: Ray's banners, transformers' warnings
        for name in ("ray", "transformers", "urllib3", "fsspec", "botocore", "matplotlib"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main():
    sys.exit(cli.main(standalone_mode=True))


def _stop_local_ray() -> None:
    """After an interrupt: stop the Ray this process started (a cluster it merely joined keeps running)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # best effort on the way out
        pass


# ------------------------------------------------------------------ job commands


def _run(m, force: bool, dry_run: bool, progress_interval: float = DEFAULT_INTERVAL_S, calibration=None):
    from adaspec_worker.worker import ShardWorker  # torch-free at import: the actor imports torch when it starts

    if dry_run:
        from .estimate import estimate

        files, plan = preflight(m, ShardWorker)
        click.echo(json.dumps({**plan.describe(m), "estimate": estimate(m, plan, files, calibration)}, indent=2))
        return

    with Progress(m, interval=progress_interval) as progress:
        state = run_job(m, ShardWorker, force=force, listener=progress.on_event)
    total_shards = len(state.plan)
    if state.committed == 0 and state.skipped == total_shards:
        commits = open_output(m).committed().values()
        click.echo(
            f"{m.name}: nothing left to do: {total_shards} shard(s) already committed "
            f"({sum(c.rows for c in commits)} rows, {sum(c.error_rows for c in commits)} error rows); "
            f"output {m.output.path}"
        )
        return
    click.echo(
        f"{m.name}: {state.skipped + state.committed}/{total_shards} shards committed "
        f"({state.skipped} skipped as already committed, {state.committed} run now, {len(state.retries)} retried); "
        f"this run: rows {state.rows}, error rows {state.error_rows}, completion tokens {state.completion_tokens}; "
        f"output {m.output.path}"
    )
    for line in startup_lines(state):
        click.echo(f"  {line}")


progress_option = click.option(
    "--progress-interval",
    type=float,
    default=DEFAULT_INTERVAL_S,
    show_default=True,
    help="Seconds between plain progress lines when stderr is not a terminal (0: none).",
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
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check input, models and output, print the shard plan and an estimate of tokens, GPU hours and dollars.",
)
@click.option(
    "--calibration",
    default=None,
    help="With --dry-run: an earlier output of this model whose measured tokens/s the estimate uses.",
)
@progress_option
@click.option("--force", is_flag=True, help="Discard another job's shards (or a changed input's) and take the lease.")
@click.option(
    "--max-error-fraction",
    type=float,
    default=None,
    help="Exit 1 when more than this share of rows are error rows (retry.max_error_fraction, default 0.5).",
)
def submit(manifest, output, overrides, dry_run, calibration, progress_interval, force, max_error_fraction):
    """Run a job: shard the input, decode on Ray actors, commit Parquet shards.

    \b
    Example:
      adarun submit manifests/job.yaml --set decoding.temperature=0.7 --output s3://bucket/run1
    Rerunning the same command resumes: committed shards are skipped.
    """
    sets = list(overrides) + ([f"output.path={output}"] if output else [])
    if max_error_fraction is not None:
        sets.append(f"retry.max_error_fraction={max_error_fraction}")
    _run(load_manifest(manifest, sets), force, dry_run, progress_interval, calibration)


storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    envvar="ADARUN_STORAGE_OPTION",
    help="An fsspec storage option for OUTPUT (repeatable), e.g. a credential job.json does not record. "
    "Env: ADARUN_STORAGE_OPTION (space-separated). Non-secret options recorded in job.json are reused.",
)


def _parse_options(pairs) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ManifestError(f"--storage-option {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _open_job(output: str, pairs=()) -> tuple[ShardFiles, dict, dict]:
    """(files, job.json, storage options): the given options first, then the non-secret ones job.json recorded."""
    given = _parse_options(pairs)
    files = ShardFiles(Store(output, given))
    try:
        doc = files.job()
    except Exception as e:
        from .storage import describe_storage_error

        raise describe_storage_error(e, output, "OUTPUT") from None
    if doc is None:
        fail(f"{output}: no job.json (not an adarun output)")
    recorded = doc.get("manifest", {}).get("output", {}).get("storage_options", {}) or {}
    options = {**{k: v for k, v in recorded.items() if v != MASK}, **given}
    if options != given:
        files = ShardFiles(Store(output, options))
    return files, doc, options


@cli.command()
@click.argument("output")
@storage_option
@progress_option
def resume(output, storage_options, progress_interval):
    """Resume the job recorded in OUTPUT/job.json, skipping committed shards.

    \b
    Example:
      adarun resume out/job
      adarun resume s3://bucket/run1 --storage-option secret=... --storage-option key=...
    """
    _, doc, options = _open_job(output, storage_options)
    data = json.loads(json.dumps(doc["manifest"]))
    data["output"]["storage_options"] = options  # masked credentials left out: fsspec's own chain finds them
    _run(manifest_from_dict(data), force=False, dry_run=False, progress_interval=progress_interval)


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
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(output, storage_options, as_json):
    """Show a job's progress: shards done/total, rows, tokens, errors, ETA.

    \b
    Example:
      adarun status out/job --json
    """
    files, doc, _ = _open_job(output, storage_options)
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
@storage_option
def report(outputs, fmt, storage_options):
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
        files, _, _ = _open_job(out, storage_options)
        if not files.committed():
            fail(f"{out}: no committed shards yet")
        reps.append(write_report(files))
        opened.append(files)
    if len(reps) == 2:
        text = compare_md(*reps)
        opened[1].write_report_file("compare.md", text.encode())
        opened[1].write_report_file("compare.json", json.dumps({"a": reps[0], "b": reps[1]}, default=str).encode())
        click.echo(text + f"\n(written to {opened[1].report_path('compare.md')})")
        return
    if fmt == "json":
        click.echo(json.dumps(reps[0], indent=2, default=str))
    elif fmt == "md":
        click.echo(opened[0].read_report_file("report.md").decode())
    else:
        click.echo(opened[0].report_path("report.html"))


for _command in MODEL_COMMANDS:
    cli.add_command(_command)


def _name_envvars(group: click.Group) -> None:
    """Every option reads ADARUN_<COMMAND>_<OPTION> (its long name, dashes as underscores), the name the
    README gives, unless it names its own variable (ADARUN_OUTPUT, ADARUN_SET, ADARUN_STORAGE_OPTION).
    Click's automatic names use the Python parameter name instead (e.g. ADARUN_REPORT_FMT)."""
    for cmd_name, cmd in group.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.envvar is None:
                long = max(p.opts, key=len).lstrip("-").replace("-", "_").upper()
                p.envvar = f"ADARUN_{cmd_name.replace('-', '_').upper()}_{long}"


_name_envvars(cli)
