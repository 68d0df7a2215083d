"""The shard worker: loads tokenizer, target and drafter once, then turns shards into committed files.

The controller wraps `ShardWorker` in a Ray actor (one per worker, `num_gpus=gpus_per_worker`) and
hands it one shard at a time. For each shard the worker reads its row range of one Parquet file,
tokenizes, rejects bad rows into the errors file, decodes in batches through the engine, times a
sample of rows against plain decoding (the measured baseline), and writes, in this order:
shards/, errors/ (when any), stats/, then the commit marker.

Torch and transformers are imported when a worker starts, never when the controller imports this
module; the decoder underneath knows nothing of Ray, Parquet or storage.
"""
from __future__ import annotations

import hashlib
import io
import os
import platform
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.manifest import Manifest, manifest_from_dict
from jobs.plan import input_storage_options
from jobs.storage import Store, shard_name

from jobs.specs import split_autotune

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("num_prompt_tokens", pa.int32()), ("num_completion_tokens", pa.int32()), ("finish_reason", pa.string()),
])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])


def row_seed(seed: int, row_id: str) -> int:
    """Each row's sampling seed: a pure function of (decoding.seed, row id)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") & ((1 << 62) - 1)


def in_baseline_sample(row_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"baseline:{row_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def read_rows(shard: dict, m: Manifest) -> tuple[list[str], list]:
    """(ids, prompts) for the shard's row range, reading only the row groups that overlap it."""
    fs, p = url_to_fs(shard["file"], **input_storage_options(shard["file"], m.output.path, m.output.storage_options))
    start, n = shard["start"], shard["rows"]
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        cols = [m.input.prompt_column] + ([m.input.id_column] if m.input.id_column in names else [])
        groups, first, acc = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            gn = pf.metadata.row_group(g).num_rows
            if acc + gn > start and acc < start + n:
                groups.append(g)
                first = acc if first is None else first
            acc += gn
        table = pf.read_row_groups(groups, columns=cols).slice(start - first, n)
    prompts = table.column(m.input.prompt_column).to_pylist()
    if m.input.id_column in names:
        ids = [str(x) for x in table.column(m.input.id_column).to_pylist()]
    else:
        base = shard["file"].rsplit("/", 1)[-1]
        ids = [f"{base}:{start + i}" for i in range(n)]
    return ids, prompts


class ShardWorker:
    def __init__(self, manifest: dict, output_url: str):
        import torch
        from transformers import AutoTokenizer

        from .decode.engine import Engine
        from .decode.model import load_target
        from .decode.sampling import SamplingParams

        self.m = m = manifest_from_dict(manifest)
        self.store = Store(output_url, m.output.storage_options, m.retry.backoff_s)
        torch.manual_seed(0)
        self.tok = AutoTokenizer.from_pretrained(m.model.target)
        self.target = load_target(m.model.target, m.model.dtype, m.model.device)
        params, self.tune = split_autotune(m.speculative.params)
        self.engine = Engine.load(self.target, m.speculative.method, params, m.model.draft, m.model.ldlp)
        self.autotune: dict | None = None  # the choice, once this actor has measured
        self.plain = Engine(self.target, "none")
        d = m.decoding
        eos = self.target.cfg.eos_token_ids or ((self.tok.eos_token_id,) if self.tok.eos_token_id is not None else ())
        self.sp = SamplingParams(d.max_new_tokens, d.temperature, d.top_p, d.top_k, tuple(eos))
        self.device = str(self.target.device)
        self.accelerator = torch.cuda.get_device_name() if self.device.startswith("cuda") else (platform.processor() or platform.machine())

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id(), "host": socket.gethostname(),
                "pid": os.getpid(), "accelerator": self.accelerator, "device": self.device}

    # ------------------------------------------------------------------ one shard
    def run_shard(self, shard: dict, attempt: int) -> dict:
        from .decode.engine import EngineStats

        t0, started = time.perf_counter(), time.time()
        e0 = self._energy_mj()
        m = self.m
        ids, prompts = read_rows(shard, m)
        ctx = self.target.cfg.max_position_embeddings
        good, errors = [], []
        for rid, prompt in zip(ids, prompts):
            err, toks = self._check_row(prompt, ctx)
            if err:
                errors.append((rid, err))
            else:
                good.append((rid, prompt, toks))
        if self.tune["autotune"] and self.autotune is None and good:
            self._autotune(good)
        results: dict[str, tuple] = {}
        stats = EngineStats()
        order = sorted(range(len(good)), key=lambda i: len(good[i][2]))  # similar lengths batch together
        bs = m.resources.batch_size
        for s in range(0, len(order), bs):
            batch = [good[i] for i in order[s: s + bs]]
            outs, st = self.engine.generate([b[2] for b in batch], self.sp, [row_seed(m.decoding.seed, b[0]) for b in batch],
                                            self._stop_fn())
            stats.merge(st)
            for (rid, prompt, toks), c in zip(batch, outs):
                results[rid] = (prompt, self._text(c.tokens), len(toks), len(c.tokens), c.finish_reason)
        baseline = self._baseline(good)
        rows = [(rid, *results[rid]) for rid, _, _ in good]
        name = shard_name(shard["index"])
        table = pa.Table.from_pylist([dict(zip(OUTPUT_SCHEMA.names, r)) for r in rows], schema=OUTPUT_SCHEMA)
        self.store.write_bytes(f"shards/{name}.parquet", _parquet_bytes(table))
        if errors:
            et = pa.Table.from_pylist([{"id": i, "error": e} for i, e in errors], schema=ERROR_SCHEMA)
            self.store.write_bytes(f"errors/{name}.parquet", _parquet_bytes(et))
        wall = time.perf_counter() - t0
        e1 = self._energy_mj()
        res = m.resources
        seq = stats.seq
        shard_stats = {
            "shard": shard["index"], "attempt": attempt, "rows": len(rows), "error_rows": len(errors),
            "errors": [e for _, e in errors][:20],
            "prompt_tokens": sum(r[3] for r in rows), "completion_tokens": sum(r[4] for r in rows),
            "wall_seconds": wall, "started_at": started, "finished_at": time.time(),
            "gpu_seconds": wall * res.gpus_per_worker, "cpu_seconds": wall * res.cpus_per_worker,
            "method": m.speculative.method, "params": m.speculative.params,
            "rounds": seq.rounds, "drafted_tokens": seq.drafted, "accepted_tokens": seq.accepted,
            "tau": seq.tau, "accepted_by_depth": dict(sorted(seq.accepted_by_depth.items())),
            "draft_lengths": dict(sorted(seq.draft_lengths.items())),
            "draft_seconds": stats.draft_s, "verify_seconds": stats.verify_s,
            "other_seconds": stats.other_s + stats.prefill_s, "baseline": baseline,
            "energy_kwh": (e1 - e0) / 3.6e9 if e0 is not None and e1 is not None else None,
            "autotune": self.autotune,
            **self.info(),
        }
        self.store.write_json(f"stats/{name}.json", shard_stats)
        self.store.write_json(f"_commits/{name}.json", {"shard": shard["index"], "rows": len(rows), "error_rows": len(errors),
                                                        "attempt": attempt, "committed_at": time.time(),
                                                        "config_hash": m.config_hash()})
        return {"shard": shard["index"], "rows": len(rows), "error_rows": len(errors),
                "completion_tokens": shard_stats["completion_tokens"], "wall_seconds": wall}

    # ------------------------------------------------------------------ helpers
    def _autotune(self, good: list) -> None:
        """Measure the method's candidate settings on a small slice of rows; keep the fastest for this actor."""
        import math

        from .decode.engine import Engine
        from jobs.specs import autotune_candidates  # noqa: PLC0415

        m = self.m
        n = max(m.resources.batch_size, math.ceil(self.tune["autotune_fraction"] * len(good)))
        rows = [g[2] for g in good[:n]]
        seeds = [row_seed(m.decoding.seed, g[0]) for g in good[:n]]
        ldlp = getattr(self.engine.proposer, "ldlp", None)
        tried, t0 = [], time.perf_counter()
        for params in autotune_candidates(m.speculative.method, split_autotune(m.speculative.params)[0]):
            eng = Engine(self.target, m.speculative.method, params, self.engine.drafter, ldlp)
            eng.generate(rows, self.sp, seeds)  # warm-up (graphs, allocator)
            sync = _sync_fn(self.device)
            t = time.perf_counter()
            outs, _ = eng.generate(rows, self.sp, seeds)
            sync()
            tps = sum(len(o.tokens) for o in outs) / (time.perf_counter() - t)
            tried.append({"params": params, "tokens_per_second": tps})
            if tps >= max(x["tokens_per_second"] for x in tried):
                best = eng
        self.engine = best
        self.autotune = {"rows": n, "seconds": time.perf_counter() - t0, "candidates": tried,
                         "chosen": max(tried, key=lambda x: x["tokens_per_second"])["params"]}

    def _energy_mj(self) -> float | None:
        """The GPU's energy counter (millijoules) through NVML, where it can be read."""
        if not self.device.startswith("cuda"):
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            h = pynvml.nvmlDeviceGetHandleByIndex(int(vis) if vis.isdigit() else 0)
            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
        except Exception:  # no NVML, or a GPU that does not report energy
            return None

    def _check_row(self, prompt, ctx: int) -> tuple[str | None, list[int] | None]:
        if prompt is None:
            return "empty prompt (null)", None
        if not isinstance(prompt, str):
            return f"undecodable prompt (type {type(prompt).__name__})", None
        if not prompt.strip():
            return "empty prompt", None
        toks = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not toks:
            return "prompt tokenizes to nothing", None
        if len(toks) + self.sp.max_new_tokens > ctx:
            return f"prompt too long: {len(toks)} tokens + max_new_tokens {self.sp.max_new_tokens} > context {ctx}", None
        return None, toks

    def _text(self, tokens: list[int]) -> str:
        text = self.tok.decode(tokens, skip_special_tokens=True)
        for s in self.m.decoding.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def _stop_fn(self):
        stops = self.m.decoding.stop
        if not stops:
            return None
        tail = max(len(s) for s in stops) + 16  # tokens: each is at least one character

        def fn(_row: int, toks: list[int]):
            # called every round, so a stop string not in the tail was already caught in an earlier round
            text = self.tok.decode(toks[-tail:], skip_special_tokens=True)
            if not any(s in text for s in stops):
                return None
            for k in range(1, len(toks) + 1):  # the shortest prefix that already holds a stop string
                t = self.tok.decode(toks[:k], skip_special_tokens=True)
                if any(s in t for s in stops):
                    return k
            return len(toks)
        return fn

    def _baseline(self, good: list) -> list[dict]:
        """Decode a sample of rows both ways, one at a time, on this actor: the measured speedup's data."""
        frac = self.m.baseline.sample_fraction
        if frac <= 0 or not good or self.m.speculative.method == "none":
            return []
        picked = [g for g in good if in_baseline_sample(g[0], frac)] or [good[0]]
        if not getattr(self, "_baseline_warm", False):  # first use on this actor: compile/capture outside the timing
            for eng in (self.engine, self.plain):
                eng.generate([picked[0][2]], self.sp, [0])
            self._baseline_warm = True
        out = []
        for rid, _, toks in picked:
            seed = [row_seed(self.m.decoding.seed, rid)]
            row = {"id": rid}
            for key, eng in (("spec", self.engine), ("plain", self.plain)):
                sync = _sync_fn(self.device)
                t = time.perf_counter()
                outs, st = eng.generate([toks], self.sp, seed)
                sync()
                row[f"{key}_seconds"] = time.perf_counter() - t
                row[f"{key}_tokens"] = len(outs[0].tokens)
            out.append(row)
        return out


def _sync_fn(device: str):
    if device.startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return lambda: None


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
