"""Sampling is lossless: the verifier's output distribution equals the target's.

1. Exact: for fixed target distributions and draft trees on tiny vocabularies, enumerate every
   accept/reject branch of the verifier's rules (its own `reject` / `residual` steps) and compare
   the resulting next-token distribution with p (TV < 1e-9).
2. Monte-Carlo through the whole engine: the joint law of the first two sampled tokens from a tiny
   float64 target, tree and chain methods, batch > 1, N = 30,000 rows, against exact enumeration
   from the target alone (TV < 0.03).
Each test is run again with a deliberately broken verifier and must then fail, proving its power.
"""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode import verify
from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams, target_probs
from jobs.specs import parse_spec
from tests import tiny


def broken_reject(r, x, rejected):  # forgets to zero the rejected token: biased towards it
    return r


def broken_residual(p, q):  # samples the bonus from p instead of norm(max(0, p - q))
    return p


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


# ------------------------------------------------------------------ exact enumeration

def node_output(r: torch.Tensor, children: list[int]) -> torch.Tensor:
    """Exact law of the token a node emits next under the tree rule, from the verifier's own steps."""
    out = torch.zeros_like(r)
    alive = 1.0
    for x in children:
        a = float(r[x])
        out[x] += alive * a  # accepted: the child's token is emitted next
        alive *= 1 - a
        r = verify.reject(r[None], torch.tensor([x]), torch.tensor([True]))[0]
    return out + alive * r  # all rejected (or a leaf): the bonus from what is left of r


def chain_output(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact law of the first token under the min(1, p/q) chain rule with a sampled draft y ~ q."""
    out = torch.zeros_like(p)
    rej = 0.0
    for y in range(p.shape[0]):
        a = min(1.0, float(p[y] / q[y])) if q[y] > 0 else 0.0
        out[y] += q[y] * a
        rej += q[y] * (1 - a)
    return out + rej * verify.residual(p[None], q[None])[0]


def _random_cases(n=200, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, 0)
        p[torch.rand(V, generator=g) < 0.2] = 0  # some zero-probability tokens, as after top-k/top-p
        p = p / p.sum() if p.sum() > 0 else torch.full((V,), 1.0 / V, dtype=torch.float64)
        k = int(torch.randint(0, V + 1, (1,), generator=g))
        children = torch.randperm(V, generator=g)[:k].tolist()
        q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, 0)
        yield p, children, q


def test_exact_tree_rule_equals_p():
    worst = max(tv(node_output(p.clone(), ch), p) for p, ch, _ in _random_cases())
    assert worst < 1e-9


def test_exact_chain_rule_equals_p():
    worst = max(tv(chain_output(p, q), p) for p, _, q in _random_cases())
    assert worst < 1e-9


def test_exact_tests_fail_on_broken_verifier(monkeypatch):
    monkeypatch.setattr(verify, "reject", broken_reject)
    monkeypatch.setattr(verify, "residual", broken_residual)
    assert max(tv(node_output(p.clone(), ch), p) for p, ch, _ in _random_cases()) > 1e-3
    assert max(tv(chain_output(p, q), p) for p, _, q in _random_cases()) > 1e-3


# ------------------------------------------------------------------ Monte-Carlo through the engine

V = 6
N = 30_000
PROMPT = [1, 4, 2]
SP = SamplingParams(max_new_tokens=2, temperature=1.0)


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    d = tmp_path_factory.mktemp("mc")
    tiny.save(tiny.hf_model("llama", vocab=V, hidden=16, layers=1, seed=3), d / "target")
    tiny.save(tiny.hf_model("llama", vocab=V, hidden=16, layers=1, seed=4), d / "draft")
    tiny.random_eagle_head(d / "target", d / "head", seed=5)
    tgt = load_target(str(d / "target"), dtype="float64", device="cpu")
    # exact joint law of the first two tokens from the target alone
    with torch.no_grad():
        ids = torch.tensor([PROMPT + [a] for a in range(V)])
        cache = tgt.new_cache(V, 8)
        logits, _, _ = tgt(ids, torch.arange(4).expand(V, 4), cache)
        p1 = target_probs(logits[0, 2], SP)
        p2 = target_probs(logits[:, 3], SP)  # [V, V]: second token given the first
    return d, tgt, p1[:, None] * p2


def empirical(tgt, d, method, params, draft):
    eng = build_engine(tgt, parse_spec(method, params), draft=str(d / draft) if draft else None)
    outs, stats = eng.generate([PROMPT] * N, SP, seeds=list(range(N)))
    counts = torch.zeros(V, V, dtype=torch.float64)
    for o in outs:
        counts[o.tokens[0], o.tokens[1]] += 1
    return counts / N, stats


CASES = [("eagle2", {"top_k": 3, "depth": 3, "total_tokens": 8}, "head"),
         ("eagle", {"k": 2}, "head"),
         ("draft-model", {"k": 2}, "draft")]


@pytest.mark.parametrize("method,params,draft", CASES, ids=[c[0] for c in CASES])
def test_monte_carlo_matches_target(mc, method, params, draft):
    d, tgt, exact = mc
    emp, stats = empirical(tgt, d, method, params, draft)
    assert stats.rows.accepted > N // 10, "drafts must be accepted often enough for the test to bite"
    assert tv(emp, exact) < 0.03


@pytest.mark.parametrize("method,params,draft", CASES, ids=[c[0] for c in CASES])
def test_monte_carlo_fails_on_broken_verifier(mc, monkeypatch, method, params, draft):
    monkeypatch.setattr(verify, "reject", broken_reject)
    monkeypatch.setattr(verify, "residual", broken_residual)
    d, tgt, exact = mc
    emp, _ = empirical(tgt, d, method, params, draft)
    assert tv(emp, exact) > 0.03


# ------------------------------------------------------------------ vectorised tree rule == sequential rule

def sequential_tree_sampling(tree, probs, seeds, counter):
    """The tree rule as first written: siblings tried one by one, r renormalised after each rejection."""
    from adaspec_worker.decode.sampling import STREAM_ACCEPT, STREAM_BONUS, sample, uniform

    B, N, V = probs.shape
    levels, width = tree.levels, tree.width
    bi = torch.arange(B)
    kids = verify.children_table(tree, width)
    u_acc = uniform(seeds, counter, STREAM_ACCEPT, (levels + 1) * max(width, 1)).view(B, levels + 1, max(width, 1))
    u_bonus = uniform(seeds, counter, STREAM_BONUS, levels + 1)
    cur, live = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool)
    n_acc, bonus, path = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.zeros(B, levels + 1,
                                                                                                      dtype=torch.long)
    for d in range(levels + 1):
        r = probs[bi, cur].double()
        moved = torch.zeros(B, dtype=torch.bool)
        for c in range(width):
            child = kids[bi, cur, c]
            trying = live & ~moved & (child >= 0)
            x = tree.tokens[bi, child.clamp(min=0)]
            accept = trying & (u_acc[:, d, c] < r[bi, x])
            cur = torch.where(accept, child, cur)
            moved |= accept
            r = verify.reject(r, x, trying & ~accept)
        stop = live & ~moved
        bonus = torch.where(stop, sample(r, u_bonus[:, d]), bonus)
        live &= moved
        n_acc += moved.long()
        if d + 1 <= levels:
            path[:, d + 1] = torch.where(moved, cur, path[:, d + 1])
    return n_acc, path, bonus


def test_vectorised_tree_rule_equals_sequential():
    from adaspec_worker.decode.trees import DraftTree

    g = torch.Generator().manual_seed(7)
    B, V = 4000, 5
    parents = torch.tensor([0, 0, 0, 0, 1, 1, 2, 4, 4])  # widths up to 3, depth 3
    depth = torch.tensor([0, 1, 1, 1, 2, 2, 2, 3, 3])
    tokens = torch.randint(0, V, (B, 9), generator=g)  # repeated sibling tokens happen
    valid = torch.rand(B, 9, generator=g) < 0.85
    valid[:, 0] = True
    valid &= valid[:, parents]  # a padding node's children are padding too
    tree = DraftTree(tokens=tokens, parents=parents.expand(B, 9), depth=depth.expand(B, 9), valid=valid,
                     levels=3, width=3)
    logits = torch.randn(B, 9, V, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1) * (torch.rand(B, 9, V, generator=g) > 0.2)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    probs[probs.sum(-1) == 0] = 1.0 / V
    seeds, counter = torch.arange(B), torch.full((B,), 3)
    n_ref, path_ref, bonus_ref = sequential_tree_sampling(tree, probs, seeds, counter)
    got = verify.verify_tree_sampling(tree, probs, seeds, counter)
    assert int(n_ref.sum()) > B // 2  # acceptances happen
    assert torch.equal(got.n_accepted, n_ref) and torch.equal(got.path, path_ref)
    assert (got.bonus == bonus_ref).float().mean() > 0.999  # float rounding at a CDF edge may flip one draw
