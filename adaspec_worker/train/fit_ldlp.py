"""`adarun fit-ldlp`: collect LDLP labels with the real decode loop, fit the predictor, save it.

Loss: asymmetric L1 weighing under-prediction by lambda > 1 (drafting one token too few loses more
than one too many).

Labels (as in AdaEAGLE): for many prefixes, the target's greedy continuation and the head's greedy
draft of k_max tokens; label = their longest common prefix. A greedy EAGLE chain of k_max through
the engine produces exactly that each round (n_accepted), so collection runs the real decode loop,
reading each round through the engine's `on_round` hook.

Width, lambda (the loss asymmetry), k_max and the rounding offset (the threshold: predicted length =
floor(regression + offset)) are not given by the paper: `fit` tries a grid (every axis an option) and
keeps the setting with the most simulated tokens per second on held-out rounds under the cost model
measured on the fitting device (`decode/cost.py`; or one loaded from `cost_model`, e.g. an actor's):
a row drafting k tokens when y would be accepted emits min(k, y) + 1 tokens for one target pass over
1 + k tokens, k - 1 draft levels and the drafter's catch-up, at batch `batch`. The choice, validation
MAE and the share of rounds where the prediction equals the oracle length go in the artifact's metadata.

The runtime module and its file format are `adaspec_worker/decode/ldlp.py`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from jobs.specs import EagleSpec

from ..decode.build import build_engine
from ..decode.cost import CostModel, measure_cost
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
    offsets: tuple = (0.5, 1.0)  # predicted length = floor(regression + offset)
    batch: int = 1  # batch size the simulated tokens/s is for
    cost_model: str = ""  # a CostModel JSON file; empty: measured on the fitting device
    steps: int = 400
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def asymmetric_l1(pred: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    return (lam * (y - pred).clamp(min=0) + (pred - y).clamp(min=0)).mean()


def collect_labels(target: CausalLM, draft, prompts: list[list[int]], new_tokens: int, batch_size: int,
                   k: int, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a greedy EAGLE chain of k (draft: a head path or a loaded head) and record (LDLP input, accepted
    length) for every round: x [N, 2H] float, y [N] float."""
    feats, labels = [], []

    def record(ldlp_feat, n_accepted, tree):
        labelled = tree.valid.all(1)  # every row of a chain round is a labelled example
        feats.append(ldlp_feat[labelled].float().cpu())
        labels.append(n_accepted[labelled].cpu())

    engine = build_engine(target, EagleSpec(k=k), draft=draft, on_round=record)
    t0 = time.time()
    for i in range(0, len(prompts), batch_size):
        engine.generate(prompts[i: i + batch_size], SamplingParams(max_new_tokens=new_tokens))
        if log is not None:
            done = min(i + batch_size, len(prompts))
            rounds = sum(len(y) for y in labels)
            log(f"collect: {done}/{len(prompts)} prefixes, {rounds} rounds, {time.time() - t0:.0f}s")
    return torch.cat(feats), torch.cat(labels).float()


def simulated_speed(pred_k: torch.Tensor, y: torch.Tensor, cost: CostModel, batch: int = 1) -> float:
    """Tokens per second of rows that draft pred_k when y would be accepted, at batch `batch` (each row charged
    its share of a round of its own length)."""
    seconds = {k: (cost.target(batch, 1 + k) + max(k - 1, 0) * cost.draft(batch, 1)
                   + (cost.draft(batch, k + 1) if k else 0.0)) / batch for k in pred_k.long().unique().tolist()}
    spent = sum(seconds[int(k)] * int(n) for k, n in zip(*pred_k.long().unique(return_counts=True)))
    return float((torch.minimum(pred_k, y) + 1).sum()) / spent


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


def _baselines(y_val: torch.Tensor, k_max: int, cost: CostModel, cfg: LDLPFitConfig) -> dict:
    """Reference points on the same held-out rounds: a constant predictor, the best fixed k, the oracle."""
    yk = y_val.clamp(max=k_max)
    const = yk.median()
    speed = lambda k: simulated_speed(torch.full_like(yk, k), y_val, cost, cfg.batch)
    best_k = max(range(k_max + 1), key=speed)
    return {"constant_predictor": float(const), "constant_mae": float((yk - const).abs().mean()),
            "best_fixed_k": best_k, "best_fixed_k_speed": speed(best_k),
            "oracle_speed": simulated_speed(yk, y_val, cost, cfg.batch)}


def fit(x: torch.Tensor, y: torch.Tensor, cfg: LDLPFitConfig, log=print, cost: CostModel | None = None
        ) -> tuple[LDLP, dict]:
    """Grid over (k_max, width, lambda, offset); keep the most simulated tokens/s on held-out rounds."""
    cost = cost or CostModel.nominal()
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = max(1, len(y) // 5)
    vi, ti = perm[:n_val], perm[n_val:]
    mu, sd = x[ti].mean(0), x[ti].std(0).clamp_min(1e-4)
    best, grid, t0 = None, [], time.time()
    n_grid = len(cfg.k_maxes) * len(cfg.widths) * len(cfg.lambdas)
    for k_max in cfg.k_maxes:
        yk = y.clamp(max=k_max)
        for width in cfg.widths:
            for lam in cfg.lambdas:
                m = _train_one((x[ti] - mu) / sd, yk[ti], cfg, k_max, width, lam, g)
                with torch.no_grad():
                    raw = m((x[vi] - mu) / sd)
                for offset in cfg.offsets:
                    pk = (raw + offset).floor().clamp(0, k_max)
                    score = simulated_speed(pk, y[vi].clamp(max=cfg.k_max_collect), cost, cfg.batch)
                    mae = float((pk - yk[vi]).abs().mean())
                    grid.append({"k_max": k_max, "width": width, "lambda": lam, "offset": offset, "val_mae": mae,
                                 "simulated_tokens_per_s": score})
                    if best is None or score > best[0]:
                        best = (score, k_max, width, lam, offset, m, mae, float((pk == yk[vi]).float().mean()))
                log(f"[{len(grid) // len(cfg.offsets)}/{n_grid}] k_max={k_max} width={width} lambda={lam}: "
                    f"best offset {max(grid[-len(cfg.offsets):], key=lambda r: r['simulated_tokens_per_s'])['offset']}"
                    f", simulated {grid[-1]['simulated_tokens_per_s']:.1f} tok/s, {time.time() - t0:.0f}s")
    score, k_max, width, lam, offset, m, mae, exact = best
    m.offset = offset
    with torch.no_grad():  # fold the standardisation into the input layer so the artifact takes raw features
        m.inp.bias -= (m.inp.weight * (mu / sd)).sum(1)
        m.inp.weight /= sd
    meta = {"k_max": k_max, "width": width, "lambda": lam, "offset": offset, "val_mae": mae, "val_exact_share": exact,
            "val_simulated_speed": score, "train_rounds": len(ti), "val_rounds": len(vi), "grid": grid,
            "cost_model": cost.to_json(), "simulated_batch": cfg.batch, **_baselines(y[vi], k_max, cost, cfg)}
    return m, meta


def _prefixes(tok, texts: list[str], cfg: LDLPFitConfig, log=print) -> list[list[int]]:
    """Random prefixes of the corpus files (at most cfg.prompt_tokens each), cfg.prompts of them; says why when
    the corpus gives fewer."""
    g = torch.Generator().manual_seed(cfg.seed)
    prompts, short = [], 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 32:
            short += 1
            continue
        cut = int(torch.randint(16, max(17, len(ids) - 8), (1,), generator=g))  # a random prefix of the file
        prompts.append(ids[max(0, cut - cfg.prompt_tokens): cut])
        if len(prompts) == cfg.prompts:
            break
    if len(prompts) < cfg.prompts:
        log(f"only {len(prompts)} of {cfg.prompts} prefixes: the corpus gave {len(texts)} files (read at most "
            f"{cfg.prompts * 2}), {short} of them under 32 tokens; add files to --corpus for more")
    return prompts


def fit_ldlp(target_dir: str, draft_dir: str, corpus: str, out: str, cfg: LDLPFitConfig, text_column: str = "text",
             log=print) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    target = load_target(target_dir, cfg.dtype, cfg.device)
    tok = load_tokenizer(target_dir)
    texts, info = read_texts(corpus, text_column, max_files=cfg.prompts * 2, seed=cfg.seed)
    prompts = _prefixes(tok, texts, cfg, log)
    head = build_engine(target, EagleSpec(k=cfg.k_max_collect), draft=draft_dir).drafter
    x, y = collect_labels(target, head, prompts, cfg.new_tokens, cfg.batch_size, cfg.k_max_collect, log)
    t_collect = time.time() - t0
    log(f"collected {len(y)} rounds from {len(prompts)} prefixes in {t_collect:.0f}s; "
        f"mean accepted {float(y.mean()):.2f}")
    if cfg.cost_model:
        cost = CostModel.from_json(json.load(open(cfg.cost_model)))
    else:
        cost = measure_cost(target, head, name=os.path.basename(target_dir.rstrip("/")), batches=(cfg.batch,),
                            tokens=(1, 2, 4, 8, 16), widths=(1, 2, 4, 8, 16), context=128, repeats=3)
        log(f"cost model measured in {cost.measure_seconds:.1f}s")
    model, meta = fit(x, y, cfg, log, cost)
    meta.update(target=os.path.abspath(target_dir), draft=os.path.abspath(draft_dir), corpus=corpus, corpus_info=info,
                prompts=len(prompts), collect_seconds=round(t_collect, 1),
                fit_seconds=round(time.time() - t0 - t_collect, 1),
                config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                accelerator=torch.cuda.get_device_name() if target.device.type == "cuda" else "cpu",
                label_histogram={int(k): int(v) for k, v in zip(*torch.unique(y, return_counts=True))})
    save_ldlp(model, out, meta)
    return meta
