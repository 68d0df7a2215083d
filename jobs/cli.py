"""Job commands: submit, resume, status. Exit codes: 0 done, 1 job failed, 2 bad usage or manifest.

Bad input never produces a traceback: manifest, plan and conflict errors print one line naming
the field and exit 2.
"""
from __future__ import annotations

import json
import sys
import time

import click

from .manifest import ManifestError, load_manifest, manifest_from_dict
from .plan import PlanError
from .storage import Store, shard_name

USAGE_ERRORS = (ManifestError, PlanError)


def fail_usage(msg: str):
    click.echo(f"adarun: error: {msg}", err=True)
    sys.exit(2)


def _run(m, force: bool, dry_run: bool):
    from .controller import JobConflict, JobFailed, run_job

    try:
        if dry_run:
            _print_plan(m)
            return
        with _Progress(m) as progress:
            state = run_job(m, force=force, listener=progress.on_event)
    except (*USAGE_ERRORS, JobConflict) as e:
        fail_usage(str(e))
    except JobFailed as e:
        click.echo(f"adarun: job failed: {e}", err=True)
        sys.exit(1)
    total = len(state.plan)
    click.echo(f"{m.name}: {state.skipped + state.committed}/{total} shards committed "
               f"({state.skipped} skipped as already committed, {state.committed} run now, {len(state.retries)} retried); "
               f"rows {state.rows}, error rows {state.error_rows}, completion tokens {state.completion_tokens}; output {m.output.path}")


def _print_plan(m):
    from .controller import job_hash
    from .plan import input_storage_options, make_plan

    plan = make_plan(m.input, m.sharding.rows_per_shard, input_storage_options(m.input.path, m.output.path, m.output.storage_options))
    click.echo(json.dumps({"name": m.name, "job_hash": job_hash(m, plan), "config_hash": m.config_hash(),
                           "rows": sum(s.rows for s in plan), "shards": [s.to_dict() for s in plan]}, indent=2))


class _Progress:
    """A rich progress bar: shards, rows, tokens/s."""

    def __init__(self, m):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("rows {task.fields[rows]}  {task.fields[tps]:.0f} tok/s  retries {task.fields[retries]}"),
                          TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty(), console=None)
        self.task = None
        self.rows = self.tokens = self.retries = 0
        self.t0 = time.time()
        self.name = m.name

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *a):
        self.p.__exit__(*a)

    def on_event(self, event: str, d: dict):
        if event == "start":
            self.task = self.p.add_task(self.name, total=d["plan"], completed=d["skipped"], rows=0, tps=0.0, retries=0)
        elif event == "commit":
            self.rows += d["rows"]
            self.tokens += d["completion_tokens"]
            self.p.update(self.task, advance=1, rows=self.rows, tps=self.tokens / max(time.time() - self.t0, 1e-9))
        elif event == "retry":
            self.retries += 1
            self.p.update(self.task, retries=self.retries)
            self.p.console.print(f"retrying {shard_name(d['shard'])} after attempt {d['attempt']}: {d['cause']}")
        elif event == "fail":
            self.p.console.print(f"[red]{shard_name(d['shard'])} failed: {d['cause']}")


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--output", envvar="ADARUN_OUTPUT", help="Output URL or path (overrides output.path). Env: ADARUN_OUTPUT.")
@click.option("--set", "overrides", multiple=True, envvar="ADARUN_SET", metavar="KEY=VALUE",
              help="Override a manifest field, e.g. decoding.temperature=0.7. Env: ADARUN_SET (space-separated).")
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
    try:
        m = load_manifest(manifest, sets)
    except ManifestError as e:
        fail_usage(str(e))
    _run(m, force, dry_run)


def _open_job(output: str, storage_options: dict | None = None) -> tuple[Store, dict]:
    store = Store(output, storage_options or {})
    if not store.exists("job.json"):
        fail_usage(f"{output}: no job.json (not an adarun output)")
    return store, store.read_json("job.json")


@click.command()
@click.argument("output")
def resume(output):
    """Resume the job recorded in OUTPUT/job.json, skipping committed shards.

    \b
    Example:
      adarun resume out/job
    """
    _, doc = _open_job(output)
    try:
        m = manifest_from_dict(doc["manifest"])
    except ManifestError as e:
        fail_usage(str(e))
    _run(m, force=False, dry_run=False)


def job_status(store: Store, doc: dict) -> dict:
    plan = doc["plan"]
    commits = store.committed()
    stats = [store.read_json(f"stats/{n}") for n in store.list("stats") if n.endswith(".json")]
    stats = [s for s in stats if s["shard"] in commits]
    rows = sum(s["rows"] for s in stats)
    toks = sum(s["completion_tokens"] for s in stats)
    done_rows = sum(p["rows"] for p in plan if p["index"] in commits)
    total_rows = sum(p["rows"] for p in plan)
    times = sorted(c["committed_at"] for c in commits.values())
    eta = None
    if len(times) >= 2 and done_rows < total_rows:
        rate = done_rows / max(times[-1] - min(s["started_at"] for s in stats), 1e-9)
        eta = (total_rows - done_rows) / rate if rate > 0 else None
    return {"name": doc["name"], "job_hash": doc["job_hash"], "shards_done": len(commits), "shards_total": len(plan),
            "rows": rows, "error_rows": sum(s["error_rows"] for s in stats), "input_rows_done": done_rows,
            "input_rows_total": total_rows, "completion_tokens": toks, "prompt_tokens": sum(s["prompt_tokens"] for s in stats),
            "eta_seconds": eta, "complete": len(commits) == len(plan)}


@click.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(output, as_json):
    """Show a job's progress: shards done/total, rows, tokens, errors, ETA.

    \b
    Example:
      adarun status out/job --json
    """
    store, doc = _open_job(output)
    s = job_status(store, doc)
    if store.committed():
        from .report import load_run, summarize

        rep = summarize(load_run(store))
        s.update({k: rep[k] for k in ("cost_usd", "completion_tokens_per_second", "mean_accepted_length", "measured_speedup")})
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    eta = "done" if s["complete"] else (f"{s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else "unknown")
    click.echo(f"{s['name']}: shards {s['shards_done']}/{s['shards_total']}, rows {s['rows']} (+{s['error_rows']} errors) "
               f"of {s['input_rows_total']}, completion tokens {s['completion_tokens']}, ETA {eta}")
    if "cost_usd" in s:
        tps, tau, sp = s["completion_tokens_per_second"], s["mean_accepted_length"], s["measured_speedup"]
        click.echo(f"  cost ${s['cost_usd']:.4f}, {tps or 0:.1f} tok/s, tau {tau or 0:.2f}, "
                   f"measured speedup {'n/a' if sp is None else f'{sp:.2f}x'}")


@click.command()
@click.argument("outputs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True,
              help="What to print; all three files are written under OUTPUT/report/ either way.")
def report(outputs, fmt):
    """Cost and speedup report of a run (OUTPUT), or two runs side by side (A B).

    \b
    Examples:
      adarun report out/quickstart
      adarun report out/last-night out/tonight
    """
    from .report import compare_md, write_report

    if len(outputs) > 2:
        fail_usage("report takes one output, or two to compare")
    reps = []
    for out in outputs:
        store, _ = _open_job(out)
        if not store.committed():
            fail_usage(f"{out}: no committed shards yet")
        reps.append(write_report(store))
    if len(reps) == 2:
        click.echo(compare_md(*reps))
        return
    store = Store(outputs[0])
    if fmt == "json":
        click.echo(json.dumps(reps[0], indent=2))
    elif fmt == "md":
        click.echo(store.read_bytes("report/report.md").decode())
    else:
        click.echo(store.path("report/report.html"))


def register(group: click.Group) -> None:
    for c in (submit, resume, status, report):
        group.add_command(c)
