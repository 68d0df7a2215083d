"""The runner's promises under bad input, changed input, faults and concurrency (one test per promise).

Each test drives the command line (or the controller, as `adarun submit` does) and asserts the exit
code, the one-line message, and that no committed row is lost or duplicated. CPU, the shipped tiny
model, the session's two-node loopback Ray cluster; moto's S3 server where storage is involved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.lease import Lease
from jobs.storage import Store
from tests.helpers import REPO, TINY, TINY_HEAD, TINY_LDLP, job_dict, write_manifest


def submit(path, *args, env=None):
    r = CliRunner().invoke(cli, ["submit", str(path), *args], env=env)
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("adarun:")]
    return r, lines


def one_line_error(r, lines, code: int, *words: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(lines) == 1, r.output
    for w in words:
        assert w in lines[0], lines[0]


def committed_ids(out: Path) -> list[str]:
    commits = {p.stem for p in (out / "_commits").iterdir()} if (out / "_commits").exists() else set()
    ids = []
    for p in sorted((out / "shards").glob("*.parquet")) if (out / "shards").exists() else []:
        if p.stem in commits:
            ids += pq.read_table(p).column("id").to_pylist()
    return ids


def exactly_once(prompts: Path, out: Path) -> None:
    ok = committed_ids(out)
    bad = pq.read_table(out / "errors").column("id").to_pylist() if (out / "errors").exists() else []
    assert len(set(ok)) == len(ok), "no row twice"
    assert sorted(ok + bad) == sorted(str(x) for x in pq.read_table(prompts).column("id").to_pylist())


def small_prompts(path: Path, n: int = 12, prompt=lambda i: f"def f{i}(x):\n    return", ids=None) -> Path:
    rows = [{"id": (ids[i] if ids else f"r{i}"), "prompt": prompt(i)} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("prompt", pa.string())])), path)
    return path


def small_job(prompts: Path, out: Path, **over) -> dict:
    d = job_dict(
        prompts,
        str(out),
        sharding={"rows_per_shard": 4},
        decoding={"max_new_tokens": 4, "seed": 1},
        baseline={"sample_fraction": 0.0},
    )
    for k, v in over.items():
        section, _, field = k.partition("__")
        d.setdefault(section, {})[field] = v
    return d


# ------------------------------------------------------------------ 1. changed input, changed model


def test_input_or_model_changed_in_place_is_refused_then_forced(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet")
    model = tmp_path / "target"
    shutil.copytree(TINY, model)
    out = tmp_path / "out"
    path = write_manifest(tmp_path, small_job(prompts, out, model__target=str(model)))
    r, _ = submit(path)
    assert r.exit_code == 0, r.output
    (out / "_commits" / "shard-00001.json").unlink()  # a partial run
    before = committed_ids(out)
    small_prompts(prompts, prompt=lambda i: f"class C{i}:\n    def m(self):")  # same row count, new content
    r, lines = submit(path)
    one_line_error(r, lines, 2, "input.path", "changed", "--force")
    assert committed_ids(out) == before, "nothing written on refusal"
    r, _ = submit(path, "--force")  # start over on the new input
    assert r.exit_code == 0, r.output
    exactly_once(prompts, out)
    (out / "_commits" / "shard-00002.json").unlink()
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))  # the model replaced in place
    r, lines = submit(path)
    one_line_error(r, lines, 2, "model.target", "changed")
    r, _ = submit(path, "--force")
    assert r.exit_code == 0, r.output
    exactly_once(prompts, out)


def test_config_conflict_names_the_fields(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet", n=4)
    out = tmp_path / "out"
    r, _ = submit(write_manifest(tmp_path, small_job(prompts, out)))
    assert r.exit_code == 0, r.output
    r, lines = submit(write_manifest(tmp_path, small_job(prompts, out, decoding__temperature=0.5)))
    one_line_error(r, lines, 2, "output.path", "decoding.temperature", "--force")


# ------------------------------------------------------------------ 2 + 4 + 5. storage: secrets, reopen, faults


@pytest.fixture
def moto(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="AKIATEST",
        aws_secret_access_key="s3cr3t-value",
        region_name="us-east-1",
    ).create_bucket(Bucket="adarun-guarantees")
    yield endpoint
    server.stop()


def test_credentials_never_written_and_reopening_takes_options(ray_cluster, tmp_path, moto):
    prompts = small_prompts(tmp_path / "in.parquet", n=4)
    endpoint = json.dumps({"endpoint_url": moto, "region_name": "us-east-1"})
    d = small_job(prompts, "s3://adarun-guarantees/out")
    d["output"]["storage_options"] = {
        "key": "AKIATEST",
        "secret": "s3cr3t-value",
        "client_kwargs": json.loads(endpoint),
    }
    r, _ = submit(write_manifest(tmp_path, d))
    assert r.exit_code == 0, r.output
    import s3fs

    fs = s3fs.S3FileSystem(key="AKIATEST", secret="s3cr3t-value", client_kwargs=json.loads(endpoint))
    for p in fs.find("adarun-guarantees/out"):
        assert b"s3cr3t-value" not in fs.cat_file(p) and b"AKIATEST" not in fs.cat_file(p), p
    opts = [
        "--storage-option",
        "key=AKIATEST",
        "--storage-option",
        "secret=s3cr3t-value",
        "--storage-option",
        f"client_kwargs={endpoint}",
    ]
    r = CliRunner().invoke(cli, ["status", "s3://adarun-guarantees/out", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["complete"], r.output
    r = CliRunner().invoke(cli, ["report", "s3://adarun-guarantees/out", "--format", "json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["total_rows"] == 4, r.output
    r = CliRunner().invoke(cli, ["resume", "s3://adarun-guarantees/out", *opts])
    assert r.exit_code == 0 and "nothing left to do: 1 shard(s) already committed (4 rows" in r.output, r.output
    no_creds = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }
    args = ["resume", "s3://adarun-guarantees/out", "--storage-option", f"client_kwargs={endpoint}"]
    r = CliRunner().invoke(cli, args, env=no_creds)
    lines = [ln for ln in r.output.splitlines() if ln.startswith("adarun:")]
    one_line_error(r, lines, 2, "OUTPUT", "Credentials")


def test_unreachable_store_is_one_line_exit_1_and_unusable_path_exit_2(tmp_path, prompts):
    d = small_job(prompts, "s3://adarun-guarantees/out")
    d["output"]["storage_options"] = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
    }
    t = time.time()
    r, lines = submit(write_manifest(tmp_path, d), "--dry-run")
    one_line_error(r, lines, 1, "output.path", "unreachable")
    assert time.time() - t < 30, "a few quick retries, not minutes"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r, lines = submit(write_manifest(tmp_path, small_job(prompts, blocker / "out")), "--dry-run")
    one_line_error(r, lines, 2, "output.path")


# ------------------------------------------------------------------ 3. placement


def test_more_workers_than_the_cluster_holds_carries_on_and_none_placeable_exits_2(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet", n=24)
    out = tmp_path / "out"
    r, _ = submit(write_manifest(tmp_path, small_job(prompts, out, resources__workers=6)))
    assert r.exit_code == 0, r.output
    exactly_once(prompts, out)
    r, lines = submit(write_manifest(tmp_path, small_job(prompts, tmp_path / "o2", resources__gpus_per_worker=1)))
    one_line_error(r, lines, 2, "resources.gpus_per_worker")


# ------------------------------------------------------------------ 6. models checked before any actor starts


def test_bad_models_fail_preflight_and_dry_run(tmp_path, prompts):
    d = small_job(prompts, tmp_path / "out", model__target=str(tmp_path / "nope"))
    one_line_error(*submit(write_manifest(tmp_path, d), "--dry-run"), 2, "model.target", "does not exist")
    gpt = tmp_path / "gpt"
    shutil.copytree(TINY, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    d = small_job(prompts, tmp_path / "out", model__target=str(gpt))
    one_line_error(*submit(write_manifest(tmp_path, d), "--dry-run"), 2, "model.target", "unsupported architecture")
    d = small_job(prompts, tmp_path / "out", model__draft=str(tmp_path / "nohead"))
    one_line_error(*submit(write_manifest(tmp_path, d), "--dry-run"), 2, "model.draft")
    d = small_job(prompts, tmp_path / "out", model__ldlp=str(TINY_HEAD))  # a head is not an LDLP
    d["speculative"] = {"method": "ldlp-tree"}
    one_line_error(*submit(write_manifest(tmp_path, d), "--dry-run"), 2, "model.ldlp")
    d = small_job(prompts, tmp_path / "out", decoding__max_new_tokens=100_000)
    one_line_error(*submit(write_manifest(tmp_path, d), "--dry-run"), 2, "decoding.max_new_tokens", "context")
    d = small_job(prompts, tmp_path / "out", model__ldlp=str(TINY_LDLP))
    d["speculative"] = {"method": "ldlp-tree"}
    assert submit(write_manifest(tmp_path, d), "--dry-run")[0].exit_code == 0


def test_a_checkpoint_that_fails_to_load_stops_the_job_at_once(ray_cluster, tmp_path, prompts):
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    t = time.time()
    r, lines = submit(write_manifest(tmp_path, small_job(prompts, tmp_path / "out", model__target=str(broken))))
    one_line_error(r, lines, 1, "failed to start")
    assert time.time() - t < 60 and not (tmp_path / "out" / "_commits").exists()


# ------------------------------------------------------------------ 8. data rules


def test_data_rules(ray_cluster, tmp_path):
    dup = small_prompts(tmp_path / "dup.parquet", n=4, ids=["a", "b", "a", "c"])
    r, lines = submit(write_manifest(tmp_path, small_job(dup, tmp_path / "o1")), "--dry-run")
    one_line_error(r, lines, 2, "input.id_column", "'a'", "allow_duplicate_ids")
    ok = submit(write_manifest(tmp_path, small_job(dup, tmp_path / "o1", input__allow_duplicate_ids=True)), "--dry-run")
    assert ok[0].exit_code == 0
    chat = tmp_path / "chat.parquet"  # a chat column is a prompt (rendered with the chat template)
    pq.write_table(pa.table({"id": ["a"], "prompt": [[{"role": "user", "content": "hi"}]]}), chat)
    assert submit(write_manifest(tmp_path, small_job(chat, tmp_path / "o2")), "--dry-run")[0].exit_code == 0
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": [3]}), numbers)
    one_line_error(
        *submit(write_manifest(tmp_path, small_job(numbers, tmp_path / "o2")), "--dry-run"),
        2,
        "input.prompt_column",
        "expected string",
    )
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"id": ["a", None, "c", "d"], "prompt": ["def f(", "def g(", "def h(", "def k("]}), nulls)
    out = tmp_path / "o3"
    r, _ = submit(write_manifest(tmp_path, small_job(nulls, out)))
    assert r.exit_code == 0, r.output
    errs = pq.read_table(out / "errors").to_pylist()
    assert [e["error"] for e in errs] == ["null id"] and sorted(committed_ids(out)) == ["a", "c", "d"]
    empty = small_prompts(tmp_path / "empty.parquet", n=8, prompt=lambda i: "   " if i < 6 else "def f(")
    r, lines = submit(write_manifest(tmp_path, small_job(empty, tmp_path / "o4")))
    one_line_error(r, lines, 1, "6 of 8 rows are error rows", "max_error_fraction")
    r, _ = submit(write_manifest(tmp_path, small_job(empty, tmp_path / "o4")), "--max-error-fraction", "0.9")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ 9. one writer per output


def test_one_writer_per_output(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet", n=4)
    out = tmp_path / "out"
    path = write_manifest(tmp_path, small_job(prompts, out))
    other = Lease(Store(str(out))).acquire()  # a live controller elsewhere
    try:
        one_line_error(*submit(path), 2, "another adarun", str(os.getpid()))
        assert not (out / "_commits").exists()
    finally:
        other.release()
    store = Store(str(out))
    store.write_json("_lease.json", {"owner": "x", "host": "elsewhere", "pid": 1, "started_at": 0, "heartbeat_at": 0})
    r, _ = submit(path)  # stale: taken over
    assert r.exit_code == 0, r.output
    assert not (out / "_lease.json").exists(), "released at the end"
    store.write_json(
        "_lease.json", {"owner": "x", "host": "elsewhere", "pid": 1, "started_at": 0, "heartbeat_at": time.time()}
    )
    one_line_error(*submit(path), 2, "another adarun", "elsewhere")
    other_config = write_manifest(tmp_path, small_job(prompts, out, decoding__temperature=0.5))
    r, _ = submit(other_config, "--force")  # takes the live lease and discards the other job's shards
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "_job_run.json").read_text())["runs"]) == 1, "--force starts the run record over"
    exactly_once(prompts, out)


# ------------------------------------------------------------------ 10. failure classes


def test_application_errors_retried_once_and_the_same_error_fails_early(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet", n=24)
    out = tmp_path / "o1"
    d = small_job(prompts, out, retry__max_attempts=5, retry__backoff_s=0.01)
    r, lines = submit(write_manifest(tmp_path, d), env={"ADARUN_CHAOS_FAIL_SHARDS": "1"})
    one_line_error(r, lines, 1, "shard-00001", "injected application failure")
    runs = json.loads((out / "_job_run.json").read_text())
    assert [x["attempt"] for x in runs["retries"] if x["shard"] == 1] == [1, 2], "one retry, not max_attempts"
    assert len(committed_ids(out)) == 20
    out = tmp_path / "o2"
    d = small_job(prompts, out, retry__max_attempts=5, retry__backoff_s=0.01, resources__workers=1)
    r, lines = submit(write_manifest(tmp_path, d), env={"ADARUN_CHAOS_FAIL_SHARDS": "0,1,2,3,4,5"})
    one_line_error(r, lines, 1, "the same error on 3 shards", "in.parquet", "injected application failure")


# ------------------------------------------------------------------ 11. the store lost files


def test_files_lost_mid_run_fail_the_final_check(ray_cluster, tmp_path):
    from jobs.controller import JobFailed
    from jobs.manifest import manifest_from_dict
    from tests.helpers import run_job

    prompts = small_prompts(tmp_path / "in.parquet", n=12)
    out = tmp_path / "out"

    def lose(event, d):
        if event == "commit" and d["shard"] == 0:
            (out / "shards" / "shard-00000.parquet").unlink()

    with pytest.raises(JobFailed, match="shard-00000"):
        run_job(manifest_from_dict(small_job(prompts, out)), listener=lose)


# ------------------------------------------------------------------ 12. paths, SIGINT


def test_relative_paths_recorded_absolute_and_resume_from_elsewhere(ray_cluster, tmp_path, monkeypatch):
    prompts = small_prompts(tmp_path / "in.parquet", n=4)
    monkeypatch.chdir(tmp_path)
    d = small_job(Path("in.parquet"), "out")
    d["model"]["target"] = os.path.relpath(TINY, tmp_path)
    d["model"]["draft"] = os.path.relpath(TINY_HEAD, tmp_path)
    r, _ = submit(write_manifest(tmp_path, d))
    assert r.exit_code == 0, r.output
    job = json.loads((tmp_path / "out" / "job.json").read_text())["manifest"]
    assert job["input"]["path"] == str(prompts) and job["model"]["target"] == str(TINY)
    monkeypatch.chdir(REPO)
    r = CliRunner().invoke(cli, ["resume", str(tmp_path / "out")])
    assert r.exit_code == 0 and "nothing left to do: 1 shard(s) already committed (4 rows" in r.output, r.output


def test_sigint_exits_130_and_a_rerun_completes(ray_cluster, tmp_path):
    prompts = small_prompts(tmp_path / "in.parquet", n=40)
    out = tmp_path / "out"
    path = write_manifest(tmp_path, small_job(prompts, out, decoding__max_new_tokens=24, resources__workers=1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "adarun", "submit", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, RAY_ADDRESS=ray_cluster),
        # Ctrl-C's default action: a suite started in the background (`.ci/run &`) passes SIGINT on ignored, and
        # Python then never turns it into KeyboardInterrupt (the job ran to its end and exited 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not ((out / "_commits").exists() and any((out / "_commits").iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no commit"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output, output
    assert not (out / "_lease.json").exists(), "the lease is released on the way out"
    r, _ = submit(path)
    assert r.exit_code == 0, r.output
    exactly_once(prompts, out)
