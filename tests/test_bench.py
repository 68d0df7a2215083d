"""`adarun bench` end to end on CPU with the tiny shipped model: valid JSON, Markdown and PNG files."""
import json

import matplotlib.image as mpimg
from click.testing import CliRunner

from jobs.cli import cli
from tests.helpers import REPO, TINY, TINY_HEAD


def test_bench_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("ADARUN_TOPK_SPLIT", "0")  # an engine switch: recorded
    monkeypatch.setenv("ADARUN_STORAGE_OPTION", "secret=hunter2")  # a job's storage option: never written
    out = tmp_path / "bench"
    r = CliRunner().invoke(cli, ["bench", "--target", str(TINY), "--draft", str(TINY_HEAD), "--draft-model", str(TINY),
                                 "--ldlp", str(REPO / "models" / "pycoder-tiny-ldlp"),
                                 "--prompts", str(REPO / "manifests" / "prompts.parquet"),
                                 "--methods", "eagle2:depth=3:total_tokens=10,adaeagle,eagle-thompson:lengths=[2,4]",
                                 "--batch-sizes", "1,2",
                                 "--temperatures", "0,0.7",
                                 "--new-tokens", "6", "--n-prompts", "2", "--repeats", "3", "--hf-prompts", "1",
                                 "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "bench.json").read_text())
    meta = res["meta"]
    for k in ("command", "git_commit", "device", "torch", "transformers", "python"):
        assert meta[k], k
    assert meta["engine_settings"] == {"ADARUN_TOPK_SPLIT": "0"}
    assert "hunter2" not in (out / "bench.json").read_text() + (out / "bench.md").read_text()
    labels = {c["label"] for c in res["cells"]}
    want = {"none", "eagle2:depth=3:total_tokens=10", "adaeagle", "eagle-thompson:lengths=[2,4]", "hf-generate",
            "hf-prompt-lookup", "hf-assisted"}
    assert want <= labels
    cell = next(c for c in res["cells"] if c["label"] == "adaeagle" and c["batch"] == 2 and c["temperature"] == 0.7)
    assert cell["tokens"] == 2 * 6 and len(cell["all_seconds"]) == 3 and cell["tau"] >= 1
    assert cell["speedup_vs_none"] > 0 and cell["speedup_vs_hf_generate"] > 0
    assert all(cell[k] >= 0 for k in ("draft_seconds", "verify_seconds", "other_seconds"))
    md = (out / "bench.md").read_text()
    assert md.count("\n| ") >= len(res["cells"]) and "vs HF generate" in md
    for png in ("speedup.png", "tau.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(out / png).std() > 0.01


def test_bench_cost_model_and_shape(tmp_path):
    """--cost-model --shape: both cost models in bench.json with the policy's choices, cost.png; the oracle's
    reference verification is recorded apart and not charged."""
    out = tmp_path / "bench"
    r = CliRunner().invoke(cli, ["bench", "--target", str(TINY), "--draft", str(TINY_HEAD),
                                 "--prompts", str(REPO / "manifests" / "prompts.parquet"),
                                 "--methods", "oracle:k_max=4:top_k=3", "--batch-sizes", "1,2",
                                 "--temperatures", "0,0.7",
                                 "--new-tokens", "6", "--n-prompts", "1", "--repeats", "1", "--baselines", "",
                                 "--dtype", "float32", "--device", "cpu", "--out", str(out), "--cost-model",
                                 "--shape", "tiny"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "bench.json").read_text())
    models = res["cost_models"]["models"]
    assert set(models) == {"target", "tiny"} and models["target"]["batches"] == [1, 2]
    assert all(v > 0 for line in models["tiny"]["target_s"] + models["tiny"]["draft_s"] for v in line)
    assert {c["batch"] for c in res["cost_models"]["policy"]["tiny"]} == {1, 2}
    assert mpimg.imread(out / "cost.png").std() > 0.01
    for T in (0.0, 0.7):
        cell = next(c for c in res["cells"] if c["label"].startswith("oracle") and c["temperature"] == T)
        assert cell["reference_seconds"] > 0 and cell["tau"] >= 1


def test_bench_natural_workload_compares_refill_on_and_off(tmp_path):
    out = tmp_path / "natural"
    r = CliRunner().invoke(cli, ["bench", "--target", str(TINY), "--draft", str(TINY_HEAD),
                                 "--prompts", str(REPO / "manifests" / "prompts.parquet"), "--workload", "natural",
                                 "--methods", "eagle:k=3", "--batch-sizes", "4", "--temperatures", "0",
                                 "--new-tokens", "24", "--n-prompts", "12", "--repeats", "1", "--prefill-chunk", "0",
                                 "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cells = json.loads((out / "bench.json").read_text())["cells"]
    assert all(c["prefill_chunk"] == 0 == c["prefill_chunks"] for c in cells)  # prompts prefilled at once
    assert {c["kind"] for c in cells} == {"natural"}  # no transformers rows: they cannot stop like a job
    assert {(c["label"], c["refill"]) for c in cells} == {(m, f) for m in ("none", "eagle:k=3") for f in (True, False)}
    for c in cells:
        assert c["outputs_equal_on_off"] and 0 < c["occupancy"] <= 1
        assert c["len_max"] <= 24 and c["len_p10"] <= c["len_p50"] <= c["len_p90"]
        assert (c["refill_speedup"] is not None) == c["refill"]
        assert c["speedup_vs_none"] > 0
    on = next(c for c in cells if c["label"] == "none" and c["refill"])
    off = next(c for c in cells if c["label"] == "none" and not c["refill"])
    assert on["tokens"] == off["tokens"] and on["stopped_early"] > 0  # the same rows, some stopping early
    assert on["occupancy"] >= off["occupancy"] and on["rounds"] <= off["rounds"]
    assert "Natural workload" in (out / "bench.md").read_text()


def test_a_cell_is_measured_with_no_earlier_methods_engine_alive(tmp_path, monkeypatch):
    """Engines hold reference cycles (compiled bound methods, captured graphs), so an earlier method's engine and its
    caches outlive it until the cycle collector runs: measured with it alive, a method's peak memory counted both."""
    import gc

    from adaspec_worker import timing
    from adaspec_worker.decode.engine import Engine

    alive: list[int] = []
    time_call = timing.time_call

    def counting(fn, device):
        alive.append(sum(isinstance(o, Engine) for o in gc.get_objects()))
        return time_call(fn, device)

    monkeypatch.setattr(timing, "time_call", counting)
    gc.collect()
    gc.disable()  # as when the collector has not happened to run between two cells
    try:
        r = CliRunner().invoke(cli, ["bench", "--target", str(TINY), "--draft", str(TINY_HEAD), "--baselines=",
                                     "--prompts", str(REPO / "manifests" / "prompts.parquet"),
                                     "--methods", "eagle:k=2,eagle2:depth=2:total_tokens=6", "--batch-sizes", "1",
                                     "--temperatures", "0", "--new-tokens", "4", "--n-prompts", "1", "--repeats", "1",
                                     "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "bench")])
    finally:
        gc.enable()
    assert r.exit_code == 0, r.output
    assert alive == [1, 1, 1], alive  # none, eagle, eagle2: one engine each time


def test_every_engine_switch_is_recorded_by_bench():
    """Each ADARUN_ variable the decoder reads is in bench's ENGINE_SETTINGS, so a cell's JSON says how it ran."""
    import re

    from adaspec_worker.bench import ENGINE_SETTINGS

    read = set()
    for path in (REPO / "adaspec_worker" / "decode").rglob("*.py"):
        read |= set(re.findall(r"environ\.get\(\"(ADARUN_[A-Z_0-9]+)\"", path.read_text()))
    assert read and read <= set(ENGINE_SETTINGS), read - set(ENGINE_SETTINGS)
