"""`adarun bench` end to end on CPU with the tiny shipped model: valid JSON, Markdown and PNG files."""
import json

import matplotlib.image as mpimg
from click.testing import CliRunner

from jobs.cli import cli
from tests.helpers import REPO, TINY, TINY_HEAD


def test_bench_writes_json_markdown_and_plots(tmp_path):
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
