"""Continuous batching across shards (issue #17): the engine decodes a stream of rows that grows while it decodes,
and the worker's device stage feeds it the shards' rows, hands each shard on when its rows are done, in order,
and fails only the shards whose rows were in the engine when it failed. Streamed rows decode to the same tokens
as each shard decoded alone."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from adaspec_worker.decode.batch import Outputs, Request
from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.stream import once
from adaspec_worker.pipeline import Pipeline
from adaspec_worker.rows import Row, RowSettings
from adaspec_worker.shard_stream import ShardStream
from adaspec_worker.tuning import Baseline
from jobs.manifest import manifest_from_dict
from jobs.specs import parse_spec
from tests.helpers import TINY, TINY_HEAD, job_dict

SPECS = {"none": {}, "eagle2": {"top_k": 3, "depth": 3, "total_tokens": 8}}
GREEDY, SAMPLED = SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.8)


@pytest.fixture(scope="module")
def tgt():
    return load_target(str(TINY), dtype="float32", device="cpu")


def engine(tgt, method):
    return build_engine(tgt, parse_spec(method, SPECS[method]), draft=str(TINY_HEAD) if method != "none" else None)


def prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 400, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)]


def stop_after(lengths):
    """A row tagged (shard, j) stops after lengths[shard][j] tokens (a stop string would, in a job)."""
    return lambda tag, toks: lengths[tag[0]][tag[1]] if len(toks) >= lengths[tag[0]][tag[1]] else None


LENGTHS = [[3, 14, 1, 9, 20, 2], [6, 11, 4, 2, 15], [5, 1, 8]]


@pytest.mark.parametrize("method", sorted(SPECS))
@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "T0.8"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_a_growing_stream_decodes_each_shard_as_alone(tgt, method, sp, chunk):
    """Shard k+1's rows arrive while shard k decodes (after its second finished row) and join its free slots:
    every row's tokens equal those of its shard decoded alone, and the shards shared target passes. With chunked
    prefill (prompts of up to 11 tokens, chunks of 3 positions) the same, its passes counted to the shards too."""
    eng = engine(tgt, method)
    stop = stop_after(LENGTHS)
    shards = [prompts(len(n), 10 + k) for k, n in enumerate(LENGTHS)]
    seeds = [[1000 * k + j for j in range(len(n))] for k, n in enumerate(LENGTHS)]
    alone = []
    for k, rows in enumerate(shards):
        done, _ = eng.generate(rows, sp, seeds[k], lambda j, toks, k=k: stop((k, j), toks), slots=4)
        alone.append([c.tokens for c in done])
    state = {"given": 0, "finished": 0}

    def source(wait):
        k = state["given"]
        if k == len(shards):
            return None if wait else []
        if k and not wait and state["finished"] < 2 * k:
            return []  # not read yet
        state["given"] += 1
        return [Request(p, sp, seeds[k][j], stop, tag=(k, j), group=k) for j, p in enumerate(shards[k])]

    run = eng.stream(source, slots=4, prefill_chunk=chunk)
    got, rounds = {}, [0] * len(shards)
    for f in run:
        state["finished"] += 1
        got[f.tag] = f.completion.tokens
        rounds[f.group] += f.completion.stats.rounds
    assert [[got[(k, j)] for j in range(len(n))] for k, n in enumerate(LENGTHS)] == alone
    per = [run.take_group(k) for k in range(len(shards))]
    assert sum(s.target_passes for s in per) > run.stats.target_passes  # rounds shared by two shards
    assert [s.rows.rounds for s in per] == rounds and run.stats.rows.rounds == sum(rounds)
    assert [s.busy_slot_rounds for s in per] == rounds  # a row's slot is busy in each of its rounds
    assert sum(s.slot_rounds for s in per) == run.stats.slot_rounds  # idle slot-rounds counted once, to a shard
    assert run.stats.occupancy > 0.6
    assert (run.stats.prefill_chunks > 0) == (chunk > 0)
    assert sum(s.prefill_chunks for s in per) >= run.stats.prefill_chunks  # a load may serve two shards' rows


def test_rows_with_other_sampling_wait_for_the_batch_to_drain(tgt):
    """A shard sampled at T=0.8 after a greedy one: never in the same round (the rule is baked into graphs), and
    each decodes as alone."""
    eng = engine(tgt, "eagle2")
    stop = stop_after(LENGTHS)
    a, b = prompts(6, 1), prompts(5, 2)
    reqs = [Request(p, GREEDY, j, stop, tag=(0, j), group=0) for j, p in enumerate(a)]
    reqs += [Request(p, SAMPLED, 100 + j, stop, tag=(1, j), group=1) for j, p in enumerate(b)]
    run = eng.stream(once(reqs), slots=4)
    got = {f.tag: f.completion.tokens for f in run}
    ref_a, _ = eng.generate(a, GREEDY, list(range(6)), lambda j, t: stop((0, j), t), slots=4)
    ref_b, _ = eng.generate(b, SAMPLED, [100 + j for j in range(5)], lambda j, t: stop((1, j), t), slots=4)
    assert [got[(0, j)] for j in range(6)] == [c.tokens for c in ref_a]
    assert [got[(1, j)] for j in range(5)] == [c.tokens for c in ref_b]
    per = [run.take_group(k) for k in (0, 1)]
    assert sum(s.target_passes for s in per) == run.stats.target_passes  # no round served both


# ---- the worker's device stage, on a real tiny engine through the pipeline (no Ray)
class Codec:
    """Text is the token ids; stop "fail@n" raises on a row's n-th token (a decode failure), "len:a,b,.." stops
    row j after its a_j tokens."""

    def stop_fn(self, stop):
        (rule,) = stop
        if rule.startswith("fail@"):
            n = int(rule[5:])

            def fail(_tag, toks):
                if len(toks) >= n:
                    raise RuntimeError("injected decode failure")
            return fail
        lengths = [int(x) for x in rule[4:].split(",")]
        return lambda j, toks: lengths[j] if len(toks) >= lengths[j] else None

    def text(self, tokens, stop):
        return " ".join(map(str, tokens))


def fake_worker(eng, slots=4, prefill_chunk=None):
    resources = {"batch_size": slots, **({} if prefill_chunk is None else {"prefill_chunk": prefill_chunk})}
    m = manifest_from_dict(job_dict("in.parquet", "out", resources=resources))
    energy = SimpleNamespace(read=lambda: None, kwh=lambda a, b: None)
    info = {"actor_id": "a", "node_id": "n", "host": "h", "pid": 1, "accelerator": "cpu", "device": "cpu"}
    return SimpleNamespace(m=m, engine=eng, sp=GREEDY, autotune=None, cost_model=None,
                           baseline=Baseline(eng, eng, GREEDY, 0.0), codec=Codec(), energy=energy,
                           info=lambda: info, job_hash="h")


def shard(index, stop, n=None, seed=0, sp=GREEDY):
    """A read shard as the device stage takes it: (job, prepared) with n samples (default: one per length)."""
    n = n if n is not None else len(stop[4:].split(","))
    st = RowSettings(sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, (stop,), 0, 1)
    good = [Row(f"s{index}r{j}", "p", p, 7 * index + j, 0, st, j, sp) for j, p in enumerate(prompts(n, seed))]
    job = SimpleNamespace(shard=SimpleNamespace(index=index, file="in.parquet"), attempt=1)
    data = SimpleNamespace(carried=None)
    return job, SimpleNamespace(good=good, errors=[], data=data, read_seconds=0.0, read_done=time.perf_counter())


def alone(eng, p, sp=GREEDY):
    """A shard's completions as text, decoded by one generate() call of its own."""
    rows, codec = p.good, Codec()
    done, _ = eng.generate([r.tokens for r in rows], sp, [r.seed for r in rows], codec.stop_fn(rows[0].settings.stop),
                           slots=4)
    return [codec.text(c.tokens, None) for c in done], done


def run_shards(worker, shards, warm_up=None):
    written = []
    prepared = {job.shard.index: p for job, p in shards}
    pipe = Pipeline(lambda job: prepared[job.shard.index], None, lambda job, d: written.append(job.shard.index) or d,
                    name="s", stream=ShardStream(worker, warm_up=warm_up))
    tickets = [pipe.submit(job) for job, _ in shards]
    out = []
    for t in tickets:
        try:
            out.append(t.done.result(timeout=120))
        except RuntimeError as e:
            out.append(e)
    pipe.close(timeout=10)
    return out, written


class Spy:
    """An engine stream that records which shard each finished row belonged to."""

    def __init__(self, run, log):
        self.run, self.log = run, log

    def __iter__(self):
        for f in self.run:
            if f.group is not None:  # not the engine warm-up's dummy rows (generate() calls: no shard)
                self.log.append(f.group)
            yield f

    def __getattr__(self, name):
        return getattr(self.run, name)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_shards_stream_through_the_engine_and_reach_the_writer_in_order(tgt, method):
    """Shard 1's rows take the slots shard 0's short rows free and are all done before shard 0's 20-token row
    (one token a round with `none`): shard 1 still reaches the writer after shard 0."""
    eng = engine(tgt, method)
    log: list = []
    real = eng.stream
    eng.stream = lambda *a, **k: Spy(real(*a, **k), log)
    stops = ["len:20,3,2,3,4", "len:2,3,1", "len:5,5,5,5,5,5", "len:1"]
    shards = [shard(k, s, seed=k) for k, s in enumerate(stops)]
    out, written = run_shards(fake_worker(eng), shards)
    assert written == [0, 1, 2, 3]
    if method == "none":
        first = log[0]  # the engine's group of shard 0
        assert len(log) - 1 - log[::-1].index(first + 1) < len(log) - 1 - log[::-1].index(first), log
    for (_, p), d in zip(shards, out):
        texts, done = alone(eng, p)
        assert [o.completion for o in d.outputs] == texts
        rounds = sum(c.stats.rounds for c in done)
        assert d.stats.rows == len(p.good) and d.stats.busy_slot_rounds == d.stats.rounds == rounds
        assert d.stats.slot_rounds >= d.stats.busy_slot_rounds and d.stats.target_passes > 0
    s = [d.stats for d in out]
    assert s[1].started_at < s[0].finished_at, "shard 1's rows started before shard 0's last row finished"
    assert sum(x.target_passes for x in s) > max(x.target_passes for x in s) + 3  # shards shared rounds


def test_the_manifest_s_prefill_chunk_reaches_the_engine_and_the_shard_stats(tgt):
    """resources.prefill_chunk 2: the shards' refills prefill in chunks (counted in their stats), same texts."""
    eng = engine(tgt, "eagle2")
    stops = ["len:9,3,2,3,4", "len:2,3,1", "len:5,5,5,5,5,5"]
    shards = [shard(k, s, seed=k) for k, s in enumerate(stops)]
    out, written = run_shards(fake_worker(eng, prefill_chunk=2), shards)
    assert written == [0, 1, 2]
    for (_, p), d in zip(shards, out):
        assert [o.completion for o in d.outputs] == alone(eng, p)[0]
    assert sum(d.stats.prefill_chunks for d in out) > 0
    out, _ = run_shards(fake_worker(eng), [shard(k, s, seed=k) for k, s in enumerate(stops)])
    assert sum(d.stats.prefill_chunks for d in out) == 0  # the default (512 positions): these prompts at once


def test_the_first_stream_warms_the_engine_up_and_its_first_shard_shows_it(tgt):
    """Before its first stream the device stage runs and times every shape of an adaptive menu (decode/warmup.py):
    the seconds are the first shard's `stages.warmup`, the policy has a measured time for each shape at the job's
    batch bucket, and no shard's text changes."""
    from adaspec_worker.decode.cost import CostModel

    eng = build_engine(tgt, parse_spec("ddd", {"top_k": 3, "max_depth": 4, "total_tokens": 8, "check_depths": [2]}),
                       draft=str(TINY_HEAD))
    eng.proposer.cost = CostModel.from_json({**CostModel.nominal().to_json(), "device": "cpu"})
    shards = [shard(k, s, seed=k) for k, s in enumerate(["len:4,3,2", "len:2,5"])]
    out, written = run_shards(fake_worker(eng), shards, warm_up=True)
    assert written == [0, 1]
    assert out[0].stats.stages["warmup"] > 0 and "warmup" not in out[1].stats.stages
    policy = eng.proposer.policy
    assert {shape for (B, _, shape) in policy.timings.seen if B == 4} == set(policy.shapes)
    for (_, p), d in zip(shards, out):
        assert [o.completion for o in d.outputs] == alone(eng, p)[0]


def test_a_decode_failure_fails_the_shards_in_the_engine_alone(tgt, monkeypatch):
    """Shard 1's rows fail on their first round while shard 0's long row still decodes: shards 0 and 1 fail with
    the error, shard 2 (not yet in the engine) and 3 decode as alone."""
    monkeypatch.setattr(Outputs, "STOP_EVERY", 1)  # the stop rule (which fails here) sees every round
    eng = engine(tgt, "none")
    shards = [shard(0, "len:2,2,2,2,20"), shard(1, "fail@1", n=2, seed=1), shard(2, "len:3,4", seed=2),
              shard(3, "len:2", seed=3)]
    out, written = run_shards(fake_worker(eng), shards)
    assert [isinstance(o, RuntimeError) for o in out] == [True, True, False, False]
    assert all("injected decode failure" in str(o) for o in out[:2])
    assert written == [2, 3]
    for (_, p), d in zip(shards[2:], out[2:]):
        assert [o.completion for o in d.outputs] == alone(eng, p)[0]


def test_a_failure_after_a_drain_fails_that_shard_alone(tgt):
    """Shard 1 samples (other SamplingParams): shard 0 drains first, so only shard 1 is in the slots when it fails
    (shard 2, queued behind it in the engine, goes into the next stream); shards 0 and 2 are written."""
    eng = engine(tgt, "none")
    shards = [shard(0, "len:2,5,2,2,9"), shard(1, "fail@2", n=3, seed=1, sp=SAMPLED), shard(2, "len:3,4", seed=2)]
    out, written = run_shards(fake_worker(eng), shards)
    assert [isinstance(o, RuntimeError) for o in out] == [False, True, False]
    assert written == [0, 2]
    assert [o.completion for o in out[2].outputs] == alone(eng, shards[2][1])[0]  # queued in the engine: decoded once


@pytest.mark.parametrize("alternatives", [False, True])
def test_autotune_and_the_baseline_leave_the_stream_as_alone(tgt, monkeypatch, alternatives):
    """Autotune (first shard, before its stream) and the measured baseline (at each hand-off, while later rows are
    in the slots, on the baseline's own engines) change no streamed token, and every shard gets its baseline of
    the chosen method: within the spec's own grid, and with the other methods as candidates too (on CPU plain
    decoding may win; then there is nothing to compare and no shard has a baseline record)."""
    import adaspec_worker.tuning as tuning

    if not alternatives:
        monkeypatch.setattr(tuning, "ALTERNATIVES", ())
    spec = parse_spec("eagle", {"k": 3})
    eng = build_engine(tgt, spec, draft=str(TINY_HEAD))
    worker = fake_worker(eng)
    worker.m.speculative.autotune.enabled = True
    worker.m.speculative.autotune.fraction = 0.01
    worker.baseline = Baseline(build_engine(tgt, spec, draft=str(TINY_HEAD)), engine(tgt, "none"), GREEDY, 0.2)
    shards = [shard(k, s, seed=k) for k, s in enumerate(["len:3,9,2,12", "len:4,1,6", "len:7,2"])]
    out, written = run_shards(worker, shards)
    assert written == [0, 1, 2] and worker.autotune is not None and worker.engine is not eng
    assert worker.baseline.engine.spec == worker.engine.spec and worker.baseline.engine is not worker.engine
    for (_, p), d in zip(shards, out):
        assert [o.completion for o in d.outputs] == alone(eng, p)[0]
        assert d.stats.autotune == worker.autotune
        assert bool(d.stats.baseline) == (worker.engine.spec.name != "none")
