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
    was made from (reconstruction does not change the FP weight).

    Speed: an iteration's cost is per weight (elementwise passes over V), so for a layer with few samples
    per weight (a classifier) it dwarfs the layer's own matmul. The soft weight and the regulariser are
    therefore two small autograd functions that share one h(V) per iteration (cached on V's version) and
    compute their gradients in closed form: with b = ⌊W/s⌋ + z, a weight whose b lies in [q_min, q_max − 1]
    is free, W̃ = s·(clamp(b) − z) + s·free·h, and ∂h/∂V = (ζ − γ)·σ(V)(1 − σ(V)) where h is not clipped.
    The values equal the composed formula's up to float rounding (last bits), not bit for bit."""

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
        b = self.w_floor + z
        free = ((b >= self.qmin) & (b <= self.qmax - 1)).to(rows.dtype)
        self._base = s * (torch.clamp(b, self.qmin, self.qmax) - z)      # the weight at h = 0
        self._slope = s * free                                            # ∂W̃/∂h
        self._slope_v = self._slope * (ZETA - GAMMA)                      # ∂W̃/∂h · (ζ − γ)
        self._gamma = torch.tensor(GAMMA, dtype=rows.dtype, device=rows.device)
        self._one = torch.ones((), dtype=rows.dtype, device=rows.device)
        self._buf = {k: torch.empty_like(rows) for k in ("sig", "pre", "h", "dh", "reg")}
        self._h_ver: Optional[int] = None

    def versions(self, fq: FakeQuantize) -> Tuple[int, ...]:
        return (self.v._version,)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def _h_and_slope(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """h(V) and ∂h/∂V / (ζ − γ) = σ(V)(1 − σ(V)) where h is not clipped (0 where it is), computed once
        per version of V (the soft weight and the regulariser of one iteration share them), into buffers
        reused across iterations (fresh tensors of this size cost page faults on every iteration)."""
        ver = self.v._version
        if self._h_ver != ver:
            sig, pre, h, dh = self._buf["sig"], self._buf["pre"], self._buf["h"], self._buf["dh"]
            with torch.no_grad():
                torch.sigmoid(self.v, out=sig)
                torch.add(self._gamma, sig, alpha=ZETA - GAMMA, out=pre)     # γ + (ζ − γ)·σ, one pass
                torch.clamp(pre, 0.0, 1.0, out=h)
                torch.ops.aten.sigmoid_backward.grad_input(self._one.expand_as(sig), sig, grad_input=dh)
                torch.ops.aten.hardtanh_backward.grad_input(dh, pre, 0.0, 1.0, grad_input=dh)  # 0 where clipped
            self._h_ver = ver
        return self._buf["h"], self._buf["dh"]

    def weight_for(self, h: torch.Tensor) -> torch.Tensor:
        """The weight with rounding offsets h (soft in [0, 1], or hard in {0, 1}), in w's shape."""
        return self.back(self.s * (torch.clamp(self.w_floor + h + self.z, self.qmin, self.qmax) - self.z))

    def nearest(self) -> torch.Tensor:
        return self.back(self.s * (torch.clamp(self.w_nearest + self.z, self.qmin, self.qmax) - self.z))

    def hard(self) -> torch.Tensor:
        return (self.v >= 0).to(self.w_floor.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """Σ(1 − |2h − 1|^β), differentiable in V."""
        return _Regulariser.apply(self.v, self, float(beta))

    def forward(self, fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
        return self.back(_SoftWeight.apply(self.v, self))

    def changed_vs_nearest(self) -> float:
        return float(((self.w_floor + self.hard()) != self.w_nearest).float().mean())


class _SoftWeight(torch.autograd.Function):
    """W̃(V) in the row layout; ∂W̃/∂V = s·free·(ζ − γ)·σ(1 − σ) where h is not clipped."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, est: LearnedRounding) -> torch.Tensor:
        h, dh = est._h_and_slope()
        ctx.save_for_backward(dh)
        ctx.est = est
        return torch.addcmul(est._base, est._slope, h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dh,) = ctx.saved_tensors
        ctx.est._h_ver = None            # V changes next (also through .data, which keeps its version)
        return torch.mul(grad, ctx.est._slope_v).mul_(dh), None


class _Regulariser(torch.autograd.Function):
    """Σ(1 − |u|^β), u = 2h − 1; ∂/∂V = −2β·sign(u)·|u|^(β−1)·(ζ − γ)·σ(1 − σ) where h is not clipped."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, est: LearnedRounding, beta: float) -> torch.Tensor:
        h, dh = est._h_and_slope()
        u = torch.add(-est._one, h, alpha=2.0, out=est._buf["pre"])    # 2h − 1 (pre is not needed again)
        a = torch.abs(u, out=est._buf["sig"])
        p = torch.pow(a, beta - 1.0, out=est._buf["reg"])
        if beta >= 1.0:                  # |u|^β = |u|^(β−1)·|u| (finite: no 0·∞ at u = 0)
            value = a.numel() - torch.dot(p.reshape(-1), a.reshape(-1))
        else:
            value = (1.0 - a.pow(beta)).sum()
        # sign(u)·|u|^(β−1); copysign gives +|u|^(β−1) at u = 0, which is 0 there unless β ≤ 1
        g = p.copysign_(u) if beta > 1.0 else p.mul_(u.sign())
        ctx.save_for_backward(g.mul_(dh))
        ctx.scale = -2.0 * beta * (ZETA - GAMMA)
        ctx.est = est
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (g,) = ctx.saved_tensors
        ctx.est._h_ver = None
        return g * (grad * ctx.scale), None, None


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
