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

import atexit
import threading
import weakref
from collections import deque
from typing import Deque, Literal, Optional, Tuple, Union

import torch

from .qspec import Rounding

__all__ = ["fixed_point_range", "fixed_point_quantize", "check_format", "FixedPointSTE", "ROUNDER", "UniformStream"]


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


class UniformStream:
    """The draws of `torch.empty(n).uniform_(-0.5, 0.5, generator=g)`, call after call, made ahead in a
    background thread: the same numbers in the same order, so results do not change.

    Why: torch draws CPU random numbers serially (one core, one 32-bit Mersenne-Twister number per float32
    element), and stochastic rounding needs one per element of every quantized tensor: most of a MARViN
    training step. Drawn ahead, this work overlaps the layers' multi-threaded work instead of leaving a
    core idle. Consecutive uniform_ calls on one generator are slices of one stream (each float32 takes
    exactly one 32-bit number), so one long draw cut into pieces gives every call's numbers.
    Only this object may use `generator` while it is open; float32 only (float64 draws two numbers)."""

    CHUNK = 1 << 22                 # elements per background draw (16 MiB)

    def __init__(self, generator: torch.Generator, ahead: int = 3):
        self.generator = generator
        self._ahead = ahead
        self._ready: Deque[torch.Tensor] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: Optional[BaseException] = None
        self._buf, self._pos = torch.empty(0), 0
        self._thread = threading.Thread(target=self._fill, name="qcard-uniform-stream", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    def _fill(self) -> None:
        try:
            while True:
                with self._cond:
                    while len(self._ready) >= self._ahead and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                chunk = torch.empty(self.CHUNK).uniform_(-0.5, 0.5, generator=self.generator)
                with self._cond:
                    self._ready.append(chunk)
                    self._cond.notify_all()
        except BaseException as exc:      # handed to the consumer, which raises it
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _next_chunk(self) -> torch.Tensor:
        with self._cond:
            while not self._ready:
                if self._error is not None:
                    raise RuntimeError(f"stochastic rounding's random stream failed: {self._error}") from self._error
                if self._closed:
                    raise RuntimeError("stochastic rounding's random stream is closed")
                self._cond.wait()
            chunk = self._ready.popleft()
            self._cond.notify_all()
            return chunk

    def take(self, n: int) -> torch.Tensor:
        """The next n draws as a new 1-D float32 tensor the caller may change in place."""
        if self._pos + n <= self._buf.numel():
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            # a small result is copied, so it does not keep a whole chunk alive (parameter copies live long)
            return out.clone() if n < (1 << 16) else out
        parts = [self._buf[self._pos:]]
        have = parts[0].numel()
        while have < n:
            self._buf, self._pos = self._next_chunk(), 0
            k = min(n - have, self._buf.numel())
            parts.append(self._buf[:k])
            self._pos, have = k, have + k
        return torch.cat(parts)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Draws for every element of x, laid out as torch.empty_like(x).uniform_ lays them (memory order)."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"UniformStream serves float32 CPU tensors, not {x.dtype} on {x.device}")
        n = x.numel()
        if x.is_contiguous():
            # a tensor of its own over the drawn numbers, not a view of them: autograd lets the caller's
            # result (returned by FixedPointSTE) be changed in place, as an in-place ReLU does
            t = self.take(n)
            return torch.empty(0).set_(t.untyped_storage(), t.storage_offset(), x.shape, x.stride())
        u = torch.empty_like(x)
        u.as_strided((n,), (1,)).copy_(self.take(n))
        return u

    def close(self) -> None:
        """Stop drawing ahead (the generator has then advanced past what was taken)."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
        _OPEN.discard(self)


# streams not closed by their owner (a training that raised outside Marvin.apply) are closed at exit:
# a thread still drawing while the interpreter shuts down aborts the process
_OPEN: "weakref.WeakSet[UniformStream]" = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN):
        stream.close()


Generator = Union[torch.Generator, UniformStream, None]


def _uniform(x: torch.Tensor, low: float, high: float, generator: Generator) -> torch.Tensor:
    """torch.empty_like(x).uniform_(low, high, generator=generator), also from a UniformStream
    (low = -high: U[-1/2, 1/2)·2·high, exact for a power-of-two high; low = 0, high = 1: U + 1/2, exact)."""
    if not isinstance(generator, UniformStream):
        return torch.empty_like(x).uniform_(low, high, generator=generator)
    u = generator.like(x)
    if (low, high) == (0.0, 1.0):
        return u.add_(0.5)
    if low != -high:
        raise ValueError(f"UniformStream draws U(-h, h) or U(0, 1), not U({low}, {high})")
    return u if high == 0.5 else u.mul_(2.0 * high)


# Adding then subtracting 1.5·2^23 rounds a float32 of magnitude < 2^22 to an integer, half to even
# (the spacing of float32 in [2^23, 2^24) is exactly 1): two cheap passes instead of nearbyint.
# Shared with the LSQ quantizer (qcard.quant.lsq).
ROUNDER = 12582912.0


def _quantize(x: torch.Tensor, wl: int, fl: int, rounding: str, generator: Generator) -> torch.Tensor:
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
            y = _uniform(x, -0.5, 0.5, generator).add_(x, alpha=scale)
        else:
            y = x * scale
        return y.clamp_(lo_i, hi_i).add_(ROUNDER).sub_(ROUNDER).mul_(1.0 / scale)
    if x.dtype == torch.float32 and -(2 ** 31) <= lo_i and hi_i <= 2 ** 31 - 1:
        # torch's fused fake-quantize op (one pass: x·2^fl, round half to even, clamp, ·2^−fl) is exact
        # here: the scale is a power of two and the bounds are integers. Stochastic rounding is done as
        # nearest rounding of x + U(−δ/2, δ/2), δ = 2^−fl, i.e. ⌊x/δ + U(0, 1)⌋ except on exact ties.
        if rounding == "stochastic":
            x = _uniform(x, -0.5 / scale, 0.5 / scale, generator).add_(x)
        return torch.fake_quantize_per_tensor_affine(x, 1.0 / scale, 0, int(lo_i), int(hi_i))
    y = x * scale
    if rounding == "stochastic":
        y.add_(_uniform(y, 0.0, 1.0, generator)).floor_()
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
                         generator: Generator = None,
                         ste: Literal["identity", "clipped"] = "identity") -> torch.Tensor:
    """x rounded onto the <wl, fl> grid (same shape and dtype). Differentiable with a straight-through
    gradient when x requires grad. `generator` seeds stochastic rounding (None: torch's global RNG; a
    UniformStream: the same numbers as its generator, drawn ahead)."""
    if ste not in ("identity", "clipped"):
        raise ValueError(f"unknown straight-through mode '{ste}'; allowed: identity, clipped")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding '{rounding}'; allowed: nearest, stochastic")
    wl, fl = int(wl), int(fl)
    if x.requires_grad and torch.is_grad_enabled():
        return FixedPointSTE.apply(x, wl, fl, rounding, generator, ste)
    return _quantize(x.detach(), wl, fl, rounding, generator)
