"""The shard worker: loads tokenizer, target and drafter once, then turns shards into committed files.

The controller wraps `ShardWorker` in a Ray actor (one per worker, `num_gpus=gpus_per_worker`) and
hands it one shard at a time. For a shard the worker reads its row range (`jobs.plan.read_rows`),
tokenizes and rejects bad rows (`rows.RowCodec`), decodes the rest in batches through the engine,
times a sample of rows against plain decoding (`tuning.Baseline`), and commits through
`jobs.layout.ShardFiles.commit`, which writes the files in their exactly-once order.

This is the one module that imports both sides: `jobs` (manifest, plan, layout) and the decoder.
Torch, transformers and the decoder are imported when an actor starts, never when the controller
imports this module to name the actor class.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import time

from jobs.layout import Commit, ErrorRow, OutputRow, ShardFiles, ShardStats
from jobs.manifest import manifest_from_dict
from jobs.plan import Shard, input_storage_options, read_rows
from jobs.specs import parse_spec
from jobs.storage import Store


class ShardWorker:
    def __init__(self, manifest: dict, output_url: str):
        import torch
        from transformers import AutoTokenizer

        from .decode.build import build_engine
        from .decode.model import load_target
        from .decode.sampling import SamplingParams
        from .rows import RowCodec
        from .timing import EnergyMeter
        from .tuning import Baseline

        self.m = m = manifest_from_dict(manifest)
        self.files = ShardFiles(Store(output_url, m.output.storage_options, m.retry.backoff_s))
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(m.model.target)
        self.target = load_target(m.model.target, m.model.dtype, m.model.device)
        self.engine = build_engine(self.target, m.speculative.spec(), draft=m.model.draft, ldlp=m.model.ldlp)
        plain = build_engine(self.target, parse_spec("none", {}))
        d = m.decoding
        eos = self.target.cfg.eos_token_ids or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
        self.sp = SamplingParams(d.max_new_tokens, d.temperature, d.top_p, d.top_k, tuple(eos))
        self.codec = RowCodec(tok, d.stop, d.max_new_tokens, self.target.cfg.max_position_embeddings)
        self.baseline = Baseline(self.engine, plain, self.sp, m.baseline.sample_fraction)
        self.autotune: dict | None = None  # the choice, once this actor has measured
        self.device = str(self.target.device)
        self.energy = EnergyMeter(self.device)
        self.accelerator = (
            torch.cuda.get_device_name()
            if self.device.startswith("cuda")
            else (platform.processor() or platform.machine())
        )

    @staticmethod
    def preflight(m) -> None:
        """Torch-free checks of the models, run by the controller before any actor starts."""
        from .preflight import check_models

        check_models(m)

    def ready(self) -> dict:
        """Returns once the constructor has finished: the controller dispatches only to ready actors."""
        return self.info()

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "actor_id": ctx.get_actor_id(),
            "node_id": ctx.get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "accelerator": self.accelerator,
            "device": self.device,
        }

    def run_shard(self, shard: dict, attempt: int) -> dict:
        """Decode one shard and commit its files; returns the counts the controller tallies."""
        from .rows import Row, row_seed
        from .tuning import autotune

        t0, started, e0 = time.perf_counter(), time.time(), self.energy.read()
        m, sh = self.m, Shard(**shard)
        _fault_drill(sh.index)
        ids, prompts = read_rows(sh, m.input, input_storage_options(sh.file, m.output.path, m.output.storage_options))
        good, errors = [], []
        for i, (rid, prompt) in enumerate(zip(ids, prompts)):
            if rid is None:
                errors.append(ErrorRow(f"{sh.file.rsplit('/', 1)[-1]}:{sh.start + i}", "null id"))
                continue
            toks, err = self.codec.encode(prompt)
            if err:
                errors.append(ErrorRow(rid, err))
            else:
                good.append(Row(rid, prompt, toks, row_seed(m.decoding.seed, rid)))
        if m.speculative.autotune.enabled and self.autotune is None and good:
            self.engine, self.autotune = autotune(
                self.engine, good, self.sp, m.speculative.autotune.fraction, m.resources.batch_size
            )
        outputs, stats = self._decode(good)
        stats.baseline = self.baseline.run(good, self.engine)
        res = m.resources
        wall = time.perf_counter() - t0
        stats = dataclasses.replace(
            stats,
            shard=sh.index,
            attempt=attempt,
            rows=len(outputs),
            error_rows=len(errors),
            errors=[e.error for e in errors][:20],
            prompt_tokens=sum(o.num_prompt_tokens for o in outputs),
            completion_tokens=sum(o.num_completion_tokens for o in outputs),
            wall_seconds=wall,
            started_at=started,
            finished_at=time.time(),
            gpu_seconds=wall * res.gpus_per_worker,
            cpu_seconds=wall * res.cpus_per_worker,
            method=m.speculative.method,
            params=m.speculative.params,
            energy_kwh=self.energy.kwh(e0, self.energy.read()),
            autotune=self.autotune,
            **self.info(),
        )
        self.files.commit(
            outputs,
            errors,
            stats,
            Commit(
                shard=sh.index, rows=len(outputs), error_rows=len(errors), attempt=attempt, config_hash=m.config_hash()
            ),
        )
        return {
            "shard": sh.index,
            "rows": len(outputs),
            "error_rows": len(errors),
            "completion_tokens": stats.completion_tokens,
            "wall_seconds": wall,
        }

    def _decode(self, rows: list) -> tuple[list[OutputRow], ShardStats]:
        """Decode rows in batches of similar prompt length; outputs in input order, engine stats as ShardStats."""
        from .decode.stats import EngineStats

        done: dict[str, OutputRow] = {}
        total = EngineStats()
        order = sorted(rows, key=lambda r: len(r.tokens))  # similar lengths batch together
        bs = self.m.resources.batch_size
        for i in range(0, len(order), bs):
            batch = order[i : i + bs]
            completions, st = self.engine.generate(
                [r.tokens for r in batch], self.sp, [r.seed for r in batch], self.codec.stop_fn()
            )
            total = total + st
            for r, c in zip(batch, completions):
                done[r.id] = OutputRow(
                    r.id, r.prompt, self.codec.text(c.tokens), len(r.tokens), len(c.tokens), c.finish_reason
                )
        seq = total.rows
        stats = ShardStats(
            rounds=seq.rounds,
            drafted_tokens=seq.drafted,
            accepted_tokens=seq.accepted,
            accepted_by_depth=dict(seq.accepted_by_depth),
            draft_lengths=dict(seq.draft_lengths),
            draft_seconds=total.draft_seconds,
            verify_seconds=total.verify_seconds,
            other_seconds=total.other_seconds + total.prefill_seconds,
        )
        return [done[r.id] for r in rows], stats


def _fault_drill(index: int) -> None:
    """`ADARUN_CHAOS_FAIL_SHARDS=1,3` makes those shards raise, as a deterministic application bug would:
    a drill for the controller's failure classes, used by the tests (like the storage drill in jobs.storage)."""
    listed = os.environ.get("ADARUN_CHAOS_FAIL_SHARDS", "")
    if str(index) in {x.strip() for x in listed.split(",") if x.strip()}:
        raise RuntimeError("injected application failure")
