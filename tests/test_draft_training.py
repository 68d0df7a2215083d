"""The EAGLE head's training against its drafting: the unrolled training forward (the training-time test) computes,
at every position, what the head computes when it drafts that chain through its cache, and the validation report
gives every head the same multi-step measures."""
from __future__ import annotations

import pytest
import torch

from adaspec_worker.decode.drafters import EagleHead
from adaspec_worker.decode.kv_cache import causal_tree
from adaspec_worker.decode.model import ModelConfig, load_target, read_json
from adaspec_worker.train.draft_head import EVAL_STEPS, DraftTrainConfig, evaluate, head_loss
from tests.helpers import TINY


def _head_and_target(dtype=torch.float64):
    tgt = load_target(str(TINY), dtype=str(dtype).removeprefix("torch."), device="cpu")
    torch.manual_seed(0)
    head = EagleHead(ModelConfig.from_hf(read_json(str(TINY / "config.json"))), fc_bias=True).to(dtype).attach(tgt)
    return head.eval(), tgt


@pytest.mark.parametrize("root", [0, 5, 11])
def test_an_unrolled_step_is_the_draft_chain_through_the_cache(root):
    head, tgt = _head_and_target()
    B, T, steps = 2, 16, 4
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, tgt.cfg.vocab_size, (B, T), generator=g)  # x[p+1] at position p
    feats = torch.randn(B, T, tgt.cfg.hidden_size, generator=g, dtype=torch.float64)  # f[p]
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        outs = head.train_unrolled(tgt.embed_tokens(toks), feats, pos, steps)
        # drafting: the context (true features up to the root) committed, then one node per level, each reading the
        # previous level's output as its feature and seeing the context and its ancestors
        cache = head.new_cache(B, T + steps)
        n = root + 1
        _, h = head._body(toks[:, :n], feats[:, :n], pos[:, :n], cache.kv, cache.lens, causal_tree(B, n, "cpu"), 0)
        cache.lens += n
        chain = [h[:, -1]]
        for s in range(2, steps + 1):
            p = root + s - 1
            if p >= T:
                break
            mask = torch.ones(B, 1, s - 1, dtype=torch.bool)  # the earlier levels' slots and its own
            _, h = head._body(toks[:, p:p + 1], chain[-1][:, None], pos[:, p:p + 1], cache.kv, cache.lens, mask, s - 2)
            chain.append(h[:, 0])
    for s, h in enumerate(chain, start=1):
        torch.testing.assert_close(outs[s - 1][:, root + s - 1], h, msg=f"step {s} of the chain rooted at {root}")


def test_a_later_step_never_reads_the_true_features_its_chain_replaces():
    head, tgt = _head_and_target()
    B, T = 1, 12
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, tgt.cfg.vocab_size, (B, T), generator=g)
    feats = torch.randn(B, T, tgt.cfg.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    emb = tgt.embed_tokens(toks).detach()
    with torch.no_grad():
        a = head.train_unrolled(emb, feats, pos, 3)
        moved = feats.clone()
        moved[:, 7] += 1.0  # a true feature past the root of step 3's chain at position 8 (root 6)
        b = head.train_unrolled(emb, moved, pos, 3)
    torch.testing.assert_close(a[2][:, 8], b[2][:, 8])
    torch.testing.assert_close(a[1][:, 7], b[1][:, 7])  # step 2 at 7: root 6, f[7] unseen too
    assert not torch.allclose(a[0][:, 7], b[0][:, 7])  # step 1 at position 7 reads it: the perturbation is live
    assert not torch.allclose(a[2][:, 9], b[2][:, 9])  # step 3 at 9 roots at 7


def test_validation_reports_each_step_and_the_chain_for_any_training_unroll():
    head, tgt = _head_and_target(torch.float32)  # as training runs it: float32 head, features made float32
    val = torch.randint(0, tgt.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(3))
    cfg = DraftTrainConfig(batch_size=4, unroll=2)
    rep = evaluate(head, tgt, val, cfg)
    steps = ["top1"] + [f"top1_step{s}" for s in range(2, EVAL_STEPS + 1)]
    assert set(rep) == {"loss", "smooth_l1", "ce", f"chain{EVAL_STEPS}", *steps}
    assert 0.0 <= rep[f"chain{EVAL_STEPS}"] <= min(EVAL_STEPS * rep["top1"] + 1e-9, EVAL_STEPS)
    one = head_loss(head, tgt, val, 0.0, 0.1)
    three = head_loss(head, tgt, val, 0.0, 0.1, steps=3, step_weight=0.5)
    assert len(one.top1) == 1 and len(three.top1) == 3
    torch.testing.assert_close(three.top1[0], one.top1[0])
    assert three.loss > one.loss  # later steps add their weighted terms
