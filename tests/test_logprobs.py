"""Log-probabilities of emitted tokens (decoding.logprobs / top_logprobs, issue #14): for plain decoding, a
speculative method and the transformers fallback, greedy and sampled, with continuous batching on and off and
the round launched ahead, each emitted token's value equals log_softmax of a plain forward over prompt +
completion (float32 CPU, the raw distribution: before temperature, top-k and top-p), the top-k lists are that
distribution's k largest in order, a stop cut trims them with the tokens, and off means no values at all."""

from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.hf_engine import HFEngine, load_hf_target
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from jobs.specs import parse_spec
from tests.helpers import TINY, TINY_HEAD

K = 3
LENGTHS = [5, 11, 2, 8, 14]  # each row's stopping point: rows finish at different rounds, so slots refill


@pytest.fixture(scope="module")
def tgt():
    return load_target(str(TINY), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in (4, 9, 1, 6, 3)]


def _stop_at(prompt: int, tokens: list[int]):
    return LENGTHS[prompt] if len(tokens) >= LENGTHS[prompt] else None


def _reference(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), V] log_softmax of a plain forward over prompt + completion, at each completion token."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) + len(completion) - 1].log_softmax(-1)


def _check(hf, prompts, outs, k: int) -> None:
    for p, c in zip(prompts, outs):
        assert len(c.logprobs) == len(c.tokens) == len(c.top_logprobs) and c.tokens
        ref = _reference(hf, p, c.tokens)
        want = ref.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-4, rtol=0)
        for j, top in enumerate(c.top_logprobs):
            assert len(top) == k
            values = [v for _, v in top]
            assert values == sorted(values, reverse=True)
            best = ref[j].topk(k)
            torch.testing.assert_close(torch.tensor(values), best.values, atol=2e-4, rtol=0)
            assert [i for i, _ in top] == best.indices.tolist() or k == 0


@pytest.mark.parametrize("method,params", [("none", {}), ("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8})])
def test_logprobs_equal_a_plain_forward(tgt, hf, method, params):
    eng = build_engine(tgt, parse_spec(method, params), draft=str(TINY_HEAD) if method != "none" else None)
    prompts, seeds = _prompts(), [11, 12, 13, 14, 15]
    accepted = 0
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9}):
        plain = eng.generate(prompts, SamplingParams(max_new_tokens=16, **kw), seeds, _stop_at)[0]
        sp = SamplingParams(max_new_tokens=16, logprobs=K, **kw)
        ref = None
        for slots, refill, overlap in ((None, True, False), (2, True, True), (2, False, False), (3, True, False)):
            eng.overlap = overlap  # the next round launched before this one is recorded (the CUDA default)
            outs, stats = eng.generate(prompts, sp, seeds, _stop_at, slots=slots, refill=refill)
            assert [c.tokens for c in outs] == [c.tokens for c in plain]  # asking for logprobs changes no token
            assert [len(c.tokens) for c in outs] == LENGTHS  # the stop cut trims the logprobs with the tokens
            _check(hf, prompts, outs, K)
            ref = ref or outs  # the same values whatever the batching (to float rounding: batch shapes differ)
            for a, b in zip(outs, ref):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
            accepted += stats.rows.accepted
        eng.overlap = False
    assert method == "none" or accepted > 0  # the speculative rows really took accepted tokens from the tree
    assert all(c.logprobs is None and c.top_logprobs is None for c in plain)  # off: nothing computed


def test_only_the_emitted_tokens_logprob_when_k_is_zero(tgt, hf):
    eng = build_engine(tgt, parse_spec("eagle", {"k": 3}), draft=str(TINY_HEAD))
    prompts = _prompts()
    outs, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=0))
    _check(hf, prompts, outs, 0)
    # k larger than a later call's: the outcome buffer grows, and a narrower request still reads back right
    wide, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=7))
    again, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=2))
    assert [c.logprobs for c in wide] == [c.logprobs for c in again] == [c.logprobs for c in outs]
    assert [[t[:2] for t in c.top_logprobs] for c in wide] == [c.top_logprobs for c in again]
    assert all(len(t) == 7 for c in wide for t in c.top_logprobs)


def test_transformers_fallback_reports_the_same_logprobs(tgt, hf):
    eng = HFEngine(load_hf_target(str(TINY), dtype="float32", device="cpu"), parse_spec("none", {}))
    prompts, seeds = _prompts(), [1, 2, 3, 4, 5]
    for kw in ({}, {"temperature": 0.8}):
        sp = SamplingParams(max_new_tokens=16, logprobs=K, **kw)
        outs, _ = eng.generate(prompts, sp, seeds, _stop_at, slots=2)
        _check(hf, prompts, outs, K)
        own, _ = build_engine(tgt, parse_spec("none", {})).generate(prompts, sp, seeds, _stop_at)
        assert [c.tokens for c in outs] == [c.tokens for c in own]
        for a, b in zip(outs, own):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-4, rtol=0)
    off, _ = eng.generate(prompts, SamplingParams(max_new_tokens=4), seeds)
    assert all(c.logprobs is None and c.top_logprobs is None for c in off)


# ---------------------------------------------------------------------------------------------- through a job


def test_job_writes_typed_logprob_columns(ray_cluster, tmp_path, hf):
    """decoding.logprobs + top_logprobs on an eagle2 job (continuous batching): typed columns, one entry per
    completion token, greedy's chosen token is its own top-1, and the values equal a plain forward's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from jobs.layout import LOGPROBS, TOP_LOGPROBS
    from jobs.manifest import manifest_from_dict
    from tests.helpers import job_dict, run_job

    rows = [{"id": f"r{i}", "prompt": f"def add{i}(a, b):\n    return"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    d = job_dict(tmp_path / "in.parquet", str(tmp_path / "out"),
                 decoding={"max_new_tokens": 8, "seed": 1, "logprobs": True, "top_logprobs": 2},
                 resources={"workers": 1, "batch_size": 2, "cpus_per_worker": 1})
    state = run_job(manifest_from_dict(d))
    assert not state.failed
    table = pq.read_table(tmp_path / "out" / "shards" / "shard-00000.parquet")
    assert table.schema.field("completion_logprobs").type == LOGPROBS
    assert table.schema.field("top_logprobs").type == TOP_LOGPROBS
    tok = AutoTokenizer.from_pretrained(str(TINY))
    for r in table.to_pylist():
        assert len(r["completion_logprobs"]) == len(r["top_logprobs"]) == r["num_completion_tokens"] > 0
        ids = [top[0]["token_id"] for top in r["top_logprobs"]]  # greedy: the emitted token is the top-1
        assert all(len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"] for top in r["top_logprobs"])
        assert all(top[0]["token"] == tok.decode([top[0]["token_id"]]) for top in r["top_logprobs"])
        assert [top[0]["logprob"] for top in r["top_logprobs"]] == r["completion_logprobs"]
        ref = _reference(hf, tok(r["prompt"], add_special_tokens=False)["input_ids"], ids)
        want = ref.gather(1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r["completion_logprobs"]), want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("k", [-1, 21])
def test_top_logprobs_out_of_range_exits_2(tmp_path, k):
    from click.testing import CliRunner

    from jobs.cli import cli
    from tests.helpers import job_dict, write_manifest

    d = job_dict(tmp_path / "x.parquet", str(tmp_path / "out"), decoding={"top_logprobs": k})
    r = CliRunner().invoke(cli, ["submit", str(write_manifest(tmp_path, d)), "--dry-run"])
    assert r.exit_code == 2 and "decoding.top_logprobs: must be in [0, 20]" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_top_logprobs_beyond_the_vocabulary_is_refused(tmp_path):
    import json

    from adaspec_worker.decode.config import ModelLoadError
    from adaspec_worker.preflight import check_models
    from jobs.manifest import manifest_from_dict
    from tests.helpers import job_dict

    model = tmp_path / "m"
    model.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16}))
    (model / "model.safetensors").write_bytes(b"")  # preflight reads listings and JSON only
    (model / "tokenizer.json").write_text("{}")
    d = job_dict(tmp_path / "x.parquet", str(tmp_path / "out"), decoding={"top_logprobs": 20},
                 speculative={"method": "none"})
    d["model"] = {"target": str(model)}
    with pytest.raises(ModelLoadError, match=r"decoding\.top_logprobs: 20 exceeds the target's vocabulary of 16"):
        check_models(manifest_from_dict(d))
    check_models(manifest_from_dict({**d, "decoding": {"top_logprobs": 16}}))


def test_openai_lines_and_row_settings_carry_logprobs():
    import json

    from adaspec_worker.rows import group_logprobs, row_settings
    from jobs.inputs import _parse_line
    from jobs.manifest import DecodingCfg

    chat = {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                       "top_logprobs": 4}}
    legacy = {"custom_id": "b", "body": {"prompt": "x", "logprobs": 3}}  # /v1/completions: an integer k
    assert _parse_line(json.dumps(chat))[2] == {"logprobs": True, "top_logprobs": 4}
    assert _parse_line(json.dumps(legacy))[2] == {"logprobs": True, "top_logprobs": 3}
    job = DecodingCfg()
    assert row_settings(job, {})[0].scored is None  # off unless asked
    assert row_settings(job, {"logprobs": True})[0].scored == 0
    assert row_settings(job, {"top_logprobs": 2})[0].scored == 2  # top_logprobs implies logprobs
    assert row_settings(DecodingCfg(logprobs=True, top_logprobs=5), {"logprobs": False, "top_logprobs": 0})[0].scored \
        is None  # a line may turn the job's logprobs off
    assert "top_logprobs: must be in [0, 20]" in row_settings(job, {"top_logprobs": 50})[1]
    assert "logprobs: must be true or false" in row_settings(job, {"logprobs": "yes"})[1]
    a, b, c = (row_settings(job, own)[0] for own in ({"logprobs": True}, {}, {"top_logprobs": 3}))
    assert a.batch_key == b.batch_key == c.batch_key  # rows differing only in logprobs decode together ...
    assert group_logprobs([a, b, c]) == 3 and group_logprobs([a, b]) == 0 and group_logprobs([b]) is None
    top = [[(7, -0.1), (2, -2.5), (9, -3.0)]]  # ... at the group's largest k, each row trimmed to its own
    assert a.trim_logprobs([-0.1], top) == ([-0.1], None)
    assert b.trim_logprobs([-0.1], top) == (None, None)
    assert c.trim_logprobs([-0.1], top) == ([-0.1], top)
    assert row_settings(job, {"top_logprobs": 2})[0].trim_logprobs([-0.1], top) == ([-0.1], [top[0][:2]])


def test_config_hash_unchanged_unless_logprobs_are_asked():
    from jobs.manifest import manifest_from_dict
    from tests.helpers import job_dict

    d = job_dict("x.parquet", "out")
    base = manifest_from_dict(d).config_hash()
    explicit_off = {**d, "decoding": {**d["decoding"], "logprobs": False, "top_logprobs": 0}}
    assert manifest_from_dict(explicit_off).config_hash() == base
    on = {**d, "decoding": {**d["decoding"], "logprobs": True}}
    top = {**d, "decoding": {**d["decoding"], "top_logprobs": 3}}
    assert len({base, manifest_from_dict(on).config_hash(), manifest_from_dict(top).config_hash()}) == 3
