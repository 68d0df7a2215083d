"""Sampling is lossless: the verifier's output distribution equals the target's.

1. Exact: for fixed target distributions and draft trees on tiny vocabularies, enumerate every
   branch of the verifier's rules and compare the resulting law with the target's (TV < 1e-9): the
   coupled tree rule run itself on every interval of its two uniforms (joint law of the first two
   tokens, drafts two levels deep), the chain rule through its own `residual` step.
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


def broken_matches_wrong_node(tree, y):  # compares a node's token with the target's sample at the node itself
    correct = (tree.tokens == y) & tree.valid
    correct[:, 0] = True
    return correct


def broken_matches_one_past(tree, y):  # accepts one node past the first mismatch (at the root)
    correct = (tree.tokens == torch.gather(y, 1, tree.parents)) & tree.valid
    correct |= (tree.depth == 1) & tree.valid
    correct[:, 0] = True
    return correct


BROKEN_MATCHES = {"wrong-node": broken_matches_wrong_node, "one-past": broken_matches_one_past}


def broken_residual(p, q):  # samples the bonus from p instead of norm(max(0, p - q))
    return p


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


# ------------------------------------------------------------------ exact enumeration

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


def intervals(p1: torch.Tensor, p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints and lengths of the intervals of (0, 1) on which `sample(p, u)` is constant for p1 and every
    row of p2 (its inverse-CDF breakpoints, computed as `sample` computes them)."""
    cdfs = [p1.cumsum(-1) / p1.sum(), (p2.cumsum(-1) / p2.sum(-1, keepdim=True)).flatten()]
    cuts = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), *cdfs]).clamp(0, 1).unique()
    return (cuts[1:] + cuts[:-1]) / 2, cuts[1:] - cuts[:-1]


def coupled_joint_law(p1: torch.Tensor, p2: torch.Tensor, children: list[int], grand: list[list[int]]) -> torch.Tensor:
    """Exact joint law of the first two emitted tokens under `verify.verify_coupled`, run on every pair of
    intervals of the two uniforms it reads (positions t and t + 1). The tree: the root (target p1) with children
    `children` (target p2[token]), child i with children grand[i]. When no child is accepted, the second token
    is the next round's plain draw, sample(p2[first], u at t + 1)."""
    from adaspec_worker.decode.sampling import sample
    from adaspec_worker.decode.trees import DraftTree

    V = p1.shape[0]
    toks, pars, deps = [0], [0], [0]
    for i, x in enumerate(children):
        toks.append(x), pars.append(0), deps.append(1)
        node = len(toks) - 1
        for z in grand[i]:
            toks.append(z), pars.append(node), deps.append(2)
    n = len(toks)
    mids, lengths = intervals(p1, p2)
    B = mids.shape[0] ** 2
    u0, u1 = mids.repeat_interleave(mids.shape[0]), mids.repeat(mids.shape[0])  # every (u0, u1) pair
    weight = lengths.repeat_interleave(mids.shape[0]) * lengths.repeat(mids.shape[0])
    depth = torch.tensor(deps)
    tree = DraftTree(tokens=torch.tensor(toks).expand(B, n), parents=torch.tensor(pars).expand(B, n),
                     depth=depth.expand(B, n), valid=torch.ones(B, n, dtype=torch.bool), levels=int(depth.max()),
                     width=max([len(children)] + [len(g) for g in grand] + [1]))
    probs = torch.stack([p1 if d == 0 else p2[t] if d == 1 else torch.full_like(p1, 1.0 / V)
                         for t, d in zip(toks, deps)]).expand(B, n, V)
    u = torch.stack([u0, u1, torch.full_like(u0, 0.5)], 1)[:, depth]  # [B, n] each node's uniform by depth
    got = verify.verify_coupled(tree, probs, u)
    path_tok = torch.gather(tree.tokens, 1, got.path)  # [B, P]
    first = torch.where(got.n_accepted >= 1, path_tok[:, min(1, tree.levels)], got.bonus)
    nxt = sample(p2[first], u1)  # the next round's plain draw, when nothing was accepted
    second = torch.where(got.n_accepted >= 2, path_tok[:, min(2, tree.levels)],
                         torch.where(got.n_accepted == 1, got.bonus, nxt))
    law = torch.zeros(V, V, dtype=torch.float64)
    law.index_put_((first, second), weight, accumulate=True)
    return law


def _coupled_cases(n=150, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p1, children, _ in _random_cases(n, V, seed):
        p2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 2, -1)
        p2 = p2 * (torch.rand(V, V, generator=g) > 0.2)
        p2[p2.sum(-1) == 0] = 1.0 / V
        p2 = p2 / p2.sum(-1, keepdim=True)
        if children and float(torch.rand(1, generator=g)) < 0.3:
            children = children + children[:1]  # a repeated sibling token, with its own subtree
        grand = [torch.randperm(V, generator=g)[: int(torch.randint(0, V + 1, (1,), generator=g))].tolist()
                 for _ in children]
        yield p1, p2, children, grand


def test_exact_coupled_rule_equals_p():
    worst = max(tv(coupled_joint_law(p1, p2, ch, gr), p1[:, None] * p2) for p1, p2, ch, gr in _coupled_cases())
    assert worst < 1e-9


def test_exact_chain_rule_equals_p():
    worst = max(tv(chain_output(p, q), p) for p, _, q in _random_cases())
    assert worst < 1e-9


@pytest.mark.parametrize("broken", BROKEN_MATCHES)
def test_exact_tests_fail_on_broken_verifier(monkeypatch, broken):
    monkeypatch.setattr(verify, "matches", BROKEN_MATCHES[broken])
    monkeypatch.setattr(verify, "residual", broken_residual)
    assert max(tv(coupled_joint_law(p1, p2, ch, gr), p1[:, None] * p2) for p1, p2, ch, gr in _coupled_cases()) > 1e-3
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
    tiny.early_exit_head(d / "target", d / "ee", exit_layer=1, seed=6, noise=0.3)
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
         ("draft-model", {"k": 2}, "draft"),
         ("eagle-thompson", {"lengths": [1, 2], "draft_cost": 0.01}, "head"),
         ("eesd", {"lengths": [1, 2], "draft_cost": 0.01}, "ee"),  # sampled chain: the min(1, p/q) rule
         ("rasd", {"top_k": 3, "depth": 3, "total_tokens": 8, "k": 2, "branches": 2, "datastore_tokens": 64}, "head")]
CHAIN_RULE = ("draft-model", "eesd")  # drafts sampled from q, verified by min(1, p/q)


@pytest.mark.parametrize("method,params,draft", CASES, ids=[c[0] for c in CASES])
def test_monte_carlo_matches_target(mc, method, params, draft):
    d, tgt, exact = mc
    emp, stats = empirical(tgt, d, method, params, draft)
    assert stats.rows.accepted > N // 10, "drafts must be accepted often enough for the test to bite"
    assert tv(emp, exact) < 0.03


BROKEN_CASES = [(c, b) for c in CASES for b in (BROKEN_MATCHES if c[0] not in CHAIN_RULE else ["residual"])]


@pytest.mark.parametrize("case,broken", BROKEN_CASES, ids=[f"{c[0]}-{b}" for c, b in BROKEN_CASES])
def test_monte_carlo_fails_on_broken_verifier(mc, monkeypatch, case, broken):
    method, params, draft = case
    if broken in BROKEN_MATCHES:
        monkeypatch.setattr(verify, "matches", BROKEN_MATCHES[broken])
    monkeypatch.setattr(verify, "residual", broken_residual)
    d, tgt, exact = mc
    emp, _ = empirical(tgt, d, method, params, draft)
    assert tv(emp, exact) > 0.03


# ------------------------------------------------------------------ vectorised coupled rule == a walk down the tree

def walk_coupled(tokens, parents, valid, probs, u):
    """One row, one node at a time: at node n the target samples y = sample(p_n, u_n); follow the valid children
    whose token is y, keeping the deepest end (lowest node index among equals). -> (end node, path nodes)."""
    from adaspec_worker.decode.sampling import sample

    def best(n):
        y = int(sample(probs[n][None], u[n][None])[0])
        ends = [best(c) for c in range(1, len(tokens)) if parents[c] == n and valid[c] and tokens[c] == y]
        return [n] + max(ends, key=lambda e: (len(e), -e[-1]), default=[])

    return best(0)


def test_vectorised_coupled_rule_equals_walk():
    from adaspec_worker.decode.sampling import sample
    from adaspec_worker.decode.trees import DraftTree

    g = torch.Generator().manual_seed(7)
    B, V = 3000, 4
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
    u = verify.node_uniforms(tree, seeds, counter)
    got = verify.verify_tree_sampling(tree, probs, seeds, counter)
    deep = 0
    for b in range(B):
        ref = walk_coupled(tokens[b].tolist(), parents.tolist(), valid[b].tolist(), probs[b], u[b])
        n = len(ref) - 1
        deep += n >= 2
        assert int(got.n_accepted[b]) == n and got.path[b, : n + 1].tolist() == ref and not got.path[b, n + 1:].any()
        # every emitted token is the target's sample at its parent on the path: plain sampling's token there
        emitted = tokens[b, ref[1:]].tolist() + [int(got.bonus[b])]
        assert emitted == [int(sample(probs[b, m][None], u[b, m][None])[0]) for m in ref]
    assert deep > B // 10  # deep acceptances happen
