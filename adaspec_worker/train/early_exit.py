"""`adarun train-draft --early-exit N`: train an early-exit head (EESD, Liu et al., 2024) by self-distillation.

The head (`decode.early_exit.EarlyExitHead`: an adapter decoder layer, an RMSNorm, the target's lm_head) reads
layer N's hidden state and learns the target's own next-token distribution over corpus blocks: loss =
KL(p_target || q_head), the teacher computed on the fly by the same target pass that yields layer N's states
(self-distillation: no labels, no other model). The target's layers and lm_head stay frozen; the adapter
starts as the target's layer N and the norm as its final norm (`early_exit.new_head`). AdamW, linear
warm-up, cosine decay, gradient clipping, the corpus and the held-out rule as `draft_head.py` (whose
`DraftTrainConfig` and safetensors checkpoints this reuses: rerunning the same command resumes).

Writes OUT/config.json + model.safetensors (loadable as `model.draft` for method `eesd`) and
OUT/train_report.json. Knows nothing of decoding methods or draft lengths.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict

import torch

from ..decode.early_exit import EarlyExitHead, exit_hidden, new_head, save_early_exit_head
from ..decode.model import load_target, read_json
from .corpus import load_tokenizer, read_texts, split, token_blocks
from .draft_head import DraftTrainConfig, _load_checkpoint, _save_checkpoint


def distill_loss(head: EarlyExitHead, target, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (KL(p_target || q_head) per position, mean; top-1 agreement)."""
    B, T = ids.shape
    with torch.no_grad():
        h, logits = exit_hidden(target, ids, head.exit_layer)  # [B, T, H], [B, T, V]
        logp = torch.log_softmax(logits.float(), -1)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    logq = torch.log_softmax(head.head_forward(h.float(), pos).float(), -1)  # [B, T, V]
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return kl, (logq.argmax(-1) == logp.argmax(-1)).float().mean().detach()


@torch.no_grad()
def evaluate(head: EarlyExitHead, target, val: torch.Tensor, cfg: DraftTrainConfig, max_blocks: int = 64) -> dict:
    was = head.training
    head.eval()
    kl = top1 = 0.0
    n = 0
    for i in range(0, min(val.shape[0], max_blocks), cfg.batch_size):
        ids = val[i : i + cfg.batch_size].to(target.device)
        loss, acc = distill_loss(head, target, ids)
        kl, top1, n = kl + float(loss) * ids.shape[0], top1 + float(acc) * ids.shape[0], n + ids.shape[0]
    head.train(was)
    return {"kl": round(kl / max(n, 1), 4), "top1": round(top1 / max(n, 1), 4)}


def train_early_exit(
    target_dir: str,
    corpus: str,
    out: str,
    cfg: DraftTrainConfig,
    exit_layer: int,
    adapter: bool = True,
    text_column: str = "text",
    progress: bool = True,
) -> dict:
    torch.manual_seed(cfg.seed)
    target = load_target(target_dir, cfg.dtype, cfg.device)
    if not 1 <= exit_layer <= target.cfg.num_layers:
        raise ValueError(f"--early-exit must be in [1, {target.cfg.num_layers}] for this target, got {exit_layer}")
    raw = read_json(os.path.join(target_dir, "config.json"))
    head = new_head(target, raw, exit_layer, adapter)
    head.train()
    t0 = time.time()
    texts, corpus_info = read_texts(corpus, text_column, cfg.max_files, cfg.seed, drop_held_out=cfg.exclude_heldout)
    eos = (target.cfg.eos_token_ids or (0,))[0]
    blocks = token_blocks(texts, load_tokenizer(target_dir), cfg.seq_len, eos, cfg.max_tokens)
    train, val = split(blocks, seed=cfg.seed)
    corpus_info.update(
        tokens=int(blocks.numel()),
        train_blocks=int(train.shape[0]),
        val_blocks=int(val.shape[0]),
        prepare_seconds=round(time.time() - t0, 1),
    )
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = os.path.join(out, "checkpoint")
    step = _load_checkpoint(ckpt, head, opt) if os.path.exists(os.path.join(ckpt, "state.safetensors")) else 0
    start_step = step
    g = torch.Generator().manual_seed(cfg.seed + step)
    val_before = evaluate(head, target, val, cfg)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train-draft --early-exit")
    losses: list[float] = []
    t_train = time.time()
    while step < cfg.steps:
        spent = time.time() - t_train
        if cfg.max_seconds and spent > cfg.max_seconds:
            break
        # linear warm-up, then cosine decay to 0, by steps or by the time budget, whichever is further
        frac = max(step / max(cfg.steps, 1), spent / cfg.max_seconds if cfg.max_seconds else 0.0)
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * frac))
        for grp in opt.param_groups:
            grp["lr"] = lr
        ids = train[torch.randint(0, train.shape[0], (cfg.batch_size,), generator=g)].to(target.device)
        loss, acc = distill_loss(head, target, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}", top1=f"{acc.item():.2f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, head, opt, step, cfg)
    _save_checkpoint(ckpt, head, opt, step, cfg)
    bar.close()
    val_after = evaluate(head, target, val, cfg)
    head.eval()
    save_early_exit_head(head.to(target.dtype), raw, out)
    report = {
        "target": os.path.abspath(target_dir),
        "early_exit_layer": exit_layer,
        "adapter": adapter,
        "corpus": corpus,
        "corpus_info": corpus_info,
        "config": asdict(cfg),
        "steps_run": step - start_step,
        "resumed_from_step": start_step,
        "train_seconds": round(time.time() - t_train, 1),
        "first_losses": losses[:5],
        "last_losses": losses[-5:],
        "val_before": val_before,
        "val_after": val_after,
        "device": str(target.device),
    }
    with open(os.path.join(out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
