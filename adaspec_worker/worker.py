"""The shard worker: loads tokenizer, target and drafter once, then turns shards into committed files.

The controller wraps `ShardWorker` in a Ray actor (one per worker, `num_gpus=gpus_per_worker`) and keeps
`resources.shards_in_flight` shards queued on it. A shard passes through three threads (`pipeline.Pipeline`):
- reader: reads its row range (`jobs.plan.read_rows`), tokenizes and rejects bad rows (`rows.RowCodec`, with
  its own tokenizer), while the shard before it decodes;
- device (the thread that also loaded, compiled and captured the models): decodes the samples through the
  engine's batch slots as one stream across shards (`shard_stream.ShardStream`: a finished row's slot takes
  the next row at once, the next shard's rows as the current shard's last ones decode; chat rows rendered
  with the target's chat template, n samples per row, per-row settings, log-probabilities when asked),
  hands each shard on once its rows are done, in order, and times a sample of its rows against plain
  decoding (`tuning.Baseline`);
- writer: commits through `jobs.layout.ShardFiles.commit` (the files in their exactly-once order, the marker
  last) while the next shard decodes.
`run_shard` returns once the shard is decoded and `committed` once its marker is written; a failure in any
stage is that shard's failure (so the controller knows, when an actor dies, which shard it was decoding).

This is the one module that imports both sides: `jobs` (manifest, plan, layout) and the decoder.
Torch, transformers and the decoder are imported when an actor starts, never when the controller
imports this module to name the actor class.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
from dataclasses import dataclass

from jobs.inputs import ShardInput
from jobs.layout import ErrorRow, ShardFiles
from jobs.manifest import manifest_from_dict
from jobs.plan import Shard, input_storage_options, read_rows
from jobs.specs import parse_spec
from jobs.storage import Store


@dataclass
class _Job:
    """What `run_shard` hands the pipeline."""

    shard: Shard
    attempt: int


@dataclass
class _Prepared:
    """A shard's rows after the read stage: samples ready to decode and error rows."""

    data: ShardInput
    good: list  # rows.Row, n per usable input row
    errors: list[ErrorRow]
    read_seconds: float
    read_done: float  # perf_counter when the read stage finished


class ShardWorker:
    def __init__(self, manifest: dict, output_url: str):
        self.started_at = time.time()  # the controller's creation time to this: Ray's scheduling and process start
        clock = _Phases()
        _quiet_third_parties()
        import torch  # noqa: F401 -- timed as part of "imports", not of the model load
        import transformers
        from transformers import AutoTokenizer

        from .pipeline import Pipeline
        from .shard_stream import ShardStream

        transformers.utils.logging.set_verbosity_error()
        clock.mark("imports")
        self.m = m = manifest_from_dict(manifest)
        self.files = ShardFiles(Store(output_url, m.output.storage_options, m.retry.backoff_s))
        job = self.files.job() or {}
        self.job_hash = job.get("job_hash", "")
        tok = AutoTokenizer.from_pretrained(m.model.target)
        read_tok = AutoTokenizer.from_pretrained(m.model.target)  # the reader thread's own: none shared by threads
        clock.mark("tokenizer")
        self.pipe = Pipeline(self._read, None, self._write, name="adarun-shard", stream=ShardStream(self, _kill_drill))
        self.order, self.next_seq, self.tickets = threading.Condition(), 0, {}  # run_shard's entry order
        self.pipe.on_device(lambda: self._load(tok, clock))  # the thread that decodes loads, compiles and captures
        self.read_codec = self._codec(read_tok)
        self.phases = clock.phases

    def _load(self, tok, clock: _Phases) -> None:
        """On the device thread: target, drafter, plain engine for the baseline, warm-up (compile, graph capture)."""
        import torch

        from .decode.build import build_engine, load_model, set_cost
        from .decode.cost import measure_for_actor
        from .decode.sampling import SamplingParams
        from .timing import EnergyMeter
        from .tuning import Baseline

        m = self.m
        torch.manual_seed(0)
        # our own model; for `method: none` on an architecture it lacks, transformers' (the slower fallback)
        self.target = load_model(m.model.target, m.speculative.spec(), m.model.dtype, m.model.device)
        clock.mark("model_load")
        self.engine = build_engine(self.target, m.speculative.spec(), draft=m.model.draft, ldlp=m.model.ldlp)
        plain = build_engine(self.target, parse_spec("none", {}))
        spec, fraction = m.speculative.spec(), m.baseline.sample_fraction
        # the baseline times rows while the job's engine streams: with engines (and drafter state) of its own
        timed = plain
        if Baseline.applies(spec, fraction):
            timed = build_engine(self.target, spec, draft=m.model.draft, ldlp=m.model.ldlp)
        clock.mark("draft_load")
        d = m.decoding
        eos = self.target.cfg.eos_token_ids or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
        self.eos = tuple(eos)
        self.sp = SamplingParams(d.max_new_tokens, d.temperature, d.top_p, d.top_k, self.eos)
        self.codec = self._codec(tok)
        self.baseline = Baseline(timed, plain, self.sp, fraction)
        self.autotune: dict | None = None  # the choice, once this actor has measured
        self.device = str(self.target.device)
        self.energy = EnergyMeter(self.device)
        self.accelerator = (
            torch.cuda.get_device_name()
            if self.device.startswith("cuda")
            else (platform.processor() or platform.machine())
        )
        self.engine.generate([[0]], SamplingParams(2, 0.0, 1.0, 0, ()))  # warm-up: first-call allocation/compile
        self.cost_model: dict | None = None  # this device's measured cost model, handed to the engine's policy
        if self.engine.spec.name != "none":
            cost = measure_for_actor(self.target, self.engine.drafter, m.model.target, m.resources.batch_size)
            set_cost(self.engine, cost)
            set_cost(self.baseline.engine, cost)  # the baseline times the method as the job runs it
            self.cost_model = cost.to_json()
        clock.mark("warmup")

    def _codec(self, tok):
        from .rows import RowCodec

        d, context = self.m.decoding, self.target.cfg.max_position_embeddings
        return RowCodec(tok, d.stop, d.max_new_tokens, context, self.m.input.system_prompt)

    @staticmethod
    def preflight(m) -> None:
        """Torch-free checks of the models, run by the controller before any actor starts."""
        from .preflight import check_models

        check_models(m)

    def ready(self) -> dict:
        """Returns once the constructor has finished: the controller dispatches only to ready actors.
        Besides `info()`: `started_at` (unix time the constructor began) and `phases` (constructor phase ->
        seconds: imports, tokenizer, model_load, draft_load, warmup), which the controller records."""
        return {**self.info(), "started_at": self.started_at, "phases": self.phases}

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

    def run_shard(self, shard: dict, attempt: int, seq: int) -> dict:
        """Queue a shard and return once the device has decoded it (a failure reading or decoding it is this
        call's exception); `committed(seq)` then returns once its files and marker are written. `seq` numbers
        this actor's shards from 0 in the controller's order: they enter the pipeline in that order whatever
        order Ray's threads run these calls in, so the first shard not yet decoded is the oldest the device is on
        (the next one's rows may share the engine's slots with its last ones: `shard_stream`)."""
        with self.order:
            self.order.wait_for(lambda: self.next_seq == seq)
            ticket = self.pipe.submit(_Job(Shard(**shard), attempt))
            self.tickets[seq] = ticket
            self.next_seq += 1
            self.order.notify_all()
        try:
            ticket.decoded.result()
        except BaseException:
            self.tickets.pop(seq, None)
            raise
        return {"shard": shard["index"], "decoded": True}

    def committed(self, seq: int) -> dict:
        """The counts the controller tallies, once shard `seq`'s commit marker is written (or the write's error)."""
        return self.tickets.pop(seq).done.result()

    # ---- the pipeline's stages
    def _read(self, job: _Job) -> _Prepared:
        """Reader thread: the shard's rows, tokenized."""
        t0 = time.perf_counter()
        m, sh = self.m, job.shard
        _fault_drill(sh.index)
        data = read_rows(sh, m.input, input_storage_options(sh.file, m.output.path, m.output.storage_options))
        good, errors = self._rows(sh, data)
        now = time.perf_counter()
        return _Prepared(data, good, errors, now - t0, now)

    def _write(self, job: _Job, d) -> dict:
        """Writer thread: the commit (shard -> errors -> stats -> marker, `ShardFiles.commit`)."""
        t0 = time.perf_counter()
        self.files.commit(d.outputs, d.errors, d.stats, d.commit, carried=d.carried, metadata=d.metadata,
                          logprobs=d.logprobs)
        return {
            "shard": job.shard.index,
            "rows": len(d.outputs),
            "error_rows": len(d.errors),
            "completion_tokens": d.stats.completion_tokens,
            "wall_seconds": d.stats.wall_seconds,
            "write_seconds": time.perf_counter() - t0,
        }

    def _rows(self, sh: Shard, data) -> tuple[list, list[ErrorRow]]:
        """Input rows -> samples ready to decode (n per row), and error rows (one per unusable input row)."""
        from .decode.sampling import SamplingParams
        from .rows import Row, row_seed, row_settings

        good, errors = [], []
        for i, (rid, prompt) in enumerate(zip(data.ids, data.prompts)):
            own = data.settings[i] if i < len(data.settings) else {}
            if rid is None or i in data.problems:
                where = f"{sh.file.rsplit('/', 1)[-1]}:{sh.start + i}"
                errors.append(ErrorRow(rid or where, data.problems.get(i, "null id")))
                continue
            st, err = row_settings(self.m.decoding, own)
            if err is None and isinstance(prompt, list):
                prompt, err = self.read_codec.render(prompt)
            toks = None
            if err is None:
                toks, err = self.read_codec.encode(prompt, st.max_new_tokens)
            if err:
                errors.append(ErrorRow(rid, err))
                continue
            sp = SamplingParams(st.max_new_tokens, st.temperature, st.top_p, st.top_k, self.eos, st.scored)
            for k in range(st.n):
                good.append(Row(rid, prompt, toks, row_seed(st.seed, rid, k), k, st, i, sp))
        return good, errors


class _Phases:
    """Named wall-clock phases of the constructor: mark(name) closes the phase that began at the last mark."""

    def __init__(self):
        self.t, self.phases = time.perf_counter(), {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.t
        self.t = now


def _quiet_third_parties() -> None:
    """Silence what transformers prints on every run (e.g. the tokenizer's sequence-length warning)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


def _fault_drill(index: int) -> None:
    """`ADARUN_CHAOS_FAIL_SHARDS=1,3` makes those shards raise (in the read stage), as a deterministic
    application bug would: a drill for the controller's failure classes, used by the tests (like the storage
    drill in jobs.storage)."""
    if index in _listed("ADARUN_CHAOS_FAIL_SHARDS"):
        raise RuntimeError("injected application failure")


def _kill_drill(index: int, attempt: int) -> None:
    """`ADARUN_CHAOS_KILL_SHARDS=5` ends the actor's process partway into decoding shard 5's first attempt, as a
    crash or an out-of-memory kill would (the fleet benchmark's fault run; the retry then succeeds). Partway:
    it runs once shard 5 is the oldest shard on the device (`ShardStream`), so the shard before it has told the
    controller it was decoded, as it has before a real crash in the
    middle of a shard (one at the very first instant of a shard can be charged to the shard before it once;
    the culprit then comes first on its next actor and is charged there)."""
    if attempt == 1 and index in _listed("ADARUN_CHAOS_KILL_SHARDS"):
        time.sleep(0.5)
        os._exit(17)


def _listed(var: str) -> set[int]:
    return {int(x) for x in os.environ.get(var, "").split(",") if x.strip().isdigit()}
