"""Estimators that reconstruction attaches to a simulated model's quantizers (`FakeQuantize.estimator`).

LearnedRounding (AdaRound, Nagel et al. 2020), on a weight quantizer: the grid (scale, zero point) is
fixed; each weight rounds down or up by a learned h(V) ∈ [0, 1]:
    W̃(V) = s·(clamp(⌊W/s⌋ + h(V) + z, q_min, q_max) − z),  h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1),
ζ = 1.1, γ = −0.1, V initialised so that h(V) = W/s − ⌊W/s⌋ (the soft weight starts at W inside the
range). The regulariser λ·Σ(1 − |2h − 1|^β) pushes h to 0 or 1; `harden` writes the chosen rounding
into the weight, on the grid, so the plain quantizer reproduces it exactly.

QDrop (Wei et al. 2022), on an activation quantizer: during reconstruction each element keeps its
quantized value with probability p and its FP value otherwise (fresh draws every call, from the
estimator's own seeded generator); p = 1 is BRECQ. The quantized value comes from the estimator it
wraps (LSQ, so the step size is learned) or the plain grid.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .layerwise import weight_rows
from .quantizer import FakeQuantize

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "LearnedRounding", "QDrop", "attach", "detach", "is_learned_rounding"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class LearnedRounding:
    """AdaRound's rounding part of a weight FakeQuantize: `v` (one logit per weight, in the quantizer's
    row layout) is the learnable tensor; forward(fq, w) ignores w's values beyond the start weight it
    was made from (reconstruction does not change the FP weight)."""

    def __init__(self, fq: FakeQuantize, weight: torch.Tensor):
        w = weight.detach()
        rows, s, z, back = weight_rows(w, fq)
        self.s, self.z, self.back = s, z, back
        self.qmin, self.qmax = fq.qmin, fq.qmax
        scaled = rows * (1.0 / s)
        self.w_floor = torch.floor(scaled)
        self.w_nearest = torch.round(scaled)
        rest = (scaled - self.w_floor).clamp(0.0, 1.0)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1).clamp(-30, 30)
        self.v = v.detach().requires_grad_(True)

    def versions(self, fq: FakeQuantize) -> Tuple[int, ...]:
        return (self.v._version,)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def weight_for(self, h: torch.Tensor) -> torch.Tensor:
        """The weight with rounding offsets h (soft in [0, 1], or hard in {0, 1}), in w's shape."""
        return self.back(self.s * (torch.clamp(self.w_floor + h + self.z, self.qmin, self.qmax) - self.z))

    def nearest(self) -> torch.Tensor:
        return self.back(self.s * (torch.clamp(self.w_nearest + self.z, self.qmin, self.qmax) - self.z))

    def hard(self) -> torch.Tensor:
        return (self.v >= 0).to(self.w_floor.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def forward(self, fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
        return self.weight_for(self.h())

    def changed_vs_nearest(self) -> float:
        return float(((self.w_floor + self.hard()) != self.w_nearest).float().mean())


class QDrop:
    """QDrop's drop around an activation quantizer's own rounding part (`inner`: LSQ or None, the plain
    grid): where(u < p, quantized, FP), u ~ U(0, 1) elementwise."""

    def __init__(self, p: float, generator: torch.Generator, inner=None):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"QDrop keep probability must be in (0, 1], got {p}")
        self.p = float(p)
        self.gen = generator
        self.inner = inner

    def versions(self, fq: FakeQuantize) -> Tuple[int, ...]:
        return self.inner.versions(fq) if self.inner is not None else ()

    def forward(self, fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            xq = self.inner.forward(fq, x)
        else:
            est, fq.estimator = fq.estimator, None
            try:
                xq = fq(x)
            finally:
                fq.estimator = est
        x_fp = fq._apply_pre_act(x)
        u = torch.rand(x_fp.shape, generator=self.gen, device="cpu").to(x_fp.device)
        return torch.where(u < self.p, xq, x_fp)


def attach(fq: FakeQuantize, estimator) -> None:
    fq.estimator = estimator
    fq._vbase += 1
    fq.drop_caches()


def detach(fq: FakeQuantize, restore: Optional[object] = None) -> None:
    """Remove a reconstruction estimator (or put back `restore`, the one it wrapped)."""
    fq.estimator = restore
    fq._vbase += 1
    fq.drop_caches()


def is_learned_rounding(fq: nn.Module) -> bool:
    return isinstance(getattr(fq, "estimator", None), LearnedRounding)
