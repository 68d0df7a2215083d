"""Manifest validation: every bad field exits 2 with a one-line message naming it; --set, --dry-run, env vars."""

import json

import pytest
import yaml
from click.testing import CliRunner

from jobs.cli import cli
from jobs.manifest import Manifest, load_manifest
from tests.helpers import REPO, job_dict, write_manifest

BAD = [
    ("name", "", "name"),
    ("bogus", 1, "bogus"),
    ("input__path", "", "input.path"),
    ("input__limit", 0, "input.limit"),
    ("input__extra", 1, "input.extra"),
    ("output__path", "", "output.path"),
    ("output__storage_options", "nope", "output.storage_options"),
    ("model__target", "", "model.target"),
    ("model__dtype", "fp8", "model.dtype"),
    ("model__device", "tpu", "model.device"),
    ("decoding__max_new_tokens", 0, "decoding.max_new_tokens"),
    ("decoding__max_new_tokens", "many", "decoding.max_new_tokens"),
    ("decoding__temperature", -1, "decoding.temperature"),
    ("decoding__top_p", 0, "decoding.top_p"),
    ("decoding__top_k", -2, "decoding.top_k"),
    ("decoding__seed", 1.5, "decoding.seed"),
    ("decoding__stop", "x", "decoding.stop"),
    ("speculative__method", "magic", "speculative.method"),
    ("speculative__params", {"depth": -1}, "speculative.params"),
    ("speculative__params", {"nope": 1}, "speculative.params"),
    ("speculative__autotune", {"fraction": 0.9}, "speculative.autotune.fraction"),
    ("speculative__autotune", {"enabled": "yes"}, "speculative.autotune.enabled"),
    ("speculative__autotune", {"nope": 1}, "speculative.autotune.nope"),
    ("resources__workers", 0, "resources.workers"),
    ("resources__gpus_per_worker", -1, "resources.gpus_per_worker"),
    ("resources__cpus_per_worker", 0, "resources.cpus_per_worker"),
    ("resources__batch_size", 0, "resources.batch_size"),
    ("cluster__address", 5, "cluster.address"),
    ("sharding__rows_per_shard", 0, "sharding.rows_per_shard"),
    ("retry__max_attempts", 0, "retry.max_attempts"),
    ("retry__backoff_s", -1, "retry.backoff_s"),
    ("cost__gpu_hour_usd", -1, "cost.gpu_hour_usd"),
    ("cost__cpu_hour_usd", "free", "cost.cpu_hour_usd"),
    ("baseline__sample_fraction", 2, "baseline.sample_fraction"),
    ("input", "prompts.parquet", "input"),
    ("decoding__temperature", float("inf"), "decoding.temperature"),
    ("decoding__temperature", float("nan"), "decoding.temperature"),
    ("retry__backoff_s", float("inf"), "retry.backoff_s"),
    ("retry__max_attempts", 1_000_000_000, "retry.max_attempts"),
    ("retry__max_error_fraction", 1.5, "retry.max_error_fraction"),
    ("resources__batch_size", 10**9, "resources.batch_size"),
    ("resources__prefill_chunk", -1, "resources.prefill_chunk"),
    ("input__allow_duplicate_ids", "yes", "input.allow_duplicate_ids"),
]


@pytest.mark.parametrize("key,value,field", BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_bad_field_exits_2_naming_it(tmp_path, prompts, key, value, field):
    path = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out"), **{key: value}))
    r = CliRunner().invoke(cli, ["submit", str(path), "--dry-run"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert field in lines[0], lines[0]


def test_method_needs_draft(tmp_path, prompts):
    d = job_dict(prompts, str(tmp_path / "out"))
    d["model"].pop("draft")
    r = CliRunner().invoke(cli, ["submit", str(write_manifest(tmp_path, d)), "--dry-run"])
    assert r.exit_code == 2 and "model.draft" in r.output


def test_bad_yaml_missing_file_and_missing_input(tmp_path, prompts):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert CliRunner().invoke(cli, ["submit", str(bad)]).exit_code == 2
    assert CliRunner().invoke(cli, ["submit", str(tmp_path / "none.yaml")]).exit_code == 2
    d = job_dict(tmp_path / "missing.parquet", str(tmp_path / "out"))
    r = CliRunner().invoke(cli, ["submit", str(write_manifest(tmp_path, d)), "--dry-run"])
    assert r.exit_code == 2 and "input.path" in r.output
    d = job_dict(prompts, str(tmp_path / "out"), input__prompt_column="text")
    r = CliRunner().invoke(cli, ["submit", str(write_manifest(tmp_path, d)), "--dry-run"])
    assert r.exit_code == 2 and "input.prompt_column" in r.output


def test_set_overrides_and_defaults(tmp_path, prompts):
    path = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out")))
    m = load_manifest(str(path), ["decoding.temperature=0.7", "speculative.params.depth=3", 'decoding.stop=["\\n\\n"]'])
    assert m.decoding.temperature == 0.7 and m.speculative.params["depth"] == 3 and m.decoding.stop == ["\n\n"]
    assert m.cost.gpu_hour_usd == Manifest().cost.gpu_hour_usd  # defaults come from the dataclasses
    assert m.speculative.params["total_tokens"] == 12


def test_dry_run_plan_is_a_function_of_input_only(tmp_path, prompts):
    path = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out")))
    outs = []
    for workers in ("1", "7"):
        r = CliRunner().invoke(cli, ["submit", str(path), "--dry-run", "--set", f"resources.workers={workers}"])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.output))
    assert outs[0]["shards"] == outs[1]["shards"] and outs[0]["job_hash"] == outs[1]["job_hash"]
    assert [s["rows"] for s in outs[0]["shards"]] == [8, 8, 8, 8, 8] and outs[0]["rows"] == 40
    r = CliRunner().invoke(cli, ["submit", str(path), "--dry-run", "--set", "input.limit=10"])
    assert [s["rows"] for s in json.loads(r.output)["shards"]] == [8, 2]


def test_env_var_options(tmp_path, prompts):
    path = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out")))
    r = CliRunner().invoke(cli, ["submit", str(path), "--dry-run"], env={"ADARUN_SET": "sharding.rows_per_shard=20"})
    assert r.exit_code == 0 and [s["rows"] for s in json.loads(r.output)["shards"]] == [20, 20]


def test_shipped_manifest_is_valid():
    m = load_manifest(str(REPO / "manifests" / "job.yaml"))
    assert m.input.path.endswith("prompts.parquet") and yaml.safe_load((REPO / "manifests" / "job.yaml").read_text())


def test_manifest_not_utf8_or_with_a_recursive_anchor_exits_2(tmp_path):
    for name, data in (("latin1.yaml", "name: caf\xe9\n".encode("latin-1")), ("loop.yaml", b"name: &a [*a]\n")):
        p = tmp_path / name
        p.write_bytes(data)
        r = CliRunner().invoke(cli, ["submit", str(p), "--dry-run"])
        lines = [ln for ln in r.output.strip().splitlines() if ln]
        assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
        assert name in lines[0] or "manifest" in lines[0], lines[0]


def test_set_method_drops_the_files_params_of_another_method(tmp_path, prompts):
    path = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out")))  # eagle2 with top_k/depth/total_tokens
    m = load_manifest(str(path), ["speculative.method=eagle"])
    assert m.speculative.method == "eagle" and m.speculative.params == {"k": 5}
    m = load_manifest(str(path), ["speculative.method=eagle", "speculative.params.k=3"])
    assert m.speculative.params == {"k": 3}
