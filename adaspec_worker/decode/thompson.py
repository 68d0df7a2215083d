"""Thompson-sampled draft length (EESD's Beta-TS, Liu et al., 2024, arXiv 2406.03853), per row, on the device.

Each row keeps a Beta(a, b) posterior on the chance theta that a drafted token is accepted. Each round draws
theta from it and picks, among a few fixed chain lengths, the one with the most expected tokens per unit
cost under that theta; after verification the posterior takes the round's evidence (accepted tokens are
successes, the rejection that cut the chain short one failure). The rule, and what of it is ours, is
documented on `jobs.specs.EESDSpec`.

The draws are counter-based (`sampling._uniform`-style hashes of the row's seed and output position, on their
own stream), so a row's lengths are reproducible from its seed and never depend on its batch companions, and
nothing here syncs with the host: Gamma variates come from Marsaglia and Tsang's method run for a fixed number
of tries on uniforms (normals by the inverse CDF). Knows nothing of drafters, trees or verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import uniform

STREAM_THOMPSON = 11  # a stream of its own: never the uniforms verification uses
GAMMA_TRIES = 6  # Marsaglia-Tsang accepts > 95% per try for shape >= 1: all six fail with p < 1e-7 (then: the mean)
LANES = 2 * (2 * GAMMA_TRIES + 1)  # two Gamma variates, each 2 uniforms per try plus 1 for shapes below 1


def gamma_from_uniforms(shape: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gamma(shape, 1) variates: shape [B] > 0 (float64), u [B, 2 * GAMMA_TRIES + 1] uniforms in (0, 1) -> [B].

    Marsaglia and Tsang (2000) for shape >= 1; below 1, Gamma(shape + 1) * U^(1/shape)."""
    small = shape < 1
    a = torch.where(small, shape + 1, shape)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    x = torch.special.ndtri(u[:, 0 : 2 * GAMMA_TRIES : 2])  # [B, T] standard normals
    u2 = u[:, 1 : 2 * GAMMA_TRIES : 2]  # [B, T]
    v = (1.0 + c[:, None] * x) ** 3
    dd = d[:, None]
    ok = (v > 0) & (torch.log(u2) < 0.5 * x * x + dd - dd * v + dd * torch.log(v.clamp_min(1e-300)))
    first = ok.to(torch.uint8).argmax(-1)  # [B] first accepted try (0 when none: replaced below)
    draw = torch.gather(d[:, None] * v, 1, first[:, None])[:, 0]
    draw = torch.where(ok.any(-1), draw, a)  # no try accepted (p < 1e-7): the mean
    boost = u[:, 2 * GAMMA_TRIES] ** (1.0 / shape)
    return torch.where(small, draw * boost, draw)


def beta_from_uniforms(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Beta(a, b) variates as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b): a, b [B]; u [B, LANES] -> [B]."""
    half = LANES // 2
    x = gamma_from_uniforms(a, u[:, :half])
    y = gamma_from_uniforms(b, u[:, half:])
    return x / (x + y).clamp_min(1e-300)


def expected_rate(theta: torch.Tensor, lengths: torch.Tensor, draft_cost: float) -> torch.Tensor:
    """Expected emitted tokens per unit cost of a chain of each length: theta [B], lengths [L] -> [B, L].

    With per-token acceptance theta a chain of n emits sum_{i=0..n} theta^i = (1 - theta^(n+1)) / (1 - theta)
    tokens in expectation (the bonus included) and costs 1 + draft_cost * n target passes."""
    t = theta.clamp(0.0, 1.0 - 1e-9)[:, None]
    n = lengths.to(theta.dtype)[None, :]
    return (1 - t ** (n + 1)) / (1 - t) / (1 + draft_cost * n)


@dataclass(frozen=True)
class ThompsonConfig:
    """The controller's settings (an `EESDSpec` / `EagleThompsonSpec` carries them)."""

    lengths: tuple[int, ...]
    draft_cost: float
    prior_accept: float = 1.0
    prior_reject: float = 1.0
    decay: float = 1.0


class ThompsonLength:
    """Per-row Beta posteriors and the length each row drafts next. State: `a`, `b` [B] float64 and `k` [B] long,
    views of capacity buffers owned by the proposer that holds this controller (`Proposer.row_state`)."""

    def __init__(self, cfg: ThompsonConfig):
        self.cfg = cfg
        self.lengths = sorted(set(cfg.lengths))
        self.k_max = self.lengths[-1]
        self._lengths: dict[torch.device, torch.Tensor] = {}  # the lengths as a tensor, per device

    def reset(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Every row back to the prior."""
        a.fill_(self.cfg.prior_accept)
        b.fill_(self.cfg.prior_reject)

    def choose(self, a: torch.Tensor, b: torch.Tensor, seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """[B] the chain length each row drafts next: theta ~ Beta(a, b), then the best of `lengths` under it."""
        theta = beta_from_uniforms(a, b, uniform(seeds, counter, STREAM_THOMPSON, LANES))
        lengths = self._lengths.get(a.device)
        if lengths is None:  # made once per device, outside any captured graph (first_plan runs eagerly)
            lengths = self._lengths[a.device] = torch.tensor(self.lengths, device=a.device)
        return lengths[expected_rate(theta, lengths, self.cfg.draft_cost).argmax(-1)]

    def update(self, a: torch.Tensor, b: torch.Tensor, n_accepted: torch.Tensor, n_drafted: torch.Tensor) -> None:
        """The round's evidence, in place: n_accepted successes, one failure when the chain was cut short.
        Rows that drafted nothing (finished, or a length of 0) learn nothing."""
        drafted = n_drafted > 0
        decay = self.cfg.decay
        succ = n_accepted.to(a.dtype)
        fail = (n_accepted < n_drafted).to(b.dtype)
        a.copy_(torch.where(drafted, decay * a + succ, a))
        b.copy_(torch.where(drafted, decay * b + fail, b))

    def posterior_mean(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / (a + b)
