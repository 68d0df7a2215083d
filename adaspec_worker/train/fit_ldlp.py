"""`adarun fit-ldlp`: collect LDLP labels with the real decode loop, fit the predictor, save it.

Loss: asymmetric L1 weighing under-prediction by lambda > 1 (drafting one token too few loses more
than one too many).

Labels (as in AdaEAGLE): for many prefixes, the target's greedy continuation and the head's greedy
draft of k_max tokens; label = their longest common prefix. A greedy EAGLE chain of k_max through
the engine produces exactly that each round (n_accepted), so collection runs the real decode loop,
reading each round through the engine's `on_round` hook.

Width, lambda and k_max are not given by the paper: `fit` tries a grid and keeps the setting with
the best simulated throughput on held-out rounds (tokens per round over the cost 1 + c * k, c the
draft step's cost relative to a verification pass), recording the choice, validation MAE and the
share of rounds where the prediction equals the oracle length in the artifact's metadata.

The runtime module and its file format are `adaspec_worker/decode/ldlp.py`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from jobs.specs import EagleSpec

from ..decode.build import build_engine
from ..decode.ldlp import LDLP, save_ldlp
from ..decode.model import CausalLM, load_target
from ..decode.sampling import SamplingParams
from .corpus import load_tokenizer, read_texts


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


def asymmetric_l1(pred: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    return (lam * (y - pred).clamp(min=0) + (pred - y).clamp(min=0)).mean()


def collect_labels(target: CausalLM, draft, prompts: list[list[int]], new_tokens: int, batch_size: int,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a greedy EAGLE chain of k (draft: a head path or a loaded head) and record (LDLP input, accepted
    length) for every round: x [N, 2H] float, y [N] float."""
    feats, labels = [], []

    def record(ldlp_feat, n_accepted, tree):
        labelled = tree.valid.all(1)  # every row of a chain round is a labelled example
        feats.append(ldlp_feat[labelled].float().cpu())
        labels.append(n_accepted[labelled].cpu())

    engine = build_engine(target, EagleSpec(k=k), draft=draft, on_round=record)
    for i in range(0, len(prompts), batch_size):
        engine.generate(prompts[i: i + batch_size], SamplingParams(max_new_tokens=new_tokens))
    return torch.cat(feats), torch.cat(labels).float()


def simulated_speed(pred_k: torch.Tensor, y: torch.Tensor, c: float) -> float:
    """Tokens per unit cost of a chain that drafts pred_k when y would be accepted."""
    return float((torch.minimum(pred_k, y) + 1).sum() / (1 + c * pred_k).sum())


def _train_one(x, y, cfg: LDLPFitConfig, k_max: int, width: int, lam: float, generator) -> LDLP:
    """One grid point: AdamW on the asymmetric L1 loss over standardised features."""
    torch.manual_seed(cfg.seed)
    model = LDLP(x.shape[1], width, k_max)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(y), (min(512, len(y)),), generator=generator)
        loss = asymmetric_l1(model(x[idx]), y[idx], lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _baselines(y_val: torch.Tensor, k_max: int, cfg: LDLPFitConfig) -> dict:
    """Reference points on the same held-out rounds: a constant predictor, the best fixed k, the oracle."""
    yk = y_val.clamp(max=k_max)
    const = yk.median()
    speed = lambda k: simulated_speed(torch.full_like(yk, k), y_val, cfg.draft_cost)
    best_k = max(range(k_max + 1), key=speed)
    return {"constant_predictor": float(const), "constant_mae": float((yk - const).abs().mean()),
            "best_fixed_k": best_k, "best_fixed_k_speed": speed(best_k),
            "oracle_speed": simulated_speed(yk, y_val, cfg.draft_cost)}


def fit(x: torch.Tensor, y: torch.Tensor, cfg: LDLPFitConfig, log=print) -> tuple[LDLP, dict]:
    """Grid over (k_max, width, lambda); keep the best simulated speed on held-out rounds."""
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
                m = _train_one((x[ti] - mu) / sd, yk[ti], cfg, k_max, width, lam, g)
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
    meta = {"k_max": k_max, "width": width, "lambda": lam, "val_mae": mae, "val_exact_share": exact,
            "val_simulated_speed": score, "train_rounds": len(ti), "val_rounds": len(vi),
            **_baselines(y[vi], k_max, cfg)}
    return m, meta


def _prefixes(tok, texts: list[str], cfg: LDLPFitConfig) -> list[list[int]]:
    """Random prefixes of the corpus files (at most cfg.prompt_tokens each), cfg.prompts of them."""
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
    return prompts


def fit_ldlp(target_dir: str, draft_dir: str, corpus: str, out: str, cfg: LDLPFitConfig, text_column: str = "text",
             log=print) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    target = load_target(target_dir, cfg.dtype, cfg.device)
    tok = load_tokenizer(target_dir)
    texts, info = read_texts(corpus, text_column, max_files=cfg.prompts * 2, seed=cfg.seed)
    prompts = _prefixes(tok, texts, cfg)
    x, y = collect_labels(target, draft_dir, prompts, cfg.new_tokens, cfg.batch_size, cfg.k_max_collect)
    t_collect = time.time() - t0
    log(f"collected {len(y)} rounds from {len(prompts)} prefixes in {t_collect:.0f}s; "
        f"mean accepted {float(y.mean()):.2f}")
    model, meta = fit(x, y, cfg, log)
    meta.update(target=os.path.abspath(target_dir), draft=os.path.abspath(draft_dir), corpus=corpus, corpus_info=info,
                prompts=len(prompts), collect_seconds=round(t_collect, 1),
                fit_seconds=round(time.time() - t0 - t_collect, 1),
                config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                accelerator=torch.cuda.get_device_name() if target.device.type == "cuda" else "cpu",
                label_histogram={int(k): int(v) for k, v in zip(*torch.unique(y, return_counts=True))})
    save_ldlp(model, out, meta)
    return meta
