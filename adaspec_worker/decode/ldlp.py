"""LDLP: AdaEAGLE's Lightweight Draft Length Predictor (Zhang et al., 2024), and `adarun fit-ldlp`.

Input: [embedding of the last accepted token; target final-norm hidden state of it]. The last token a
round emits is the bonus token, whose own hidden state is not computed yet; like EAGLE's head we pair
its embedding with the hidden state that produced it. Output: the number of draft tokens the target
will accept next round (regression). Model: a 3-layer residual MLP. Loss: asymmetric L1 weighing
under-prediction by lambda > 1 (drafting one token too few loses more than one too many).

Labels (as in AdaEAGLE): for many prefixes, the target's greedy continuation and the head's greedy
draft of k_max tokens; label = their longest common prefix. A greedy EAGLE chain of k_max through
the engine produces exactly that each round (n_accepted), so collection runs the real decode loop.

Width, lambda and k_max are not given by the paper: `fit` tries a grid and keeps the setting with
the best simulated throughput on held-out rounds (tokens per round over the cost 1 + c * k, c the
draft step's cost relative to a verification pass), recording the choice, validation MAE and the
share of rounds where the prediction equals the oracle length in the artifact's metadata.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


class LDLP(nn.Module):
    def __init__(self, in_dim: int, width: int, k_max: int):
        super().__init__()
        self.k_max = k_max
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)) for _ in range(3))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 2H] -> predicted accepted length [B] (float)."""
        h = self.inp(x.float())
        for b in self.blocks:
            h = h + b(h)
        return self.out(h).squeeze(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Integer draft length in [0, k_max]: [B]."""
        return self(x).round().clamp(0, self.k_max).long()


def asymmetric_l1(pred: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    return (lam * (y - pred).clamp(min=0) + (pred - y).clamp(min=0)).mean()


def save_ldlp(model: LDLP, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {"in_dim": model.inp.in_features, "width": model.inp.out_features, "k_max": model.k_max, **meta}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))


def load_ldlp(path: str, target) -> LDLP:
    from safetensors.torch import load_file

    from .model import ModelLoadError, load_strict

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: no config.json (expected an LDLP saved by `adarun fit-ldlp`)")
    cfg = json.load(open(cfg_path))
    if cfg["in_dim"] != 2 * target.cfg.hidden_size:
        raise ModelLoadError(f"{cfg_path}: in_dim {cfg['in_dim']} does not match 2 x the target's hidden size {target.cfg.hidden_size}")
    m = LDLP(cfg["in_dim"], cfg["width"], cfg["k_max"])
    load_strict(m, load_file(os.path.join(path, "model.safetensors")), path)
    m.meta = cfg
    return m.to(target.device).eval().requires_grad_(False)


# ------------------------------------------------------------------ label collection and fitting

@dataclass
class LDLPFitConfig:
    k_max_collect: int = 10  # labels are collected with this chain length and clipped for smaller k_max
    prompts: int = 400  # corpus prefixes to decode
    new_tokens: int = 96
    prompt_tokens: int = 256
    batch_size: int = 16
    widths: tuple = (64, 128, 256)
    lambdas: tuple = (1.5, 2.0, 3.0)
    k_maxes: tuple = (4, 6, 8, 10)
    draft_cost: float = 0.15  # a draft step's cost relative to one verification pass (for the selection)
    steps: int = 400
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def collect_labels(engine, prompts: list[list[int]], new_tokens: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a greedy EAGLE chain and record (LDLP input, accepted length) for every round."""
    from .sampling import SamplingParams

    feats, labels = [], []

    def hook(feat, n, tree):
        valid = tree.valid.all(1)  # every row of a chain round is a labelled example
        feats.append(feat[valid].float().cpu())
        labels.append(n[valid].cpu())

    engine.round_hook = hook
    try:
        for i in range(0, len(prompts), batch_size):
            engine.generate(prompts[i: i + batch_size], SamplingParams(max_new_tokens=new_tokens))
    finally:
        engine.round_hook = None
    return torch.cat(feats), torch.cat(labels).float()


def simulated_speed(pred_k: torch.Tensor, y: torch.Tensor, c: float) -> float:
    """Tokens per unit cost of a chain that drafts pred_k when y would be accepted."""
    return float((torch.minimum(pred_k, y) + 1).sum() / (1 + c * pred_k).sum())


def fit(x: torch.Tensor, y: torch.Tensor, cfg: LDLPFitConfig, log=print) -> tuple[LDLP, dict]:
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = max(1, len(y) // 5)
    vi, ti = perm[:n_val], perm[n_val:]
    mu, sd = x[ti].mean(0), x[ti].std(0).clamp_min(1e-4)
    best = None
    for k_max in cfg.k_maxes:
        yk = y.clamp(max=k_max)
        for width in cfg.widths:
            for lam in cfg.lambdas:
                torch.manual_seed(cfg.seed)
                m = LDLP(x.shape[1], width, k_max)
                opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=1e-4)
                xt, yt = (x[ti] - mu) / sd, yk[ti]
                for step in range(cfg.steps):
                    idx = torch.randint(0, len(ti), (min(512, len(ti)),), generator=g)
                    loss = asymmetric_l1(m(xt[idx]), yt[idx], lam)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    pk = m((x[vi] - mu) / sd).round().clamp(0, k_max)
                score = simulated_speed(pk, y[vi].clamp(max=cfg.k_max_collect), cfg.draft_cost)
                mae = float((pk - yk[vi]).abs().mean())
                log(f"k_max={k_max} width={width} lambda={lam}: val MAE {mae:.3f}, simulated speed {score:.3f}")
                if best is None or score > best[0]:
                    best = (score, k_max, width, lam, m, mae, float((pk == yk[vi]).float().mean()))
    score, k_max, width, lam, m, mae, exact = best
    with torch.no_grad():  # fold the standardisation into the input layer so the artifact takes raw features
        m.inp.bias -= (m.inp.weight * (mu / sd)).sum(1)
        m.inp.weight /= sd
    yk = y[vi].clamp(max=k_max)
    const = yk.median()
    base = {  # reference points on the same held-out rounds
        "constant_predictor": float(const), "constant_mae": float((yk - const).abs().mean()),
        "best_fixed_k": max(range(k_max + 1), key=lambda k: simulated_speed(torch.full_like(yk, k), y[vi], cfg.draft_cost)),
    }
    base["best_fixed_k_speed"] = simulated_speed(torch.full_like(yk, base["best_fixed_k"]), y[vi], cfg.draft_cost)
    base["oracle_speed"] = simulated_speed(yk, y[vi], cfg.draft_cost)
    meta = {"k_max": k_max, "width": width, "lambda": lam, "val_mae": mae, "val_exact_share": exact,
            "val_simulated_speed": score, "train_rounds": len(ti), "val_rounds": len(vi), **base}
    return m, meta


def fit_ldlp(target_dir: str, draft_dir: str, corpus: str, out: str, cfg: LDLPFitConfig, text_column: str = "text", log=print) -> dict:
    from ..train.corpus import load_tokenizer, read_texts
    from .engine import Engine
    from .model import load_target

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    target = load_target(target_dir, cfg.dtype, cfg.device)
    tok = load_tokenizer(target_dir)
    texts, info = read_texts(corpus, text_column, max_files=cfg.prompts * 2, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 32:
            continue
        cut = int(torch.randint(16, max(17, len(ids) - 8), (1,), generator=g))  # a random prefix of the file
        prompts.append(ids[max(0, cut - cfg.prompt_tokens): cut])
        if len(prompts) == cfg.prompts:
            break
    engine = Engine.load(target, "eagle", {"k": cfg.k_max_collect}, draft_dir)
    x, y = collect_labels(engine, prompts, cfg.new_tokens, cfg.batch_size)
    t_collect = time.time() - t0
    log(f"collected {len(y)} rounds from {len(prompts)} prefixes in {t_collect:.0f}s; mean accepted {float(y.mean()):.2f}")
    model, meta = fit(x, y, cfg, log)
    meta.update(target=os.path.abspath(target_dir), draft=os.path.abspath(draft_dir), corpus=corpus, corpus_info=info,
                prompts=len(prompts), collect_seconds=round(t_collect, 1), fit_seconds=round(time.time() - t0 - t_collect, 1),
                config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                accelerator=torch.cuda.get_device_name() if target.device.type == "cuda" else "cpu",
                label_histogram={int(k): int(v) for k, v in zip(*torch.unique(y, return_counts=True))})
    save_ldlp(model, out, meta)
    return meta
