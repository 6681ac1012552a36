"""Learnable quantizers for quantization-aware training: LSQ (learned step size) and PACT (learned clip).

LSQ (Esser et al. 2020; Nagel et al. 2021 white paper §4.4 and §5.3, the standard QAT pipeline):
    x̂ = s·(clamp(⌊x/s⌉ + ⌊z⌉, q_min, q_max) − ⌊z⌉), with s and z learnable, z stored as a real number
    and rounded in the forward pass. Straight-through gradients:
        ∂x̂/∂x = 1 inside the range, 0 outside;
        ∂x̂/∂s = ⌊x/s⌉ − x/s inside, q_min − ⌊z⌉ or q_max − ⌊z⌉ when clipped (q_min / q_max for z = 0);
        ∂x̂/∂z = 0 inside, −s when clipped.
    Optional gradient scale g = 1/√(N·q_max) on s and z (N: elements sharing one scale, per sample for
    activations, as in LSQ's N_W and N_F), applied as s·g + (s − s·g).detach(): same value, gradient ×g.

PACT (Choi et al. 2018) for activations on a non-negative grid: y = clamp(x, 0, α) with α learnable,
quantized with s = α/(q_max − q_min) and a straight-through round, so ∂ŷ/∂x = 1 on [0, α), 0 elsewhere,
and ∂ŷ/∂α = 1 where x ≥ α, 0 elsewhere.

A quantizer of a simulated model is composed of its range/scale part (the FakeQuantize: spec, scale,
zero point) and its rounding/gradient part (`FakeQuantize.estimator`). `make_lsq` / `make_pact` set the
LSQ / PACT part in place (the module stays the same object, so every reference the graph builder keeps
stays valid); `freeze` removes it after training, leaving the learned grid as fixed buffers.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .fixed_point import ROUNDER
from .quantizer import FakeQuantize, broadcast_shape, group_rows, round_ste

__all__ = ["lsq_fake_quantize", "lsq_reference", "grad_scale", "LSQ", "PACT", "make_lsq", "make_pact",
           "freeze", "is_learnable", "clamp_learned"]

_EPS = torch.finfo(torch.float32).eps


def grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """t in the forward pass; its gradient multiplied by g in the backward pass."""
    if g == 1.0:
        return t
    return (t - t * g).detach() + t * g


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: Optional[int] = None, g: float = 1.0, fused: bool = True) -> torch.Tensor:
    """LSQ fake quantization of x with per-tensor (axis None) or per-index-of-axis (scale, zero_point).
    The forward value equals quantizer.fake_quantize's (x·(1/s), round half to even).

    fused: one fused forward pass and a lean backward (_LSQ), same values and gradients as the
    formula; otherwise the formula written with straight-through rounds (the reference, also used
    for dtypes the fused kernels do not take)."""
    if axis is not None and axis < 0:
        axis += x.dim()
    if fused and x.dtype == torch.float32:
        return _LSQ.apply(x, scale, zero_point, qmin, qmax, axis, float(g))
    return lsq_reference(x, scale, zero_point, qmin, qmax, axis, g)




def _per_tensor_cachemask(x: torch.Tensor, s: torch.Tensor, z: int, qmin: int, qmax: int):
    """torch's fake_quantize_per_tensor_affine_cachemask, same values and mask, in ~30 % less time on
    CPU: round(x·(1/s)) clamped to [qmin − z, qmax − z] times s, which equals (clamp(round(x/s) + z) − z)·s
    for integer z. Pre-clamping to one step beyond the grid keeps |v| small for the rounding trick
    without changing which side of the grid a value falls on. One difference: a NaN input stays NaN
    (torch's CPU kernel maps it to the lowest grid value), so a diverging run shows as NaN."""
    lo, hi = float(qmin - z), float(qmax - z)
    # beyond the trick's range, and on GPUs (where torch's fused kernel is already one pass): torch's kernel
    if max(abs(lo), abs(hi)) >= 2.0 ** 21 or x.device.type != "cpu":
        return torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, float(s), z, qmin, qmax)
    inv = float(1.0 / s)                             # the float32 reciprocal, as torch's kernel takes it
    v = x * inv
    v.clamp_(lo - 1.0, hi + 1.0).add_(ROUNDER).sub_(ROUNDER)
    mask = v.ge(lo).logical_and_(v.le(hi))
    return v.clamp_(lo, hi).mul_(float(s)), mask


class _LSQ(torch.autograd.Function):
    """LSQ in one fused forward pass (torch's cachemask fake-quant kernels) and a lean backward.

    With y = x̂ and m the inside mask, the spec's per-element ∂x̂/∂s is (y − x)/s inside (= ⌊x/s⌉ − x/s)
    and y/s clipped (= q_clip − ⌊z⌉), i.e. (y − m·x)/s everywhere; so
        ∂L/∂x = m·dy,   ∂L/∂s = g·(Σ dy·y − Σ (m·dy)·x)/s,   ∂L/∂z = −g·s·(Σ dy − Σ m·dy)
    (sums per channel for per-channel grids): one elementwise pass and a few reductions, no
    full-size temporaries for the scale's gradient. y is the tensor the next layer saves anyway."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, g):
        s = scale.detach().clamp(min=_EPS)
        z = zero_point.detach().clamp(qmin, qmax).round()
        if axis is None:
            y, mask = _per_tensor_cachemask(x, s.reshape(()), int(z.reshape(())), qmin, qmax)
        else:
            y, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, s.reshape(-1), z.reshape(-1).int(), axis, qmin, qmax)
        ctx.save_for_backward(x, y, mask, s)
        ctx.meta = (axis, g, scale.shape, zero_point.shape, zero_point.requires_grad)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, mask, s = ctx.saved_tensors
        axis, g, s_shape, z_shape, z_grad = ctx.meta
        dx = torch.where(mask, dy, 0.0)          # one pass; dy * mask would first widen the mask to float
        ds = dz = None
        if axis is None:
            if ctx.needs_input_grad[1]:
                d = torch.dot(dy.reshape(-1), y.reshape(-1)) - torch.dot(dx.reshape(-1), x.reshape(-1))
                ds = (d / s.reshape(()) * g).reshape(s_shape)
            if ctx.needs_input_grad[2] and z_grad:
                dz = (-(dy.sum() - dx.sum()) * s.reshape(()) * g).reshape(z_shape)
        else:
            dims = [i for i in range(dy.dim()) if i != axis]
            if ctx.needs_input_grad[1]:
                d = (dy * y).sum(dims) - (dx * x).sum(dims)
                ds = (d / s.reshape(-1) * g).reshape(s_shape)
            if ctx.needs_input_grad[2] and z_grad:
                dz = (-(dy.sum(dims) - dx.sum(dims)) * s.reshape(-1) * g).reshape(z_shape)
        return (dx if ctx.needs_input_grad[0] else None), ds, dz, None, None, None, None


def lsq_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: Optional[int] = None, g: float = 1.0) -> torch.Tensor:
    """The LSQ formula with straight-through rounds (autograd derives the spec's gradients)."""
    if axis is not None:
        if axis < 0:
            axis += x.dim()
        shape = broadcast_shape(x, axis)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    s = grad_scale(scale, g).clamp(min=_EPS)
    z = round_ste(grad_scale(zero_point, g).clamp(qmin, qmax))
    q = round_ste(x * (1.0 / s)) + z
    # inside (boundaries included, as torch's mask): q carries the gradient; clipped: a constant
    inside = (q >= qmin) & (q <= qmax)
    q = torch.where(inside, q, q.detach().clamp(qmin, qmax))
    return (q - z) * s


class LSQ:
    """LSQ's rounding and gradient part of a FakeQuantize (its `estimator`): the quantizer's scale (and
    zero point, when asymmetric) are nn.Parameters, learned with straight-through gradients."""

    def __init__(self, grad_scale: bool = False, is_weight: bool = False):
        self.grad_scale = bool(grad_scale)
        self.is_weight = bool(is_weight)

    def versions(self, fq: FakeQuantize) -> Tuple[int, ...]:
        return fq.scale._version, fq.zero_point._version

    @staticmethod
    def _relu_absorbed(fq: FakeQuantize) -> bool:
        """A ReLU before a per-tensor grid that starts at 0 is done by the grid's own clamp (as integer
        hardware does): the forward value is identical; the gradient differs only for inputs in (−s/2, 0),
        which round to 0 and count as inside the range. Saves a pass forward and backward."""
        if fq.pre_act != "relu" or fq.axis is not None or fq.spec.granularity != "per_tensor":
            return False
        return float(fq.zero_point.detach().clamp(fq.qmin, fq.qmax).round()) == fq.qmin

    def _g(self, fq: FakeQuantize, x: torch.Tensor) -> float:
        if not self.grad_scale:
            return 1.0
        n = x.numel() / max(fq.scale.numel(), 1)
        if not self.is_weight and x.dim() > 1:
            n /= x.shape[0]                    # activations: features of one sample (LSQ's N_F)
        return 1.0 / math.sqrt(max(n, 1.0) * fq.qmax)

    def forward(self, fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
        if not self._relu_absorbed(fq):
            x = fq._apply_pre_act(x)
        g = self._g(fq, x)
        if fq.spec.granularity == "per_group":
            rows, back = group_rows(x, fq.channel_axis, fq.spec.group_size)
            return back(lsq_fake_quantize(rows, fq.scale.reshape(-1), fq.zero_point.reshape(-1),
                                          fq.qmin, fq.qmax, 0, g))
        return lsq_fake_quantize(x, fq.scale, fq.zero_point, fq.qmin, fq.qmax, fq.axis, g)

    @staticmethod
    def clamp(fq: FakeQuantize) -> None:
        fq.scale.clamp_(min=_EPS)
        if fq.zero_point.requires_grad:
            fq.zero_point.clamp_(fq.qmin, fq.qmax)

    @staticmethod
    def grid(fq: FakeQuantize) -> Tuple[torch.Tensor, torch.Tensor]:
        """The learned (scale, integer zero point)."""
        return fq.scale.detach().clamp(min=_EPS), fq.zero_point.detach().clamp(fq.qmin, fq.qmax).round()


class PACT:
    """PACT's rounding and gradient part of an activation FakeQuantize on a grid starting at 0: the
    upper clip α is an nn.Parameter `pact_alpha` of the quantizer; the scale buffer follows α
    (s = α/(q_max − q_min))."""

    def versions(self, fq: FakeQuantize) -> Tuple[int, ...]:
        return (fq.pact_alpha._version,)

    def forward(self, fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
        x = fq._apply_pre_act(x)
        alpha = fq.pact_alpha.clamp(min=_EPS)
        y = torch.minimum(torch.relu(x), alpha)      # gradient to α exactly where x ≥ α
        s = (alpha / float(fq.qmax - fq.qmin)).detach()
        z = fq.zero_point.detach().round()
        yq = torch.clamp(torch.round(y.detach() * (1.0 / s)) + z, fq.qmin, fq.qmax)
        return y + ((yq - z) * s - y.detach()).detach()

    @staticmethod
    def clamp(fq: FakeQuantize) -> None:
        fq.pact_alpha.clamp_(min=_EPS)
        # the scale buffer follows α (read by tied grids and the card)
        fq.scale.copy_((fq.pact_alpha / float(fq.qmax - fq.qmin)).reshape(fq.scale.shape))

    @staticmethod
    def grid(fq: FakeQuantize) -> Tuple[torch.Tensor, torch.Tensor]:
        alpha = fq.pact_alpha.detach().clamp(min=_EPS)
        return (alpha / float(fq.qmax - fq.qmin)).reshape(fq.scale.shape), fq.zero_point.detach().round()


def is_learnable(fq: nn.Module) -> bool:
    return isinstance(getattr(fq, "estimator", None), (LSQ, PACT))


def _to_parameter(fq: nn.Module, name: str, requires_grad: bool) -> None:
    value = getattr(fq, name).detach().clone().float()
    del fq._buffers[name]
    fq.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))


def _to_buffer(fq: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in fq._parameters:
        del fq._parameters[name]
    fq.register_buffer(name, value.detach().clone().float())


def _attach(fq: FakeQuantize, estimator) -> FakeQuantize:
    fq.estimator = estimator
    fq._vbase += 1
    fq.drop_caches()
    return fq


def make_lsq(fq: FakeQuantize, *, grad_scale: bool = False, is_weight: bool = False) -> FakeQuantize:
    """Give a calibrated FakeQuantize the LSQ estimator, in place: s learnable; z learnable for
    asymmetric grids (kept at 0 for symmetric ones)."""
    if fq.estimator is not None:
        raise TypeError(f"quantizer '{fq.qname}' already learns with {type(fq.estimator).__name__}; "
                        "only a plain FakeQuantize can become LSQ")
    if fq.dynamic:
        raise ValueError(f"quantizer '{fq.qname}' is dynamic (range from every input): nothing to learn")
    if not fq.calibrated:
        raise ValueError(f"quantizer '{fq.qname}' has no range yet: initialize ranges before LSQ")
    if fq.spec.scale_format == "power_of_two":
        raise ValueError(f"quantizer '{fq.qname}' uses power-of-two scales, which LSQ cannot learn")
    with torch.no_grad():
        fq.zero_point = fq.zero_point.detach().round() if not fq.spec.symmetric else torch.zeros_like(fq.zero_point)
    _to_parameter(fq, "scale", True)
    _to_parameter(fq, "zero_point", not fq.spec.symmetric)
    return _attach(fq, LSQ(grad_scale, is_weight))


def make_pact(fq: FakeQuantize) -> Optional[FakeQuantize]:
    """Give a calibrated per-tensor activation FakeQuantize whose grid starts at 0 the PACT estimator,
    in place (α = the calibrated upper end). Returns None (quantizer unchanged) where PACT does not
    apply: a grid reaching below 0 (PACT clips at 0), per-channel or dynamic ranges."""
    if fq.estimator is not None or fq.dynamic or not fq.calibrated or fq.axis is not None:
        return None
    if fq.spec.granularity != "per_tensor" or fq.spec.scale_format == "power_of_two":
        return None
    lo, hi = fq.range()
    if float(lo) != 0.0:
        return None
    fq.register_parameter("pact_alpha", nn.Parameter(hi.detach().clone().float().reshape(())))
    return _attach(fq, PACT())


@torch.no_grad()
def clamp_learned(fq: nn.Module) -> None:
    """Keep learned parameters valid after an optimizer step: s > 0, z on the integer grid's span, α > 0."""
    if is_learnable(fq):
        fq.estimator.clamp(fq)


@torch.no_grad()
def freeze(fq: nn.Module) -> nn.Module:
    """Remove the learnable estimator, leaving a plain FakeQuantize holding the learned grid (z rounded
    to an integer), so the simulated model evaluates exactly as a PTQ one does."""
    if not is_learnable(fq):
        return fq
    scale, zp = fq.estimator.grid(fq)
    fq._parameters.pop("pact_alpha", None)
    fq.estimator = None
    _to_buffer(fq, "scale", scale)
    _to_buffer(fq, "zero_point", zp)
    fq.set_qparams(scale, zp)
    return fq
