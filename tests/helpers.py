"""Test helpers shared by the test modules: repository paths and job manifests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = REPO / "models" / "pycoder-tiny"
TINY_HEAD = REPO / "models" / "pycoder-tiny-eagle"
TINY_LDLP = REPO / "models" / "pycoder-tiny-ldlp"


def job_dict(prompts: Path, out: str, **over) -> dict:
    d = {
        "name": "test",
        "input": {"path": str(prompts)},
        "output": {"path": out},
        "model": {"target": str(TINY), "draft": str(TINY_HEAD), "dtype": "float32", "device": "cpu"},
        "decoding": {"max_new_tokens": 12, "seed": 1},
        "speculative": {"method": "eagle2", "params": {"top_k": 4, "depth": 4, "total_tokens": 12}},
        "resources": {"workers": 2, "batch_size": 8, "cpus_per_worker": 1},
        "sharding": {"rows_per_shard": 8},
        "retry": {"max_attempts": 3, "backoff_s": 0.01},
        "baseline": {"sample_fraction": 0.05},
    }
    for k, v in over.items():
        section, _, field = k.partition("__")
        if field:
            d.setdefault(section, {})[field] = v
        else:
            d[section] = v
    return d


def write_manifest(tmp_path: Path, d: dict) -> Path:
    import yaml

    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def write_prompts(path: Path) -> Path:
    """40 prompts with ids, three of them bad (empty, null, far too long), in row groups of 7."""
    src = pq.read_table(REPO / "manifests" / "prompts.parquet").to_pylist()
    rows = [{"id": r["id"], "prompt": r["prompt"][-300:]} for r in src[:37]]
    rows += [
        {"id": "bad-empty", "prompt": "   "},
        {"id": "bad-null", "prompt": None},
        {"id": "bad-long", "prompt": "x = 1\n" * 2000},
    ]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=7)
    return path


def run_job(m, **kw):
    """The controller with the real worker class, as `adarun submit` runs it."""
    from adaspec_worker.worker import ShardWorker
    from jobs.controller import run_job as controller_run_job

    return controller_run_job(m, ShardWorker, **kw)
