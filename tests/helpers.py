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


# greedy, and T = 0.8 plain and with top-p and top-k
SAMPLING_VARIANTS = [{}, {"temperature": 0.8}, {"temperature": 0.8, "top_p": 0.9, "top_k": 5}]


def assert_text_equals_plain(tgt, method: str, params: dict, draft=None, ldlp=None, vocab: int = 24,
                             new_tokens: int = 12) -> int:
    """Issue #12: every row of `method` gives `none`'s tokens for its seed, decoded alone and inside batches of
    different companions, greedy and sampled. Returns the drafted tokens accepted at T > 0 (so callers can check
    the comparison bites)."""
    import torch

    from adaspec_worker.decode.build import build_engine
    from adaspec_worker.decode.sampling import SamplingParams
    from jobs.specs import parse_spec

    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 10, (6,), generator=g)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]
    seeds = [3, 17, 17, 40, 41, 1234]  # two rows share a seed on different prompts
    plain = build_engine(tgt, parse_spec("none", {}))
    eng = build_engine(tgt, parse_spec(method, params), draft=str(draft) if draft else None,
                       ldlp=str(ldlp) if ldlp else None)
    batches = [[0], [1], [3, 0, 1, 2], [2, 4, 1, 5, 0]]  # alone, then among companions
    accepted = 0
    for kw in SAMPLING_VARIANTS:
        sp = SamplingParams(max_new_tokens=new_tokens, **kw)
        ref = [plain.generate([p], sp, seeds=[s])[0][0].tokens for p, s in zip(prompts, seeds)]
        for rows in batches:
            outs, stats = eng.generate([prompts[i] for i in rows], sp, seeds=[seeds[i] for i in rows])
            for i, o in zip(rows, outs):
                assert o.tokens == ref[i], (method, kw, rows, i)
            accepted += stats.rows.accepted if kw else 0
    return accepted
