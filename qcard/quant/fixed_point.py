"""Fixed-point <wl, fl> quantization (MARViN / AdaPT), vectorized, with a straight-through gradient.

A fixed-point number with word length wl (sign bit included) and fractional length fl lies on the
grid k·2^(−fl), k an integer, inside [−2^(wl−fl−1), 2^(wl−fl−1) − 2^(−fl)]. There is no scale factor:
values outside the range are clamped. fl may exceed wl (a purely fractional format) or be negative.

Rounding:
  nearest     round half to even, then clamp (the bounds lie on the grid);
  stochastic  ⌊x·2^fl + u⌋, u ~ U[0, 1) from a seeded generator: E[x̂] = x inside the range.
float32 tensors go through torch.fake_quantize_per_tensor_affine (one fused pass, exact for a
power-of-two scale); stochastic rounding is then nearest rounding of x + U(−δ/2, δ/2), which equals
⌊x/δ + u⌋ except on exact ties (probability ~2^−24 per element), where it rounds half to even.

Gradient (straight-through): "identity" passes the incoming gradient unchanged (as the AdaPT code,
which overwrites `.data`); "clipped" zeroes it where x was outside the range.

float32 note: x·2^fl is exact (a power-of-two scaling), but float32 keeps 24 significant bits, so
for |x|·2^fl ≥ 2^24 the input already lies on the grid and rounding does nothing.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch

from .qspec import Rounding

__all__ = ["fixed_point_range", "fixed_point_quantize", "check_format", "FixedPointSTE", "ROUNDER"]



def check_format(wl: int, fl: int) -> None:
    if int(wl) != wl or int(fl) != fl:
        raise ValueError(f"fixed-point word and fractional lengths must be integers, got wl={wl!r}, fl={fl!r}")
    if wl < 1:
        raise ValueError(f"fixed-point word length must be at least 1 (the sign bit), got wl={wl}")
    if wl > 64 or abs(fl) > 126:
        raise ValueError(f"fixed-point format <{wl}, {fl}> is outside what float32 can represent "
                         "(wl <= 64, |fl| <= 126)")


def fixed_point_range(wl: int, fl: int) -> Tuple[float, float]:
    """(lowest, highest) representable value of <wl, fl>."""
    check_format(wl, fl)
    half = 2.0 ** (wl - fl - 1)
    return -half, half - 2.0 ** (-fl)


# Adding then subtracting 1.5·2^23 rounds a float32 of magnitude < 2^22 to an integer, half to even
# (the spacing of float32 in [2^23, 2^24) is exactly 1): two cheap passes instead of nearbyint.
# Shared with the LSQ quantizer (qcard.quant.lsq).
ROUNDER = 12582912.0


def _quantize(x: torch.Tensor, wl: int, fl: int, rounding: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    lo, hi = fixed_point_range(wl, fl)
    scale = 2.0 ** fl
    lo_i, hi_i = lo * scale, hi * scale           # integers: the grid in units of 2^(−fl)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding '{rounding}'; allowed: nearest, stochastic")
    if x.dtype == torch.float32 and x.device.type == "cpu" and -(2 ** 21) <= lo_i and hi_i <= 2 ** 21:
        # on the CPU, cheaper than torch's fake-quantize kernel and bit-identical to it: the grid's bounds
        # are integers, so clamping before rounding equals clamping after; adding and subtracting
        # 1.5·2^23 rounds half to even for |v| < 2^22. Stochastic rounding draws U(−½, ½) in grid units,
        # which is the same number as U(−δ/2, δ/2)·2^fl (power-of-two scaling is exact).
        if rounding == "stochastic":
            y = torch.empty_like(x).uniform_(-0.5, 0.5, generator=generator).add_(x, alpha=scale)
        else:
            y = x * scale
        return y.clamp_(lo_i, hi_i).add_(ROUNDER).sub_(ROUNDER).mul_(1.0 / scale)
    if x.dtype == torch.float32 and -(2 ** 31) <= lo_i and hi_i <= 2 ** 31 - 1:
        # torch's fused fake-quantize op (one pass: x·2^fl, round half to even, clamp, ·2^−fl) is exact
        # here: the scale is a power of two and the bounds are integers. Stochastic rounding is done as
        # nearest rounding of x + U(−δ/2, δ/2), δ = 2^−fl, i.e. ⌊x/δ + U(0, 1)⌋ except on exact ties.
        if rounding == "stochastic":
            x = torch.empty_like(x).uniform_(-0.5 / scale, 0.5 / scale, generator=generator).add_(x)
        return torch.fake_quantize_per_tensor_affine(x, 1.0 / scale, 0, int(lo_i), int(hi_i))
    y = x * scale
    if rounding == "stochastic":
        y.add_(torch.empty_like(y).uniform_(generator=generator)).floor_()
    else:
        y.round_()
    return y.clamp_(lo_i, hi_i).mul_(1.0 / scale)


class FixedPointSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wl, fl, rounding, generator, ste):
        out = _quantize(x, wl, fl, rounding, generator)
        ctx.ste = ste
        if ste == "clipped":
            lo, hi = fixed_point_range(wl, fl)
            ctx.save_for_backward((x >= lo) & (x <= hi))
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste == "clipped":
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None


def fixed_point_quantize(x: torch.Tensor, wl: int, fl: int, *, rounding: Rounding = "stochastic",
                         generator: Optional[torch.Generator] = None,
                         ste: Literal["identity", "clipped"] = "identity") -> torch.Tensor:
    """x rounded onto the <wl, fl> grid (same shape and dtype). Differentiable with a straight-through
    gradient when x requires grad. `generator` seeds stochastic rounding (None: torch's global RNG)."""
    if ste not in ("identity", "clipped"):
        raise ValueError(f"unknown straight-through mode '{ste}'; allowed: identity, clipped")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding '{rounding}'; allowed: nearest, stochastic")
    wl, fl = int(wl), int(fl)
    if x.requires_grad and torch.is_grad_enabled():
        return FixedPointSTE.apply(x, wl, fl, rounding, generator, ste)
    return _quantize(x.detach(), wl, fl, rounding, generator)
