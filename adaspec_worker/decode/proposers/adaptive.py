"""Adaptive proposers: how far (and how wide) to draft, decided per round and per row.

Registered beside the fixed methods in `methods.PROPOSERS`; parameters and sources are documented
on their specs in `specs.py`. Chains are drafted to a bound on the device and cut by a per-row
`valid` mask, so a stopping rule costs no host sync; LDLP's next-round length is computed right
after verification and rides on that round's one sync (`Proposer.plan`). Exceptions, by design of
the published algorithms: DDD syncs at its few check depths, OPT-Tree once per level, and the
benchmark-only oracle once per round before verification. All are lossless: they only change what
is proposed, never how it is verified.
"""
from __future__ import annotations

import torch

from .fixed import Proposer, RoundInput, draft_chain, proposer
from ..trees import chain_tree, grow_dynamic


class _LDLPChain(Proposer):
    needs_ldlp = True
    wants_features = True
    wants_plan = True

    def __init__(self, spec, ldlp):
        super().__init__(spec)
        assert ldlp is not None, f"{spec.method_name} needs an LDLP (model.ldlp)"
        self.ldlp = ldlp
        self.k_max = getattr(spec, "k_max", 0) or ldlp.k_max
        self.scratch, self.max_nodes = self.k_max, self.k_max + 1

    def start(self, B, device, sp, prompts, engine):
        self.row_state("k", B, 0, torch.long, device)  # the plan on the device, for graph replays

    def prime(self, r: RoundInput) -> None:
        """First round of a generate(): no verification sync to ride on yet, so one of its own."""
        self.k.copy_(self.ldlp.predict(r.ldlp_feat).clamp(max=self.k_max))
        self.plan = self.k.tolist()

    def lengths(self, r: RoundInput) -> torch.Tensor:
        return self.k

    def plan_key(self):
        return (max(self.plan),)

    def observe(self, verdict, tree, r):
        self.k.copy_(self.ldlp.predict(r.ldlp_feat).clamp(max=self.k_max))
        return self.k


@proposer("adaeagle")
class AdaEagle(_LDLPChain):
    def plan_key(self):
        return (self.chain_len(),)

    def chain_len(self) -> int:
        """Chain drafted this round: the longest row's LDLP length, rounded up to a few sizes so the
        graphs captured per size stay few (rows with shorter predictions mask their extra nodes)."""
        K = int(max(self.plan))
        return 0 if K == 0 else min(next(b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 10**9) if b >= K), self.k_max)

    def propose(self, r):
        k = self.lengths(r)
        K = self.chain_len()
        if K == 0:
            return chain_tree(r.root, r.root.new_zeros(r.root.shape[0], 0))
        toks, _, _ = draft_chain(r, K)
        return chain_tree(r.root, toks, valid=torch.arange(K, device=k.device)[None, :] < k[:, None])


@proposer("adaeagle-ddd")
class AdaEagleDDD(_LDLPChain):
    def plan_key(self):
        return ()

    def propose(self, r):
        k = self.lengths(r)
        toks, logp, _ = draft_chain(r, self.k_max)
        j = torch.arange(self.k_max, device=k.device)[None, :]
        go = (j < k[:, None]) | (logp.cumsum(-1) > self.spec.threshold)  # stop only when both say stop
        return chain_tree(r.root, toks, valid=go.long().cumprod(-1).bool())


def adaedl_update(lam: torch.Tensor, ema: torch.Tensor, acc_rate: torch.Tensor, beta1: float, alpha: float, eps: float):
    """One round of AdaEDL's lambda adaptation: returns (lambda, ema)."""
    ema = beta1 * ema + (1 - beta1) * acc_rate
    lam_new = torch.where(ema < alpha, lam + eps, lam - eps)  # accepting too little: stop earlier
    return 0.9 * lam + 0.1 * lam_new, ema


@proposer("adaedl")
class AdaEDL(Proposer):
    def __init__(self, spec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k_max, spec.k_max + 1

    def start(self, B, device, sp, prompts, engine):
        self.row_state("lam", B, self.spec.lam0, torch.float64, device)
        self.row_state("ema", B, self.spec.alpha, torch.float64, device)

    def propose(self, r):
        toks, _, ent = draft_chain(r, self.spec.k_max)
        go = (1 - (self.spec.gamma * ent).clamp(min=0).sqrt()) >= self.lam[:, None]
        return chain_tree(r.root, toks, valid=go.long().cumprod(-1).bool())

    def observe(self, verdict, tree, r):
        drafted = tree.valid[:, 1:].sum(1)
        rate = verdict.n_accepted.double() / drafted.clamp(min=1)
        lam, ema = adaedl_update(self.lam, self.ema, rate, self.spec.beta1, self.spec.alpha, self.spec.eps)
        had = drafted > 0  # a round without drafts says nothing about acceptance
        self.lam.copy_(torch.where(had, lam, self.lam))
        self.ema.copy_(torch.where(had, ema, self.ema))
        return None


@proposer("ddd")
class DDD(Proposer):
    graphable = False  # syncs at its check depths

    def __init__(self, spec):
        super().__init__(spec)
        s = spec
        self.max_nodes = 1 + min(s.total_tokens, s.top_k + (s.max_depth - 1) * s.top_k ** 2)
        self.scratch = s.top_k * s.max_depth
        checks = set(s.check_depths)
        self.stop = lambda level, fs: level in checks and bool((torch.logsumexp(fs, -1) < s.threshold).all())

    def propose(self, r):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, s.max_depth, s.total_tokens, stop=self.stop)


@proposer("opt-tree")
class OptTree(Proposer):
    graphable = False  # syncs once per level

    def __init__(self, spec):
        super().__init__(spec)
        self.max_nodes = 1 + spec.n * spec.max_depth
        self.scratch = spec.n * spec.max_depth
        # the nodes a level adds raise E by the sum of their path probabilities
        self.stop = lambda level, fs: bool((fs.exp().sum(-1) < spec.delta).all())

    def propose(self, r):
        s = self.spec
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.n, s.max_depth, 0, keep="frontier", stop=self.stop)


@proposer("ldlp-tree")
class LDLPTree(_LDLPChain):
    def __init__(self, spec, ldlp):
        super().__init__(spec, ldlp)
        self.max_nodes = 1 + spec.nodes_per_level * spec.max_depth
        self.scratch = spec.top_k * spec.max_depth

    def plan_key(self):
        return (self.depth(),)

    def depth(self) -> int:
        s = self.spec
        return min(max(int(max(self.plan)) + 1, s.min_depth), s.max_depth)

    def propose(self, r):
        s = self.spec
        self.lengths(r)
        depth = self.depth()
        return grow_dynamic(r.root, r.root_logits, r.root_hidden, r.drafter.step, s.top_k, depth, s.nodes_per_level * depth)


@proposer("oracle")
class Oracle(Proposer):
    graphable = False  # one extra sync per round sizes the verification exactly

    def __init__(self, spec):
        super().__init__(spec)
        self.scratch, self.max_nodes = spec.k_max, spec.k_max + 1

    def start(self, B, device, sp, prompts, engine):
        from ..engine import Engine

        assert sp.greedy, "the oracle is defined for greedy decoding only"
        ref, _ = Engine(engine.target, "none").generate(prompts, sp)
        width = sp.max_new_tokens + self.spec.k_max + 1
        self.ref = torch.full((B, width), -1, dtype=torch.long, device=device)
        for i, c in enumerate(ref):
            self.ref[i, : len(c.tokens)] = torch.tensor(c.tokens, device=device)
        self._full = {"ref": self.ref}

    def propose(self, r):
        k = self.spec.k_max
        toks, _, _ = draft_chain(r, k)
        pos = (r.counter[:, None] + torch.arange(k, device=toks.device)[None, :]).clamp(max=self.ref.shape[1] - 1)
        good = (toks == torch.gather(self.ref, 1, pos)).long().cumprod(-1)
        K = int(good.sum(1).max())  # benchmark-only: one extra sync to size the verification exactly
        return chain_tree(r.root, toks[:, :K], valid=good[:, :K].bool())

