"""The job runner against the contract: files on disk, exactly-once rows, resume and every failure path.

All tests share the session's two-node loopback Ray cluster (see conftest)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.controller import JobFailed
from jobs.manifest import manifest_from_dict
from tests.helpers import REPO, job_dict, run_job, write_manifest, write_prompts


def input_ids(prompts: Path) -> list[str]:
    return pq.read_table(prompts).column("id").to_pylist()


def output_ids(out: Path) -> tuple[list[str], list[str]]:
    ok = pq.read_table(out / "shards").column("id").to_pylist() if (out / "shards").exists() else []
    bad = pq.read_table(out / "errors").column("id").to_pylist() if (out / "errors").exists() else []
    return ok, bad


def assert_exactly_once(prompts: Path, out: Path) -> None:
    ok, bad = output_ids(out)
    assert sorted(ok + bad) == sorted(input_ids(prompts)), "every input row exactly once, in shards or errors"
    assert len(set(ok)) == len(ok)
    assert sorted(bad) == ["bad-empty", "bad-long", "bad-null"]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_job(ray_cluster, tmp_path_factory):
    """One local job run to completion; several tests read what it left on disk."""
    tmp = tmp_path_factory.mktemp("job")
    prompts = write_prompts(tmp / "prompts.parquet")
    out = tmp / "out"
    m = manifest_from_dict(job_dict(prompts, str(out)))
    state = run_job(m)
    return prompts, out, m, state


def test_files_on_disk_match_contract(finished_job):
    prompts, out, m, state = finished_job
    assert state.committed == 5 and not state.failed
    names = [f"shard-{i:05d}" for i in range(5)]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [n + ".parquet" for n in names]
    assert sorted(p.name for p in (out / "stats").iterdir()) == [n + ".json" for n in names]
    assert sorted(p.name for p in (out / "_commits").iterdir()) == [n + ".json" for n in names]
    job = json.loads((out / "job.json").read_text())
    assert job["config_hash"] == m.config_hash() and len(job["plan"]) == 5 and job["adarun_version"]
    assert job["manifest"]["speculative"]["params"] == {"top_k": 4, "depth": 4, "total_tokens": 12}
    t = pq.read_table(out / "shards")
    for col in ("id", "prompt", "completion", "num_prompt_tokens", "num_completion_tokens", "finish_reason"):
        assert col in t.column_names
    assert set(t.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 < n <= 12 for n in t.column("num_completion_tokens").to_pylist())
    for n in names:  # the commit marker is written last
        assert (out / "_commits" / f"{n}.json").stat().st_mtime_ns >= (out / "stats" / f"{n}.json").stat().st_mtime_ns
        assert (out / "stats" / f"{n}.json").stat().st_mtime_ns >= (out / "shards" / f"{n}.parquet").stat().st_mtime_ns
    assert_exactly_once(prompts, out)


def test_bad_rows_go_to_errors_and_shard_commits(finished_job):
    _, out, _, _ = finished_job
    errs = pq.read_table(out / "errors").to_pylist()
    by_id = {e["id"]: e["error"] for e in errs}
    assert "empty" in by_id["bad-empty"] and "empty" in by_id["bad-null"] and "too long" in by_id["bad-long"]
    shard = [p.name for p in (out / "errors").iterdir()][0].replace(".parquet", ".json")
    assert (out / "_commits" / shard).exists()


def test_stats_and_two_nodes(finished_job):
    _, out, _, _ = finished_job
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").iterdir())]
    assert sum(s["rows"] + s["error_rows"] for s in stats) == 40
    assert all(s["tau"] >= 1.0 and s["rounds"] > 0 and s["baseline"] for s in stats)
    assert len({s["node_id"] for s in stats}) == 2, "actors spread over both nodes of the cluster"


def test_rerun_skips_every_shard_and_leaves_files_untouched(finished_job):
    prompts, out, m, _ = finished_job
    before = {p: digest(p) for p in out.rglob("shard-*")}
    state = run_job(m)
    assert state.skipped == 5 and state.committed == 0
    assert {p: digest(p) for p in out.rglob("shard-*")} == before
    r = CliRunner().invoke(cli, ["status", str(out), "--json"])
    s = json.loads(r.output)
    assert s["shards_done"] == 5 and s["complete"] and s["rows"] == 37 and s["error_rows"] == 3


def test_different_config_is_refused_unless_forced(finished_job, tmp_path):
    prompts, out, _, _ = finished_job
    d = job_dict(prompts, str(out), decoding={"max_new_tokens": 5})
    path = write_manifest(tmp_path, d)
    r = CliRunner().invoke(cli, ["submit", str(path)])
    assert r.exit_code == 2 and "output.path" in r.output and "--force" in r.output


def test_same_job_against_s3_api_on_loopback(ray_cluster, prompts, tmp_path):
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {
            "key": "test",
            "secret": "test",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="adarun-test")
        fs = s3fs.S3FileSystem(**opts)
        fs.put(str(prompts), "adarun-test/in/prompts.parquet")
        d = job_dict("s3://adarun-test/in/prompts.parquet", "s3://adarun-test/out", sharding={"rows_per_shard": 20})
        d["output"]["storage_options"] = opts
        state = run_job(manifest_from_dict(d))
        assert state.committed == 2
        fs.invalidate_cache()
        assert sorted(fs.ls("adarun-test/out/_commits")) == [
            f"adarun-test/out/_commits/shard-0000{i}.json" for i in range(2)
        ]
        local = tmp_path / "copy"
        fs.get("adarun-test/out/", str(local), recursive=True)
        assert_exactly_once(prompts, local)
    finally:
        server.stop()


def test_controller_sigkill_then_rerun(ray_cluster, prompts, tmp_path):
    out = tmp_path / "out"
    d = job_dict(prompts, str(out), sharding={"rows_per_shard": 4}, decoding={"max_new_tokens": 24, "seed": 1})
    path = write_manifest(tmp_path, d)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen(
        [sys.executable, "-m", "adarun", "submit", str(path)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    commits = out / "_commits"
    deadline = time.time() + 120
    while not (commits.exists() and any(commits.iterdir())):
        assert proc.poll() is None, "controller exited before its first commit"
        assert time.time() < deadline, "no commit within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {
        p.name: digest(p)
        for p in (out / "shards").iterdir()
        if (commits / p.name.replace(".parquet", ".json")).exists()
    }
    n_before = len(list(commits.iterdir()))
    assert n_before < 10, "the kill must land mid-job for this test to mean anything"
    r = CliRunner().invoke(cli, ["resume", str(out)])
    assert r.exit_code == 0, r.output
    assert f"{n_before} skipped" in r.output or n_before <= len(first)
    assert {n: digest(out / "shards" / n) for n in first} == first, "committed shards untouched"
    assert len(list(commits.iterdir())) == 10
    assert_exactly_once(prompts, out)


def test_actor_killed_mid_shard(ray_cluster, prompts, tmp_path):
    import ray

    killed = []

    def listener(event, d):
        if event == "dispatch" and d["shard"] == 2 and not killed:
            killed.append(d["shard"])
            ray.kill(d["actor"], no_restart=True)

    out = tmp_path / "out"
    # one shard per actor: the kill at dispatch lands on shard 2 alone (tests/test_fleet.py: several in flight)
    d = job_dict(prompts, str(out))
    d["resources"]["shards_in_flight"] = 1
    state = run_job(manifest_from_dict(d), listener=listener)
    assert killed and any(r["shard"] == 2 and r["actor_died"] for r in state.retries)
    assert json.loads((out / "_commits" / "shard-00002.json").read_text())["attempt"] == 2
    assert_exactly_once(prompts, out)


def test_shard_that_exhausts_attempts_fails_the_job_after_the_others(ray_cluster, prompts, tmp_path):
    import ray

    def listener(event, d):
        if event == "dispatch" and d["shard"] == 1:
            ray.kill(d["actor"], no_restart=True)

    out = tmp_path / "out"
    d = job_dict(prompts, str(out), retry={"max_attempts": 2, "backoff_s": 0.01})
    d["resources"]["shards_in_flight"] = 1  # the kill at dispatch lands on shard 1 alone
    with pytest.raises(JobFailed, match="shard-00001"):
        run_job(manifest_from_dict(d), listener=listener)
    assert sorted(p.name for p in (out / "_commits").iterdir()) == [f"shard-0000{i}.json" for i in (0, 2, 3, 4)]


def test_injected_storage_faults(ray_cluster, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("ADARUN_CHAOS_WRITE_FAILURE_RATE", "0.2")
    out = tmp_path / "out"
    state = run_job(manifest_from_dict(job_dict(prompts, str(out))))
    assert state.committed == 5
    assert_exactly_once(prompts, out)


def test_chaos_store_really_fails_writes(tmp_path, monkeypatch):
    from jobs.storage import Store

    monkeypatch.setenv("ADARUN_CHAOS_WRITE_FAILURE_RATE", "1.0")
    with pytest.raises(OSError, match="injected"):
        Store(str(tmp_path), backoff_s=0.001).write_bytes("x", b"1")


# ------------------------------------------------------------------ the report


def _png_ok(data: bytes) -> bool:
    import io

    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(data), format="png")
    return data[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 50 and float(img.std()) > 0.01


def test_report_of_a_finished_job(finished_job, tmp_path):
    import shutil as sh

    _, out, m, _ = finished_job
    r = CliRunner().invoke(cli, ["report", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").iterdir())]
    assert rep["total_rows"] == sum(s["rows"] for s in stats) == 37
    assert rep["error_rows"] == 3
    assert (
        rep["completion_tokens"]
        == sum(s["completion_tokens"] for s in stats)
        == pq.read_table(out / "shards").column("num_completion_tokens").to_numpy().sum()
    )
    assert rep["prompt_tokens"] == sum(s["prompt_tokens"] for s in stats)
    busy, slots = sum(s["busy_slot_rounds"] for s in stats), sum(s["slot_rounds"] for s in stats)
    assert 0 < busy <= slots and rep["slot_occupancy"] == pytest.approx(busy / slots)
    hours = sum(s["cpu_seconds"] for s in stats) / 3600
    assert rep["cpu_hours"] == pytest.approx(hours)
    assert rep["cost_usd"] == pytest.approx(hours * m.cost.cpu_hour_usd + rep["gpu_hours"] * m.cost.gpu_hour_usd)
    assert rep["measured_speedup"] > 0 and rep["baseline_samples"] >= 5 and rep["shards_missing"] == 0
    for k in (
        "usd_per_million_completion_tokens",
        "completion_tokens_per_second",
        "tau",
        "measured_speedup_ci95",
        "autoregressive_cost_usd_estimate",
        "saved_usd_estimate",
        "retry_waste_seconds",
        "idle_tail_seconds",
    ):
        assert rep[k] is not None, k
    rdir = out / "report"
    for name in (
        "throughput.png",
        "shard_durations.png",
        "tau_hist.png",
        "acceptance_by_depth.png",
        "draft_lengths.png",
    ):
        assert _png_ok((rdir / name).read_bytes()), name
    assert "measured_speedup" in (rdir / "report.md").read_text()
    html_path = rdir / "report.html"
    assert "data:image/png;base64," in html_path.read_text()
    chromium = sh.which("chromium") or sh.which("chromium-browser")
    assert chromium, "headless Chromium is needed (.ci/run installs Debian's chromium)"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1400",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert _png_ok(shot.read_bytes()), "the rendered page is blank"


def test_report_of_a_partly_finished_job(finished_job, tmp_path):
    import shutil as sh

    _, out, _, _ = finished_job
    part = tmp_path / "part"
    sh.copytree(out, part)
    (part / "_commits" / "shard-00003.json").unlink()
    sh.rmtree(part / "report", ignore_errors=True)
    r = CliRunner().invoke(cli, ["report", str(part), "--format", "json"])
    rep = json.loads(r.output)
    assert rep["shards_committed"] == 4 and rep["shards_missing"] == 1
    committed = [json.loads((part / "stats" / f"shard-0000{i}.json").read_text()) for i in (0, 1, 2, 4)]
    assert rep["total_rows"] == sum(s["rows"] for s in committed)
    assert "1 missing" in (part / "report" / "report.md").read_text()
    r = CliRunner().invoke(cli, ["report", str(out), str(part)])
    assert r.exit_code == 0 and "| total_rows |" in r.output
    assert "| total_rows |" in (part / "report" / "compare.md").read_text()  # `report A B` keeps what it printed


def test_autotune_picks_a_measured_setting_and_records_it(ray_cluster, prompts, tmp_path):
    out = tmp_path / "out"
    d = job_dict(
        prompts,
        str(out),
        speculative={"method": "eagle2", "params": {"top_k": 4}, "autotune": {"enabled": True, "fraction": 0.1}},
        resources={"workers": 1, "batch_size": 4, "cpus_per_worker": 1},
    )
    state = run_job(manifest_from_dict(d))
    assert state.committed == 5
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").iterdir())]
    tune = stats[0]["autotune"]
    cands = tune["candidates"]  # eagle2's grid (4), then none, an eagle chain and opt-tree (no LDLP here)
    assert [c["method"] for c in cands] == ["eagle2"] * 4 + ["none", "eagle", "opt-tree"]
    assert all(c["tokens_per_second"] > 0 and c["predicted_tokens_per_second"] > 0 for c in cands)
    best = max(cands, key=lambda c: c["predicted_tokens_per_second"])  # by the actor's measured cost model
    assert tune["chosen"] == {"method": best["method"], "params": best["params"]} and tune["cost_model"]
    assert stats[0]["cost_model"]["device"] == "cpu"
    assert all(s["autotune"] == tune for s in stats)  # one choice per actor
    assert_exactly_once(prompts, out)
