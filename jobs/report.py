"""The cost and speedup report of a run: `adarun report OUTPUT` and `adarun report A B`.

Reads only committed shards (a shard without its commit marker does not exist) and says how many
are missing. Numbers: totals summed over shard stats; cost = device hours x the manifest's prices;
the speedup is measured, not assumed: each shard decoded a sample of its rows a second time with
plain autoregressive decoding on the same actor, and the report takes the geometric mean of the
per-row time-per-token ratios with a 95% t-interval on their logs. Writes OUTPUT/report/report.json,
report.md and a self-contained report.html (charts inlined), plus the PNG charts. No torch here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass

from .layout import Commit, JobRun, ShardFiles
from .shard_stats import ShardStats, total


@dataclass
class Run:
    """What a report reads: the job record, the committed shards' markers and stats, the run record."""

    job: dict
    commits: dict[int, Commit]
    stats: list[ShardStats]  # committed shards only, in shard order
    run: JobRun


def load_run(files: ShardFiles) -> Run:
    commits = files.committed()
    stats = [s for s in (files.stats(i) for i in sorted(commits)) if s is not None]
    return Run(job=files.job(), commits=commits, stats=stats, run=files.run())


def speedup_ci(samples: list[dict]) -> tuple[float | None, list[float] | None, int]:
    """Geometric mean of plain/spec time-per-token ratios and a 95% t-interval (on logs)."""
    logs = []
    for s in samples:
        if s.get("spec_seconds") and s.get("plain_seconds") and s.get("spec_tokens") and s.get("plain_tokens"):
            logs.append(math.log((s["plain_seconds"] / s["plain_tokens"]) / (s["spec_seconds"] / s["spec_tokens"])))
    n = len(logs)
    if n == 0:
        return None, None, 0
    mean = sum(logs) / n
    if n == 1:
        return math.exp(mean), None, 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    from scipy.stats import t as student  # noqa: PLC0415

    half = student.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return math.exp(mean), [math.exp(mean - half), math.exp(mean + half)], n


def summarize(run: Run) -> dict:
    """The report's numbers: totals over the committed shards, cost, measured speedup, waste."""
    job, stats = run.job, run.stats
    m, plan = job["manifest"], job["plan"]
    res, cost = m["resources"], m["cost"]
    t = total(stats)
    tok = t.completion_tokens
    wall = max((t.finished_at or 0.0) - (t.started_at or 0.0), 0.0)
    gpu_h, cpu_h = t.gpu_seconds / 3600, t.cpu_seconds / 3600
    sp, ci, n_samples = speedup_ci(t.baseline)
    last_by_actor: dict[str, float] = {}
    for s in stats:
        last_by_actor[s.actor_id] = max(last_by_actor.get(s.actor_id, 0.0), s.finished_at)
    gpus = res["workers"] * res["gpus_per_worker"]
    bill = full_bill(run, stats)
    usd = bill["busy_cost_usd"]
    ar_usd = usd * sp if sp else None
    return {
        **bill,
        "name": job["name"],
        "job_hash": job["job_hash"],
        "method": m["speculative"]["method"],
        "params": m["speculative"]["params"],
        "shards_committed": len(stats),
        "shards_total": len(plan),
        "shards_missing": len(plan) - len(stats),
        "total_rows": t.rows,  # output rows (samples); input_rows: the input rows they came from
        "input_rows": sum(p["rows"] for p in plan if p["index"] in run.commits) - t.error_rows,
        "error_rows": t.error_rows,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": tok,
        "wall_seconds": wall,
        "gpu_hours": gpu_h,
        "cpu_hours": cpu_h,
        "cost_usd": usd,  # the busy basis (what earlier versions reported)
        "gpu_hour_usd": cost["gpu_hour_usd"],
        "cpu_hour_usd": cost["cpu_hour_usd"],
        "usd_per_million_completion_tokens": usd / tok * 1e6 if tok else None,
        "completion_tokens_per_second": tok / wall if wall else None,
        "completion_tokens_per_second_per_gpu": (tok / wall / gpus) if wall and gpus else None,
        "tau": t.tau if t.rounds else None,
        "slot_occupancy": t.occupancy,  # share of batch slot-rounds that decoded a row (None: not measured)
        "measured_speedup": sp,
        "measured_speedup_ci95": ci,
        "baseline_samples": n_samples,
        "autoregressive_cost_usd_estimate": ar_usd,
        "saved_usd_estimate": (ar_usd - usd) if ar_usd is not None else None,
        "saved_share_busy": (1 - usd / ar_usd) if ar_usd else None,
        "autoregressive_reserved_cost_usd_estimate": (
            bill["reserved_cost_usd"] + usd * (sp - 1) if sp and bill["reserved_cost_usd"] is not None else None
        ),
        "saved_share_reserved": (
            usd * (sp - 1) / (bill["reserved_cost_usd"] + usd * (sp - 1))
            if sp and bill["reserved_cost_usd"] and bill["reserved_cost_usd"] + usd * (sp - 1) > 0
            else None
        ),
        "retry_waste_seconds": sum(r.get("seconds", 0.0) for r in run.run.retries),
        "retries": len(run.run.retries),
        "idle_tail_seconds": sum((t.finished_at or 0.0) - x for x in last_by_actor.values()),
        "energy_kwh": t.energy_kwh if stats else None,
        "draft_seconds": t.draft_seconds,
        "verify_seconds": t.verify_seconds,
        "other_seconds": t.other_seconds,
        "accelerators": sorted({s.accelerator for s in stats if s.accelerator}),
        "workers": len(last_by_actor),
    }


def price_for(accelerator: str | None, cost: dict) -> float:
    """$/hour of one accelerator: the first `cost.accelerator_hour_usd` key found in its name, else gpu_hour_usd."""
    for key, usd in (cost.get("accelerator_hour_usd") or {}).items():
        if accelerator and key.lower() in accelerator.lower():
            return float(usd)
    return float(cost["gpu_hour_usd"])


def full_bill(run: Run, stats: list[ShardStats]) -> dict:
    """Busy cost (shard wall x devices held, what decoding used) beside reserved cost (each controller run's
    wall x the devices its workers held: Ray start, model load, warm-up and idle included), and the
    start-up breakdown per actor from `_job_run.json`."""
    m = run.job["manifest"]
    cost, res = m["cost"], m["resources"]
    busy_gpu = sum(s.gpu_seconds * price_for(s.accelerator, cost) for s in stats) / 3600
    busy_cpu = sum(s.cpu_seconds for s in stats) / 3600 * cost["cpu_hour_usd"]
    actors = run.run.actors
    reserved_gpu_h = reserved_cpu_h = reserved_usd = 0.0
    for r in run.run.runs:
        wall = max((r.get("finished_at") or 0) - (r.get("started_at") or 0), 0.0)
        workers = r.get("workers", res["workers"])
        gpus, cpus = workers * r.get("gpus_per_worker", res["gpus_per_worker"]), workers * r.get(
            "cpus_per_worker", res["cpus_per_worker"]
        )
        mine = [a for a in actors if r["started_at"] <= (a.get("created_at") or 0) <= r["finished_at"]]
        accs = sorted({a.get("accelerator") for a in mine if a.get("accelerator")})
        price = price_for(accs[0], cost) if len(accs) == 1 else float(cost["gpu_hour_usd"])
        reserved_gpu_h += wall * gpus / 3600
        reserved_cpu_h += wall * cpus / 3600
        reserved_usd += wall * gpus / 3600 * price + wall * cpus / 3600 * cost["cpu_hour_usd"]
    startup = [
        {
            "actor_id": a.get("actor_id"),
            "host": a.get("host"),
            "accelerator": a.get("accelerator"),
            "ready_seconds": (a["ready_at"] - a["created_at"]) if a.get("ready_at") and a.get("created_at") else None,
            "ray_scheduling_seconds": a.get("scheduling_seconds"),
            **{f"{k}_seconds": v for k, v in (a.get("phases") or {}).items()},
            "first_commit_seconds": (a["first_commit_at"] - a["created_at"]) if a.get("first_commit_at") else None,
            "shards": a.get("shards"),
            "idle_tail_seconds": a.get("idle_tail_seconds"),
        }
        for a in actors
    ]
    prices = {acc: price_for(acc, cost) for acc in sorted({s.accelerator for s in stats if s.accelerator})}
    return {
        "busy_cost_usd": busy_gpu + busy_cpu,
        "reserved_cost_usd": reserved_usd if run.run.runs else None,
        "reserved_gpu_hours": reserved_gpu_h if run.run.runs else None,
        "reserved_cpu_hours": reserved_cpu_h if run.run.runs else None,
        "busy_share_of_reserved": (busy_gpu + busy_cpu) / reserved_usd if reserved_usd else None,
        "ray_start_seconds": sum(r.get("ray_start_seconds", 0.0) for r in run.run.runs),
        "tail_seconds": run.run.runs[-1].get("tail_seconds") if run.run.runs else None,
        "startup": startup,
        "price_per_accelerator_hour_usd": prices,
    }


# ------------------------------------------------------------------ charts


def charts(run: Run) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = run.stats
    out = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[name] = buf.getvalue()

    t0 = min((s.started_at for s in stats), default=0.0)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    by_actor = defaultdict(list)
    for s in stats:
        by_actor[s.actor_id].append(s)
    for i, (_actor, ss) in enumerate(sorted(by_actor.items())):
        ss.sort(key=lambda s: s.finished_at)
        ax.plot(
            [s.finished_at - t0 for s in ss],
            [s.completion_tokens / max(s.wall_seconds, 1e-9) for s in ss],
            marker="o",
            label=f"worker {i}",
        )
    ax.set(xlabel="seconds since first shard started", ylabel="completion tokens/s", title="Throughput per worker")
    ax.legend(fontsize=7)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([s.shard for s in stats], [s.wall_seconds for s in stats], color="tab:blue")
    ax.set(xlabel="shard", ylabel="seconds", title="Shard durations (stragglers stand out)")
    save(fig, "shard_durations.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist([s.tau for s in stats if s.rounds], bins=20, color="tab:green")
    ax.set(xlabel="tau (tokens per target forward)", ylabel="shards", title="tau (tokens per target pass) per shard")
    save(fig, "tau_hist.png")

    t = total(stats)
    rounds, depth, lengths = t.rounds or 1, t.accepted_by_depth, t.draft_lengths
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ks = sorted(depth)
    ax.bar(ks, [depth[k] / rounds for k in ks], color="tab:orange")
    ax.set(xlabel="draft depth", ylabel="share of rounds accepting it", title="Acceptance by depth", ylim=(0, 1))
    save(fig, "acceptance_by_depth.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ks = sorted(lengths)
    ax.bar(ks, [lengths[k] for k in ks], color="tab:purple")
    ax.set(xlabel="draft length (deepest level offered)", ylabel="rounds", title="Chosen draft lengths")
    save(fig, "draft_lengths.png")
    return out


# ------------------------------------------------------------------ rendering


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


HEADLINE = [
    "total_rows",
    "error_rows",
    "completion_tokens",
    "wall_seconds",
    "completion_tokens_per_second",
    "completion_tokens_per_second_per_gpu",
    "gpu_hours",
    "cpu_hours",
    "cost_usd",
    "busy_cost_usd",
    "reserved_cost_usd",
    "reserved_gpu_hours",
    "busy_share_of_reserved",
    "ray_start_seconds",
    "usd_per_million_completion_tokens",
    "tau",
    "slot_occupancy",
    "measured_speedup",
    "measured_speedup_ci95",
    "autoregressive_cost_usd_estimate",
    "saved_usd_estimate",
    "saved_share_busy",
    "autoregressive_reserved_cost_usd_estimate",
    "saved_share_reserved",
    "retry_waste_seconds",
    "idle_tail_seconds",
    "energy_kwh",
]


def render_md(rep: dict, images: list[str]) -> str:
    lines = [
        f"# adarun report: {rep['name']}",
        "",
        f"Method `{rep['method']}` {json.dumps(rep['params'])}; "
        f"shards committed {rep['shards_committed']}/{rep['shards_total']}"
        + (
            f" (**{rep['shards_missing']} missing**: the report covers committed shards only)"
            if rep["shards_missing"]
            else ""
        )
        + f"; accelerators: {', '.join(rep['accelerators'])}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(rep[k])} |" for k in HEADLINE]
    lines += [
        "",
        f"Time split (summed over shards): draft {rep['draft_seconds']:.1f}s, verify {rep['verify_seconds']:.1f}s, "
        f"other {rep['other_seconds']:.1f}s. "
        f"Speedup from {rep['baseline_samples']} rows decoded both ways on the same actors.",
        "",
    ]
    lines += _startup_md(rep)
    lines += [f"![{n}]({n})" for n in images]
    return "\n".join(lines) + "\n"


_STARTUP_COLS = (  # the start-up table's columns, in order
    *("ready_seconds", "ray_scheduling_seconds", "imports_seconds", "tokenizer_seconds", "model_load_seconds"),
    *("draft_load_seconds", "warmup_seconds", "first_commit_seconds", "idle_tail_seconds"),
)


def _startup_md(rep: dict) -> list[str]:
    if not rep.get("startup"):
        return []
    lines = [
        "## Start-up per worker (seconds)",
        "",
        "From the controller asking Ray for the worker to its first commit, and its idle tail (nothing left to do"
        f" -> the run's last commit; the last run's tail: {_fmt(rep.get('tail_seconds'))} s).",
        "",
        "| host | accelerator | " + " | ".join(c.replace("_seconds", "") for c in _STARTUP_COLS) + " |",
        "|---|---|" + "---|" * len(_STARTUP_COLS),
    ]
    for a in rep["startup"]:
        cells = " | ".join(_fmt(a.get(c)) for c in _STARTUP_COLS)
        lines.append(f"| {a.get('host')} | {a.get('accelerator')} | {cells} |")
    prices = ", ".join(f"{k}: ${v:g}/h" for k, v in rep.get("price_per_accelerator_hour_usd", {}).items())
    return lines + ["", f"Prices per accelerator hour: {prices or 'n/a'}.", ""]


def render_html(rep: dict, pngs: dict[str, bytes]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(rep[k]))}</td></tr>" for k in HEADLINE)
    imgs = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}"></figure>'
        for n, b in pngs.items()
    )
    missing = (
        f"<p class=warn>{rep['shards_missing']} shard(s) not committed: this report covers committed shards only.</p>"
        if rep["shards_missing"]
        else ""
    )
    startup = _startup_md(rep)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in ln.strip("|").split("|")) + "</tr>"
        for ln in startup[2:]
        if ln.startswith("|") and not ln.startswith("|---")
    )
    bill = (
        f"<h2>The bill</h2><p>Busy (shards decoding) ${rep['busy_cost_usd']:.4f} of reserved (workers held, "
        f"start-up and idle included) {_fmt(rep['reserved_cost_usd'])} USD; plain decoding would have cost "
        f"{_fmt(rep['autoregressive_cost_usd_estimate'])} busy / "
        f"{_fmt(rep['autoregressive_reserved_cost_usd_estimate'])} reserved.</p>"
        + (f"<h3>Start-up per worker (seconds)</h3><table>{table}</table>" if table else "")
        + (f"<p>{html.escape(startup[-2])}</p>" if startup else "")
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>adarun report: {html.escape(rep["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:4px 10px}} figure{{display:inline-block;margin:8px}}
.warn{{color:#b00;font-weight:bold}}</style></head><body>
<h1>adarun report: {html.escape(rep["name"])}</h1>
<p>Method <code>{html.escape(rep["method"])}</code>;
shards committed {rep["shards_committed"]}/{rep["shards_total"]}.</p>{missing}
<table>{rows}</table>{bill}{imgs}</body></html>"""


def write_report(files: ShardFiles) -> dict:
    """Summarise the committed shards and write report.json/.md/.html and the charts under OUT/report/."""
    run = load_run(files)
    rep = summarize(run)
    pngs = charts(run)
    for name, data in pngs.items():
        files.write_report_file(name, data)
    files.write_report_file("report.json", json.dumps(rep, indent=2, sort_keys=True, default=str).encode())
    files.write_report_file("report.md", render_md(rep, list(pngs)).encode())
    files.write_report_file("report.html", render_html(rep, pngs).encode())
    return rep


def compare_md(a: dict, b: dict) -> str:
    lines = [f"| metric | {a['name']} ({a['method']}) | {b['name']} ({b['method']}) | B / A |", "|---|---|---|---|"]
    for k in HEADLINE:
        va, vb = a.get(k), b.get(k)
        num = isinstance(va, (int, float)) and isinstance(vb, (int, float))
        ratio = f"{vb / va:.3g}" if num and va > 0 and vb >= 0 else ""  # no ratio of negative savings
        lines.append(f"| {k} | {_fmt(va)} | {_fmt(vb)} | {ratio} |")
    return "\n".join(lines) + "\n"
