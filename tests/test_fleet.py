"""A fleet that scales (issue #15): the tapered shard plan is a pure function of input and manifest, an actor
that dies with several shards in flight costs an attempt only to the one it was decoding, the run record
carries each actor's start-up, first commit and idle tail, and scripts/fleet_bench.py runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import ManifestError, ShardingCfg, manifest_from_dict
from jobs.plan import cut_plan, make_plan, tail_sizes
from tests.helpers import REPO, TINY, TINY_HEAD, job_dict, run_job
from tests.test_runner import assert_exactly_once

FILES = [("a.parquet", 1000), ("b.parquet", 0), ("c.parquet", 130)]


def _covers_each_row_once(plan, counts) -> None:
    for f, n in counts:
        mine = [s for s in plan if s.file == f]
        assert [(s.start, s.start + s.rows) for s in mine] == list(
            zip([s.start for s in mine], [s.start for s in mine[1:]] + [n])
        ), f"{f}: shards tile the file"
        assert sum(s.rows for s in mine) == n and all(s.rows > 0 for s in mine)
    assert [s.index for s in plan] == list(range(len(plan)))


def test_the_tail_is_planned_smaller_and_the_plan_is_pure():
    cfg = ShardingCfg(rows_per_shard=100, tail_shards=4, min_rows_per_shard=10)
    plan = cut_plan(FILES, cfg)
    assert plan == cut_plan(list(FILES), ShardingCfg(**vars(cfg))), "same input and manifest, same plan"
    _covers_each_row_once(plan, FILES)
    sizes = [s.rows for s in plan]
    assert tail_sizes(1130, cfg) == [80] * 4 + [40] * 4 + [20] * 4 + [10] * 4, "4 of each size, halving to 10"
    # the tail starts at row 530 of 1130 and crosses from a.parquet into c.parquet, where no shard spans
    assert sizes == [100] * 5 + [30] + [80] * 4 + [40] * 3 + [30, 10] + [20] * 4 + [10] * 4
    assert [(s.file, s.start, s.rows) for s in plan if s.file == "c.parquet"][0] == ("c.parquet", 0, 10)
    assert max(sizes) == 100 and len(plan) > len(cut_plan(FILES, ShardingCfg(rows_per_shard=100)))


def test_no_tail_is_the_old_plan_and_a_small_job_is_all_tail():
    old = cut_plan(FILES, ShardingCfg(rows_per_shard=64))
    assert [(s.file, s.start, s.rows) for s in old] == [
        (f, a, min(64, n - a)) for f, n in FILES for a in range(0, n, 64)
    ]
    small = cut_plan([("x", 25)], ShardingCfg(rows_per_shard=64, tail_shards=2))  # min: 64 // 8 = 8
    assert [s.rows for s in small] == [9, 8, 8]
    _covers_each_row_once(small, [("x", 25)])


def test_make_plan_reads_the_files_and_tapers(tmp_path):
    for name, n in (("p1.parquet", 30), ("p2.parquet", 20)):
        pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(n)], "prompt": ["x"] * n}), tmp_path / name)
    m = manifest_from_dict(
        job_dict(tmp_path, "/tmp/unused", sharding={"rows_per_shard": 16, "tail_shards": 2, "min_rows_per_shard": 4})
    )
    plan = make_plan(m.input, m.sharding)
    # 50 rows, the tail's 24 from row 26: 8, 8, 4, 4 (the first 8 cut by the file boundary at row 30)
    assert [(s.file.rsplit("/", 1)[-1], s.start, s.rows) for s in plan] == [
        ("p1.parquet", 0, 16),
        ("p1.parquet", 16, 10),
        ("p1.parquet", 26, 4),
        ("p2.parquet", 0, 4),
        ("p2.parquet", 4, 8),
        ("p2.parquet", 12, 4),
        ("p2.parquet", 16, 4),
    ]


def test_new_fields_checked_and_absent_from_old_hashes(tmp_path):
    base = job_dict(tmp_path, "/tmp/o")
    assert manifest_from_dict(base).config_hash() == manifest_from_dict(
        {**base, "sharding": {"rows_per_shard": 8, "tail_shards": 0}}
    ).config_hash(), "a default tail hashes as before the field existed"
    with pytest.raises(ManifestError, match=r"sharding.min_rows_per_shard: must be in \[0, rows_per_shard 8\]"):
        manifest_from_dict({**base, "sharding": {"rows_per_shard": 8, "min_rows_per_shard": 9}})
    with pytest.raises(ManifestError, match="resources.shards_in_flight"):
        manifest_from_dict({**base, "resources": {"shards_in_flight": 0}})


def test_an_actor_dying_with_shards_in_flight_costs_one_attempt(ray_cluster, prompts, tmp_path, monkeypatch):
    """The actor ends (os._exit, as a crash) when shard 2 starts decoding, holding another shard behind it:
    shard 2 is retried (attempt 2), the shard behind it is requeued without losing an attempt, every row once;
    the run record carries each actor's start-up, first commit and idle tail."""
    monkeypatch.setenv("ADARUN_CHAOS_KILL_SHARDS", "2")
    out = tmp_path / "out"
    d = job_dict(prompts, str(out), sharding={"rows_per_shard": 4, "tail_shards": 2, "min_rows_per_shard": 2})
    state = run_job(manifest_from_dict(d))
    commits = {p.name: json.loads(p.read_text()) for p in (out / "_commits").iterdir()}
    assert commits["shard-00002.json"]["attempt"] == 2
    assert all(c["attempt"] == 1 for n, c in commits.items() if n != "shard-00002.json"), "bystanders not charged"
    charged = [r for r in state.retries if not r.get("requeued")]
    assert [r["shard"] for r in charged] == [2] and charged[0]["actor_died"]
    assert all(r["attempt"] == 1 for r in state.retries)
    assert_exactly_once(prompts, out)
    run = json.loads((out / "_job_run.json").read_text())
    assert run["runs"][-1]["tail_seconds"] >= 0 and run["runs"][-1]["shards_in_flight"] == 2
    served = [a for a in run["actors"] if a["shards"]]
    assert sum(a["shards"] for a in served) == len(commits)
    assert all(a["first_commit_at"] >= a["ready_at"] >= a["created_at"] for a in served)
    assert {"model_load", "warmup"} <= set(served[0]["phases"])
    stats = json.loads((out / "stats" / "shard-00000.json").read_text())
    assert set(stats["stages"]) == {"read", "queued", "decode"} and stats["wall_seconds"] == stats["stages"]["decode"]


def test_the_summary_prints_each_workers_start_up_and_the_tail():
    from jobs.controller import JobState
    from jobs.layout import ActorStartup
    from jobs.progress import startup_lines

    a = ActorStartup(host="h", accelerator="H200", created_at=100.0, ready_at=110.0, first_commit_at=112.5,
                     scheduling_seconds=1.0, phases={"imports": 2.0, "model_load": 3.0, "warmup": 4.0}, shards=7,
                     idle_tail_seconds=0.4)  # fmt: skip
    state = JobState(plan=[], actors=[a, ActorStartup(created_at=100.0)], ray_start_seconds=0.5, tail_seconds=0.4)
    lines = startup_lines(state)
    assert lines[0] == (
        "worker h (H200): first commit 12.5s after start (ray start 0.5s for the job, actor start 3.0s, model load "
        "3.0s, warm-up 4.0s, first shard 2.5s); 7 shard(s), idle tail 0.4s"
    )
    assert len(lines) == 2 and lines[1].startswith("tail: 0.4s"), "a worker that never committed is left out"


def test_fleet_bench_smoke_on_cpu(ray_cluster, tmp_path):
    """scripts/fleet_bench.py end to end on CPU workers of the test cluster: one worker, then the fault run with
    two (an actor killed, the controller SIGKILLed, then resumed), exactly once everywhere, the JSON's fields."""
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(12)], "prompt": ["def f(x):\n    return"] * 12}), prompts)
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "scripts/fleet_bench.py", "--smoke", "--prompts", str(prompts), "--target", str(TINY),
        "--draft", str(TINY_HEAD), "--method", "eagle2", "--out", str(out), "--work", str(tmp_path / "work"),
        "--workers", "1", "--fault-workers", "2",
    ]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "fleet_bench.json").read_text())
    (run,) = res["runs"]
    assert run["workers"] == 1 and run["exactly_once"] and run["duplicates"] == run["missing"] == 0
    assert run["scaling_efficiency"] == 1.0 == res["scaling_efficiency"]["1"] and run["tokens_per_second"] > 0
    (actor,) = run["actors"]
    assert actor["first_commit_seconds"] >= actor["model_load_seconds"] + actor["warmup_seconds"] > 0
    f = res["fault"]
    assert f["workers"] == 2 and f["exactly_once"] and f["controller_killed"] and f["killed_shard_attempt"] == 2, f
    assert res["command"].startswith("python scripts/fleet_bench.py") and res["commit"] and "device" in res
    assert (out / "fleet_bench.md").read_text().startswith("# adarun fleet benchmark")
