"""The transformers fallback (decode/hf_engine.py) for architectures our own model does not implement: on a tiny
random GPT-2 built here, greedy equals transformers' greedy `generate` (batched, left-padded prompts of different
lengths), a sampled row's text is the same alone and among companions, the stop rules hold, and the sampling
stream is plain decoding's (a Llama checkpoint through both engines gives the same sampled text). An adarun job
with `method: none` completes on it with a one-line warning; any other method fails preflight (exit 2, one line)."""

from __future__ import annotations

import logging
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from adaspec_worker.decode.build import build_engine, load_model
from adaspec_worker.decode.config import UnsupportedModel
from adaspec_worker.decode.hf_engine import HFEngine, HFTarget, load_hf_target
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.preflight import check_models
from jobs.cli import cli
from jobs.manifest import manifest_from_dict
from jobs.specs import parse_spec
from tests import tiny
from tests.helpers import TINY, TINY_HEAD, job_dict, run_job, write_manifest

NONE = parse_spec("none", {})


def _gpt2(path, vocab: int, eos=None, ctx: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=ctx,
        initializer_range=0.2,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    m = GPT2LMHeadModel(cfg).eval()
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2") / "target"
    hf = _gpt2(d, vocab=48)
    return hf, d


def _prompts(vocab=48):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 30, 1, 12)]


def test_greedy_equals_transformers_and_rows_are_batch_independent(gpt2):
    hf, d = gpt2
    tgt = load_model(str(d), NONE, "float32", "cpu")
    assert isinstance(tgt, HFTarget) and tgt.cfg.max_position_embeddings == 128
    eng = build_engine(tgt, NONE)
    assert isinstance(eng, HFEngine) and eng.spec.name == "none" and eng.drafter is None and eng.warmup_seconds == 0
    prompts = _prompts()
    ref = [
        hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(p) :].tolist()
        for p in prompts
    ]
    assert len({t for r in ref for t in r}) > 5
    outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.tokens for o in outs] == ref and {o.finish_reason for o in outs} == {"length"}
    assert stats.rows.rounds == 4 * 16 and stats.rows.tau == 1.0
    seeds = [3, 17, 17, 40]  # two rows share a seed on different prompts
    for kw in ({"temperature": 0.8}, {"temperature": 0.8, "top_p": 0.9, "top_k": 5}):
        sp = SamplingParams(max_new_tokens=16, **kw)
        alone = [eng.generate([p], sp, [s])[0][0].tokens for p, s in zip(prompts, seeds)]
        assert alone[1] != alone[2]
        for rows in ([0, 1, 2, 3], [3, 1, 0], [2, 0]):
            outs, _ = eng.generate([prompts[i] for i in rows], sp, [seeds[i] for i in rows])
            assert [o.tokens for o in outs] == [alone[i] for i in rows], (kw, rows)
    # stop rules as the own engine's: EOS ends a row (kept), a stop callback cuts it, the others run to length
    eos = ref[1][4]
    outs, _ = eng.generate(prompts, SamplingParams(max_new_tokens=16, eos_token_ids=(eos,)))
    cut = ref[1].index(eos) + 1
    assert outs[1].tokens == ref[1][:cut] and outs[1].finish_reason == "stop"
    stop = lambda i, t: 2 if i == 0 and len(t) >= 3 else None  # a stop string in row 0 once it has 3 tokens
    outs, _ = eng.generate(prompts, SamplingParams(max_new_tokens=16), stop_fn=stop)
    assert outs[0].tokens == ref[0][:2] and outs[0].finish_reason == "stop"
    assert outs[3].tokens == ref[3] and outs[3].finish_reason == "length"


def test_sampling_stream_is_plain_decodings(tmp_path):
    """The same Llama checkpoint through transformers and through our engine: the same sampled text per seed."""
    tiny.save(tiny.hf_model("llama", vocab=24), tmp_path / "t")
    ours = build_engine(load_target(str(tmp_path / "t"), "float64", "cpu"), NONE)
    theirs = build_engine(load_hf_target(str(tmp_path / "t"), "float64", "cpu"), NONE)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 2, 3]]
    for sp in (SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.9, top_k=8)):
        a, _ = ours.generate(prompts, sp, [5, 6, 7])
        b, _ = theirs.generate(prompts, sp, [5, 6, 7])
        assert [o.tokens for o in a] == [o.tokens for o in b]


def test_other_methods_refuse_an_unsupported_architecture(gpt2):
    _, d = gpt2
    with pytest.raises(UnsupportedModel, match="unsupported architecture 'GPT2LMHeadModel'.*method none"):
        load_model(str(d), parse_spec("eagle2", {}), "float32", "cpu")
    with pytest.raises(ValueError, match="speculative.method none only"):
        HFEngine(load_hf_target(str(d), "float32", "cpu"), parse_spec("eagle", {"k": 3}))


@pytest.fixture(scope="module")
def gpt2_job_dir(tmp_path_factory):
    """A tiny GPT-2 over the shipped tiny model's tokenizer (vocab 8192, EOS 0), as a job's target."""
    d = tmp_path_factory.mktemp("gpt2job") / "target"
    hf = _gpt2(d, vocab=8192, eos=0, ctx=1024)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / f, d / f)
    return hf, d


def _job(prompts, out, target, method="none"):
    d = job_dict(
        prompts,
        str(out),
        decoding={"max_new_tokens": 6, "seed": 1},
        sharding={"rows_per_shard": 20},
        resources={"workers": 1, "batch_size": 8, "cpus_per_worker": 1},
        baseline={"sample_fraction": 0.0},
    )
    d["model"] = {"target": str(target), "dtype": "float32", "device": "cpu"}
    if method != "none":
        d["model"]["draft"] = str(TINY_HEAD)
    d["speculative"] = {"method": method, "params": {}}
    return d


def test_preflight_warns_for_none_and_refuses_other_methods(gpt2_job_dir, prompts, tmp_path, caplog):
    _, target = gpt2_job_dir
    with caplog.at_level(logging.WARNING, logger="adarun.preflight"):
        assert check_models(manifest_from_dict(_job(prompts, tmp_path / "o", target))) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "adarun.preflight"]
    assert len(lines) == 1 and "GPT2LMHeadModel" in lines[0] and "slower fallback" in lines[0]
    manifest = write_manifest(tmp_path, _job(prompts, tmp_path / "o2", target, method="eagle2"))
    r = CliRunner().invoke(cli, ["submit", str(manifest), "--dry-run"])
    errors = [ln for ln in r.output.strip().splitlines() if ln.startswith("adarun:")]
    assert r.exit_code == 2 and "Traceback" not in r.output and len(errors) == 1, r.output
    assert "model.target" in errors[0] and "unsupported architecture" in errors[0] and "method none" in errors[0]


def test_job_with_method_none_decodes_through_transformers(ray_cluster, gpt2_job_dir, prompts, tmp_path):
    from transformers import AutoTokenizer

    hf, target = gpt2_job_dir
    out = tmp_path / "out"
    state = run_job(manifest_from_dict(_job(prompts, out, target)))
    assert not state.failed
    rows = []
    for p in sorted((out / "shards").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    assert len(rows) == 37  # 40 prompts, 3 of them error rows
    tok = AutoTokenizer.from_pretrained(str(target))
    for r in rows[:6]:  # greedy: transformers' own greedy text
        ids = tok(r["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        gen = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
        assert r["completion"] == tok.decode(gen, skip_special_tokens=True), r["id"]
        assert r["num_completion_tokens"] == len(gen)
