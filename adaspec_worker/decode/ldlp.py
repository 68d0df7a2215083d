"""LDLP: AdaEAGLE's Lightweight Draft Length Predictor (Zhang et al., 2024), the runtime half.

Input: [embedding of the last accepted token; target final-norm hidden state of it]. The last token a
round emits is the bonus token, whose own hidden state is not computed yet; like EAGLE's head we pair
its embedding with the hidden state that produced it. Output: the number of draft tokens the target
will accept next round (regression). Model: a 3-layer residual MLP.

This module holds the module and its on-disk format (`save_ldlp` / `load_ldlp`: config.json +
model.safetensors) only; collecting labels and fitting it (`adarun fit-ldlp`) live in
`adaspec_worker/train/fit_ldlp.py`. Knows nothing of the engine or of proposers.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn


class LDLP(nn.Module):
    def __init__(self, in_dim: int, width: int, k_max: int, offset: float = 0.5):
        super().__init__()
        self.k_max = k_max
        self.offset = offset  # predicted length = floor(regression + offset): 0.5 rounds, higher drafts longer
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
                                    for _ in range(3))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 2H] -> predicted accepted length [B] (float)."""
        h = self.inp(x.float())
        for b in self.blocks:
            h = h + b(h)
        return self.out(h).squeeze(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Integer draft length in [0, k_max]: [B]."""
        return (self(x) + self.offset).floor().clamp(0, self.k_max).long()


def save_ldlp(model: LDLP, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {"in_dim": model.inp.in_features, "width": model.inp.out_features, "k_max": model.k_max,
           "offset": model.offset, **meta}
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
        raise ModelLoadError(f"{cfg_path}: in_dim {cfg['in_dim']} does not match 2 x the target's hidden size "
                             f"{target.cfg.hidden_size}")
    m = LDLP(cfg["in_dim"], cfg["width"], cfg["k_max"], cfg.get("offset", 0.5))
    load_strict(m, load_file(os.path.join(path, "model.safetensors")), path)
    m.meta = cfg
    return m.to(target.device).eval().requires_grad_(False)
