"""The architecture, checked: torch-free controller, no import cycles, layers that only import downwards,
the on-disk records (names, ShardStats, commit order), and that outputs written before the layout
change still resume (same config hash, old job.json accepted)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from jobs.layout import (
    OUTPUT_SCHEMA,
    Commit,
    ErrorRow,
    OutputRow,
    ShardFiles,
    ShardStats,
    shard_index,
    shard_name,
    total,
)
from jobs.manifest import manifest_from_dict
from jobs.storage import Store
from tests.helpers import REPO

PACKAGES = ("jobs", "adaspec_worker", "adarun")
CLI_MODULES = ("jobs.cli", "jobs.model_commands")  # the top: commands reach the worker side when they run
TORCH_FREE_WORKER_SIDE = (
    "adaspec_worker",
    "adaspec_worker.worker",
    "adaspec_worker.preflight",
    "adaspec_worker.decode",
    "adaspec_worker.decode.config",
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules and t != name:
                found.append((t, id(node) in top_level))
            elif t.split(".")[0] in ("torch", "ray", "transformers", "pyarrow", "fsspec"):
                found.append((t.split(".")[0], id(node) in top_level))
    return found


def test_no_import_cycles_in_the_project():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods) if t in mods} for m, p in mods.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            # a package's __init__ is not an edge into its children
            if state[t] == 1 and not m.startswith(t + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if state[t] == 0:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m, [m])


def test_layers_import_only_downwards():
    mods = _modules()
    for m, p in mods.items():
        for t, top in _imports(m, p, mods):
            if m.startswith("jobs") and m not in CLI_MODULES:
                assert not t.startswith("adaspec_worker") and t not in ("torch", "transformers"), f"{m} imports {t}"
            if m in CLI_MODULES and t.startswith("adaspec_worker"):
                assert not top, f"jobs.cli imports {t} at module level (commands import the worker side when they run)"
                assert t in ("adaspec_worker.worker", "adaspec_worker.bench") or t.startswith("adaspec_worker.train"), t
            if m.startswith("adaspec_worker.decode"):
                assert t in ("torch", "transformers") or t.startswith("adaspec_worker.decode") or t == "jobs.specs", (
                    f"the decoder knows nothing of Ray, Parquet, storage or manifests: {m} imports {t}"
                )
                assert t != "adaspec_worker.decode.build" or m == "adaspec_worker.decode.build", (
                    f"{m} imports the builder"
                )
            if m.startswith("adaspec_worker.decode.proposers"):
                assert t != "adaspec_worker.decode.engine", f"{m} imports the engine"
            if m.startswith("adaspec_worker.train"):
                assert not t.startswith(("jobs", "ray")) or t == "jobs.specs", f"{m} imports {t}"
            if m == "adaspec_worker.worker":
                assert not top or t not in ("torch", "transformers") and not t.startswith("adaspec_worker.decode"), (
                    f"worker.py must import {t} inside the actor, not when the controller names the class"
                )


def test_controller_side_never_loads_torch(tmp_path, prompts):
    """Import every jobs module, run --help and a --dry-run (whose preflight reads model configs through the
    torch-free `decode.config`): neither torch nor the rest of the decoder gets loaded."""
    from tests.helpers import job_dict, write_manifest

    manifest = write_manifest(tmp_path, job_dict(prompts, str(tmp_path / "out")))
    code = f"""
import sys, pkgutil, importlib, jobs
for m in pkgutil.iter_modules(jobs.__path__):
    importlib.import_module("jobs." + m.name)
from click.testing import CliRunner
from jobs.cli import cli
assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
r = CliRunner().invoke(cli, ["submit", {str(manifest)!r}, "--dry-run"])
assert r.exit_code == 0, r.output
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
             or m.startswith("adaspec_worker") and m not in {TORCH_FREE_WORKER_SIDE!r})
assert not bad, bad
print("clean")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr


def test_shard_names_round_trip():
    assert shard_name(12) == "shard-00012" and shard_index("shard-00012.json") == 12
    assert shard_index("report.json") is None and shard_index("shard-x.json") is None


def test_output_row_fields_are_the_arrow_schema():
    assert OUTPUT_SCHEMA.names == [
        "id",
        "prompt",
        "completion",
        "num_prompt_tokens",
        "num_completion_tokens",
        "finish_reason",
    ]


def _stats(i: int, **kw) -> ShardStats:
    base = dict(
        shard=i,
        attempt=1,
        rows=3,
        error_rows=1,
        prompt_tokens=30,
        completion_tokens=12,
        wall_seconds=2.0,
        started_at=100.0 + i,
        finished_at=102.0 + i,
        rounds=6,
        accepted_tokens=6,
        drafted_tokens=10,
        accepted_by_depth={1: 4, 2: 2},
        draft_lengths={3: 6},
        draft_seconds=0.5,
        energy_kwh=0.1,
        method="eagle2",
        actor_id="a",
    )
    return ShardStats(**{**base, **kw})


def test_shard_stats_json_round_trip_and_sum():
    a, b = _stats(0), _stats(1, actor_id="b", energy_kwh=None)
    again = ShardStats.from_json(json.loads(json.dumps(a.to_json())))
    assert again == a and a.to_json()["tau"] == 2.0
    s = a + b
    assert s.rows == 6 and s.rounds == 12 and s.accepted_by_depth == {1: 8, 2: 4} and s.tau == 2.0
    assert s.started_at == 100.0 and s.finished_at == 103.0 and s.method == "eagle2" and s.actor_id is None
    assert s.energy_kwh is None and (a + a).energy_kwh == 0.2
    assert total([a, b]) == s and total([]) == ShardStats()


def test_stats_written_before_the_layout_change_still_load():
    old = {
        "shard": 3,
        "attempt": 1,
        "rows": 8,
        "error_rows": 0,
        "errors": [],
        "prompt_tokens": 80,
        "completion_tokens": 96,
        "wall_seconds": 1.5,
        "started_at": 1.0,
        "finished_at": 2.5,
        "gpu_seconds": 0,
        "cpu_seconds": 1.5,
        "method": "eagle2",
        "params": {"top_k": 4},
        "rounds": 40,
        "drafted_tokens": 300,
        "accepted_tokens": 56,
        "tau": 2.4,
        "accepted_by_depth": {"1": 30, "2": 20},
        "draft_lengths": {"4": 40},
        "draft_seconds": 0.2,
        "verify_seconds": 0.9,
        "other_seconds": 0.4,
        "baseline": [],
        "energy_kwh": None,
        "autotune": None,
        "actor_id": "x",
        "node_id": "n",
        "host": "h",
        "pid": 1,
        "accelerator": "cpu",
        "device": "cpu",
    }
    s = ShardStats.from_json(old)
    assert s.tau == old["tau"] and s.accepted_by_depth == {1: 30, 2: 20}
    written = s.to_json()
    assert {k: written[k] for k in old if k not in ("accepted_by_depth", "draft_lengths")} == {
        k: v for k, v in old.items() if k not in ("accepted_by_depth", "draft_lengths")
    }
    added = set(written) - set(old)  # fields added since: at their "not measured" values
    assert added == {"target_passes", "slot_rounds", "busy_slot_rounds", "occupancy", "stages", "cost_model",
                     "prefill_chunks"}, added
    assert written["occupancy"] is None and written["slot_rounds"] == 0 and written["cost_model"] is None


class RecordingStore(Store):
    def __init__(self, root):
        super().__init__(root)
        self.writes: list[str] = []

    def write_bytes(self, rel, data):
        self.writes.append(rel)
        super().write_bytes(rel, data)


def test_commit_writes_the_marker_last(tmp_path):
    store = RecordingStore(str(tmp_path))
    files = ShardFiles(store)
    rows = [OutputRow("a", "p", "c", 3, 2, "stop")]
    files.commit(rows, [ErrorRow("b", "empty prompt")], _stats(7), Commit(7, 1, 1, 1, "h"))
    assert store.writes == [
        "shards/shard-00007.parquet",
        "errors/shard-00007.parquet",
        "stats/shard-00007.json",
        "_commits/shard-00007.json",
    ]
    assert pq.read_table(tmp_path / "shards" / "shard-00007.parquet").to_pylist()[0]["completion"] == "c"
    assert list(files.committed()) == [7] and files.stats(7) == _stats(7)
    files.commit(rows, [], _stats(8), Commit(8, 1, 0, 1, "h"))  # no errors file when there are none
    assert "errors/shard-00008.parquet" not in store.writes


def test_old_outputs_still_resume():
    """Config hashes are the ones adarun computed before `speculative.autotune` became its own field
    (values from commit d2751c0), and a job.json that kept autotune inside params still loads."""
    base = {
        "name": "a",
        "input": {"path": "/data/x.parquet"},
        "output": {"path": "/out/o"},
        "model": {"target": "/m/t", "draft": "/m/d"},
    }
    legacy = {
        **base,
        "speculative": {"method": "eagle2", "params": {"top_k": 4, "autotune": True, "autotune_fraction": 0.1}},
    }
    new = {
        **base,
        "speculative": {"method": "eagle2", "params": {"top_k": 4}, "autotune": {"enabled": True, "fraction": 0.1}},
    }
    ddd = {**base, "speculative": {"method": "ddd", "params": {"check_depths": [2, 4]}}}
    assert manifest_from_dict(legacy).config_hash() == manifest_from_dict(new).config_hash() == "38bde3b3aef846f1"
    assert manifest_from_dict(ddd).config_hash() == "28a7afc117f96a45"
    m = manifest_from_dict(legacy)
    assert m.speculative.autotune.enabled and m.speculative.params == {"top_k": 4, "depth": 6, "total_tokens": 60}
    assert manifest_from_dict(m.to_dict()).config_hash() == m.config_hash()


def test_ruff_is_clean():
    import shutil

    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra (pip install -e '.[test]')"
    out = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
