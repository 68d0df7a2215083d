"""What a running job shows its user: a rich progress bar on a terminal, and otherwise (cron, Airflow,
`ray job submit`, a pipe) a plain log line every `interval` seconds: shards, rows, tokens/s, ETA,
error rows, retries. Retries and failures are logged as they happen either way (`adarun.progress`).

Fed by the controller's listener events ('start', 'worker', 'dispatch', 'commit', 'retry', 'fail').
Knows nothing of Ray or storage. Torch-free.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass

from .layout import shard_name

log = logging.getLogger("adarun.progress")

DEFAULT_INTERVAL_S = 30.0  # ADARUN_SUBMIT_PROGRESS_INTERVAL / --progress-interval


@dataclass
class Tally:
    """What the job has done so far in this run (committed shards before it counted as done)."""

    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    rows: int = 0
    error_rows: int = 0
    tokens: int = 0
    retries: int = 0
    failed: int = 0
    workers: int = 0
    started: float = 0.0

    def line(self, name: str, now: float) -> str:
        el = max(now - self.started, 1e-9)
        run_now = self.shards_done - self.shards_skipped
        left = self.shards_total - self.shards_done
        eta = f"{left * el / run_now:.0f}s" if run_now and left else ("0s" if not left else "unknown")
        return (
            f"{name}: shards {self.shards_done}/{self.shards_total}, rows {self.rows}, "
            f"{self.tokens / el:.1f} tok/s, ETA {eta}, error rows {self.error_rows}, retries {self.retries}, "
            f"failed {self.failed}, workers {self.workers}, elapsed {el:.0f}s"
        )


class Progress:
    """A rich bar when stderr is a terminal, a plain line every `interval` seconds otherwise."""

    def __init__(self, m, interval: float = DEFAULT_INTERVAL_S, tty: bool | None = None):
        self.name = m.name
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval
        self.t = Tally(started=time.time())
        self.task = None
        self.p = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.p = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows {task.fields[rows]}  {task.fields[tps]:.0f} tok/s  retries {task.fields[retries]}"),
                TimeElapsedColumn(),
                transient=False,
            )

    def __enter__(self):
        if self.p is not None:
            self.p.__enter__()
        elif self.interval > 0:
            self._thread = threading.Thread(target=self._ticker, name="adarun-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.p is not None:
            self.p.__exit__(*a)

    def _ticker(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit_line()

    def emit_line(self) -> None:
        with self._lock:
            if self.t.shards_total:
                log.info("%s", self.t.line(self.name, time.time()))

    def on_event(self, event: str, d: dict):
        with self._lock:
            self._on_event(event, d)

    def _on_event(self, event: str, d: dict):
        t = self.t
        if event == "start":
            t.shards_total, t.shards_done, t.shards_skipped = d["plan"], d["skipped"], d["skipped"]
            if self.p is not None:
                self.task = self.p.add_task(
                    self.name, total=d["plan"], completed=d["skipped"], rows=0, tps=0.0, retries=0
                )
        elif event == "worker":
            t.workers += 1
        elif event == "commit":
            t.shards_done += 1
            t.rows += d["rows"]
            t.error_rows += d.get("error_rows", 0)
            t.tokens += d["completion_tokens"]
            if self.p is not None:
                tps = t.tokens / max(time.time() - t.started, 1e-9)
                self.p.update(self.task, advance=1, rows=t.rows, tps=tps)
        elif event == "retry":
            t.retries += 1
            if self.p is not None:
                self.p.update(self.task, retries=t.retries)
                self.p.console.print(f"retrying {shard_name(d['shard'])} after attempt {d['attempt']}: {d['cause']}")
        elif event == "fail":
            t.failed += 1
            if self.p is not None:
                self.p.console.print(f"[red]{shard_name(d['shard'])} failed: {d['cause']}")


def startup_lines(state) -> list[str]:
    """The end-of-run summary of start-up and tail (a controller `JobState`): per worker, its time from being
    asked for to its first commit and the parts of it; then the tail."""
    lines = []
    for a in state.actors:
        if not a.first_commit_at:
            continue
        ph = a.phases or {}
        load = sum(ph.get(k, 0.0) for k in ("tokenizer", "model_load", "draft_load"))
        lines.append(
            f"worker {a.host} ({a.accelerator}): first commit {a.first_commit_at - a.created_at:.1f}s after start "
            f"(ray start {state.ray_start_seconds:.1f}s for the job, actor start "
            f"{a.scheduling_seconds + ph.get('imports', 0.0):.1f}s, model load {load:.1f}s, warm-up "
            f"{ph.get('warmup', 0.0):.1f}s, first shard {a.first_commit_at - (a.ready_at or a.created_at):.1f}s); "
            f"{a.shards} shard(s), idle tail {a.idle_tail_seconds or 0.0:.1f}s"
        )
    if state.tail_seconds is not None:
        lines.append(f"tail: {state.tail_seconds:.1f}s from the first worker with nothing left to the last commit")
    return lines
