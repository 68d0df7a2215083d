"""What a running job shows its user: a rich progress bar of shards, rows and tokens/s, retries and failures.

Fed by the controller's listener events ('start', 'dispatch', 'commit', 'retry', 'fail'). Torch-free.
"""

from __future__ import annotations

import sys
import time

from .layout import shard_name


class Progress:
    """A rich progress bar: shards, rows, tokens/s."""

    def __init__(self, m):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows {task.fields[rows]}  {task.fields[tps]:.0f} tok/s  retries {task.fields[retries]}"),
            TimeElapsedColumn(),
            transient=False,
            disable=not sys.stderr.isatty(),
            console=None,
        )
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
