"""`adarun train-draft`: train an EAGLE-1/2 head for a target, saved in EAGLE's published format.

Recipe (EAGLE, Li et al. 2024): the target's final-norm features f_i are computed over corpus
blocks on the fly; the head reads (embedding of x[i+1], f_i + noise) and regresses f[i+1].
loss = SmoothL1(pred, f[i+1]) + 0.1 * CE(target's next-token distribution, lm_head(pred)),
with uniform noise U(-noise/2, noise/2) on input features. AdamW, linear warm-up, cosine decay,
gradient clipping at 0.5.

With `unroll` > 1 (the training-time test of HASS and EAGLE-3) each position also runs the head on its own
predictions for unroll - 1 more steps, attending as a node that deep in a draft tree does, and the loss adds each
step's (weighted by unroll_weight ** (s - 1)): the head learns to draft from its own features, as it does past the
first level. Validation reports every head's top-1 agreement at 4 unrolled steps and its teacher-forced chain length.

Checkpoints (`OUT/checkpoint/`, safetensors + JSON, never pickle) hold the head, the optimizer
moments and the step, so rerunning the same command resumes. The final head goes to OUT/
(config.json + model.safetensors, loadable by the engine and by EAGLE's code) with
train_report.json beside it.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..decode.drafters import EagleHead, save_eagle_head
from ..decode.model import ModelConfig, load_target, read_json
from .corpus import load_tokenizer, read_texts, split, token_blocks


@dataclass
class DraftTrainConfig:
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    noise: float = 0.2  # width of the uniform noise on input features
    p_weight: float = 0.1  # weight of the token cross-entropy (EAGLE: 0.1)
    grad_clip: float = 0.5
    max_files: int | None = None
    max_tokens: int | None = None
    checkpoint_every: int = 500
    max_seconds: float | None = None  # stop early (and save) once training has run this long
    seed: int = 0
    unroll: int = 1  # drafting steps each training position runs on its own predictions (1: EAGLE's recipe)
    unroll_weight: float = 0.8  # step s of the unroll weighs unroll_weight ** (s - 1)
    exclude_heldout: bool = False  # drop the shared benchmark's held-out files (sha1 rule in corpus.py)
    dtype: str = "auto"
    device: str = "auto"


EVAL_STEPS = 4  # unrolled steps every evaluation reports, whatever the training unroll


def _features(target, ids: torch.Tensor):
    """Target's final-norm features and logits over full blocks: ids [B, T] -> [B, T, H], [B, T, V]."""
    B, T = ids.shape
    cache = target.new_cache(B, T)
    logits, hidden, _ = target(ids, torch.arange(T, device=ids.device).expand(B, T), cache)
    return hidden.float(), logits.float()


@dataclass
class HeadLoss:
    """One batch's loss and what it is made of: the smooth-L1 and cross-entropy parts summed over unrolled steps
    (weighted), each step's top-1 agreement with the target, and `chain`: the mean number of leading steps that all
    agree, from each root position (a teacher-forced stand-in for a greedy chain's accepted length)."""

    loss: torch.Tensor
    smooth_l1: torch.Tensor
    ce: torch.Tensor
    top1: list[torch.Tensor]  # one per step
    chain: torch.Tensor


def head_loss(head: EagleHead, target, ids: torch.Tensor, noise: float, p_weight: float, steps: int = 1,
              step_weight: float = 1.0) -> HeadLoss:
    """The EAGLE loss on one batch of blocks, over `steps` unrolled drafting steps (`EagleHead.train_unrolled`);
    step s weighs step_weight ** (s - 1) and counts only positions with a whole chain (p >= s - 1)."""
    with torch.no_grad():
        f, logits = _features(target, ids)
        emb = target.embed_tokens(ids[:, 1:]).float()
        p = torch.softmax(logits[:, 1:], -1)  # target's next-token distribution after x[i+1]
        best = p.argmax(-1)  # [B, T]
    x = f[:, :-1]
    if noise:
        x = x + (torch.rand_like(x) - 0.5) * noise
    B, T = ids.shape[0], ids.shape[1] - 1
    preds = head.train_unrolled(emb, x, torch.arange(T, device=ids.device).expand(B, T), steps)
    loss = v_sum = ce_sum = torch.zeros((), device=ids.device)
    top1, hits = [], []
    for s, pred in enumerate(preds, start=1):
        valid = slice(s - 1, T)  # positions whose chain root p - s + 1 exists
        v = F.smooth_l1_loss(pred[:, valid], f[:, 1:][:, valid])
        logq = torch.log_softmax(target.lm_head(pred[:, valid].to(target.dtype)).float(), -1)
        ce = -(p[:, valid] * logq).sum(-1).mean()
        w = step_weight ** (s - 1)
        loss = loss + w * (v + p_weight * ce)
        v_sum, ce_sum = v_sum + w * v.detach(), ce_sum + w * ce.detach()
        hit = logq.argmax(-1) == best[:, valid]  # [B, T - s + 1]
        top1.append(hit.float().mean().detach())
        hits.append(hit[:, : T - steps + 1])  # aligned on the root: step s's column r is the chain rooted at r
    run = torch.ones_like(hits[0])
    chain = torch.zeros(hits[0].shape, device=ids.device)
    for hit in hits:
        run = run & hit
        chain = chain + run
    return HeadLoss(loss, v_sum, ce_sum, top1, chain.mean().detach())


def _save_checkpoint(path: str, head, opt, step: int, cfg: DraftTrainConfig) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    names = dict(head.named_parameters())
    for name, prm in names.items():
        st = opt.state.get(prm, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{name}.{k}"] = st[k].contiguous().cpu()
    tmp = os.path.join(path, "state.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(path, "state.safetensors"))
    with open(os.path.join(path, "progress.json"), "w") as f:
        json.dump({"step": step, "config": asdict(cfg)}, f)


def _load_checkpoint(path: str, head, opt) -> int:
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "state.safetensors"))
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    step = json.load(open(os.path.join(path, "progress.json")))["step"]
    for name, prm in head.named_parameters():
        if f"opt.{name}.exp_avg" in sd:
            opt.state[prm] = {"step": torch.tensor(float(step)), "exp_avg": sd[f"opt.{name}.exp_avg"].to(prm.device),
                              "exp_avg_sq": sd[f"opt.{name}.exp_avg_sq"].to(prm.device)}
    return step


def train_draft(target_dir: str, corpus: str, out: str, cfg: DraftTrainConfig, text_column: str = "text",
                progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    target = load_target(target_dir, cfg.dtype, cfg.device)
    dev = target.device
    raw = read_json(os.path.join(target_dir, "config.json"))
    head = EagleHead(ModelConfig.from_hf(raw), fc_bias=True).to(dev).float().attach(target)
    head.train()
    tok = load_tokenizer(target_dir)
    t0 = time.time()
    texts, corpus_info = read_texts(corpus, text_column, cfg.max_files, cfg.seed,
                                     drop_held_out=cfg.exclude_heldout)
    eos = (target.cfg.eos_token_ids or (0,))[0]
    blocks = token_blocks(texts, tok, cfg.seq_len + 1, eos, cfg.max_tokens)
    train, val = split(blocks, seed=cfg.seed)
    corpus_info.update(tokens=int(blocks.numel()), train_blocks=int(train.shape[0]), val_blocks=int(val.shape[0]),
                       prepare_seconds=round(time.time() - t0, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    def sched(s: int) -> float:  # linear warm-up, then cosine decay to 0
        return min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / max(cfg.steps, 1), 1.0)))
    ckpt = os.path.join(out, "checkpoint")
    step = _load_checkpoint(ckpt, head, opt) if os.path.exists(os.path.join(ckpt, "state.safetensors")) else 0
    start_step = step
    g = torch.Generator().manual_seed(cfg.seed + step)
    val_before = evaluate(head, target, val, cfg)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train-draft", dynamic_ncols=True)
    losses = []
    t_train = time.time()
    while step < cfg.steps:
        ts = time.time()
        if cfg.max_seconds and ts - t_train > cfg.max_seconds:
            _save_checkpoint(ckpt, head, opt, step, cfg)
            break
        idx = torch.randint(0, train.shape[0], (cfg.batch_size,), generator=g)
        ids = train[idx].to(dev)
        for grp in opt.param_groups:  # progress by steps or by the time budget, whichever is further
            frac = max(step / cfg.steps, (ts - t_train) / cfg.max_seconds if cfg.max_seconds else 0.0)
            grp["lr"] = cfg.lr * sched(frac * cfg.steps)
        res = head_loss(head, target, ids, cfg.noise, cfg.p_weight, cfg.unroll, cfg.unroll_weight)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(res.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{res.top1[0].item():.2f}",
                        step_ms=f"{(time.time() - ts) * 1e3:.0f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, head, opt, step, cfg)
    bar.close()
    val_after = evaluate(head, target, val, cfg)
    head.eval()
    save_eagle_head(head.to(target.dtype), raw, out)
    report = {"target": os.path.abspath(target_dir), "corpus": corpus, "corpus_info": corpus_info,
              "config": asdict(cfg), "steps_run": step - start_step, "resumed_from_step": start_step,
              "train_seconds": round(time.time() - t_train, 1), "first_losses": losses[:5], "last_losses": losses[-5:],
              "val_before": val_before, "val_after": val_after, "device": str(dev),
              "accelerator": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    with open(os.path.join(out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


@torch.no_grad()
def evaluate(head, target, val: torch.Tensor, cfg: DraftTrainConfig, max_blocks: int = 64) -> dict:
    """Validation over the first `max_blocks` blocks: the step-1 loss and its parts, each of `EVAL_STEPS` unrolled
    steps' top-1 agreement, and the teacher-forced chain length over those steps (the same for every `unroll`, so
    heads trained either way compare)."""
    was = head.training
    head.eval()
    tot: dict[str, float] = {}
    n = 0
    for i in range(0, min(val.shape[0], max_blocks), cfg.batch_size):
        ids = val[i: i + cfg.batch_size].to(target.device)
        # weight 0 past step 1 (0.0 ** 0 == 1): the loss and its parts are step 1's, the top-1s and chain every step's
        out = head_loss(head, target, ids, 0.0, cfg.p_weight, EVAL_STEPS, step_weight=0.0)
        vals = {"loss": out.loss, "smooth_l1": out.smooth_l1, "ce": out.ce,
                **{("top1" if s == 0 else f"top1_step{s + 1}"): a for s, a in enumerate(out.top1)},
                f"chain{EVAL_STEPS}": out.chain}
        for k, x in vals.items():
            tot[k] = tot.get(k, 0.0) + float(x) * ids.shape[0]
        n += ids.shape[0]
    head.train(was)
    return {k: round(x / max(n, 1), 4) for k, x in tot.items()}
