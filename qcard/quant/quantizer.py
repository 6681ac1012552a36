"""Uniform affine fake quantization: x̂ = s·(clamp(⌊x/s⌉ + z, q_min, q_max) − z).

Arithmetic follows torch.fake_quantize_per_tensor_affine / _per_channel_affine exactly (float32
x·(1/s), round half to even, integer zero point, clamp, then (q − z)·s), so results are equal to
theirs wherever the two overlap (tests/test_quant_quantizer.py checks this bit for bit).

Three paths, one result:
  - training (input needs a gradient): torch's fused op, whose backward is the straight-through
    estimator (∂x̂/∂x = 1 where ⌊x/s⌉ + z lies in [q_min, q_max], else 0);
  - scale or zero point that require a gradient (LSQ-style QAT): the same formula written with a
    straight-through round, giving ∂x̂/∂s = ⌊x/s⌉ − x/s inside the range and q_min − z or q_max − z
    when clipped; z is a real number rounded in the forward pass;
  - inference (no gradient): clamp(x·(1/s), q_min − z, q_max − z), round, ·s — four lean in-place
    passes (clamping before rounding is identical because the bounds are integers).
Scale and zero point are always tensors so a QAT method can turn them into Parameters.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .qspec import QSpec

__all__ = ["QSpec", "compute_qparams", "fake_quantize", "FakeQuantize", "round_ste", "pow2_scale", "broadcast_shape",
           "group_rows"]

_EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# quantization parameters from a range

def pow2_scale(scale: torch.Tensor) -> torch.Tensor:
    """Nearest power of two in the log domain (2^round(log2 s)), as backends with shift-only
    requantization (TVM's ARM path, MQBench's 'pot' option) store it."""
    return torch.pow(2.0, torch.round(torch.log2(scale)))


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) float32 tensors covering [min_val, max_val] (shapes () or (C,)).

    The range is first widened to contain 0 so that zero is exactly representable.
    Symmetric signed:   s = max|x| / ((q_max − q_min)/2), z = 0   (torch.ao's convention).
    Symmetric unsigned: s = max(x) / (q_max − q_min), z = 0       (for non-negative tensors).
    Asymmetric:         s = (max − min)/(q_max − q_min), z = q_min − ⌊min/s⌉ clamped to the grid.
    Power-of-two scales are rounded in the log domain; z is recomputed from the rounded scale.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    zero = torch.zeros_like(min_val)
    min_neg = torch.minimum(min_val, zero)
    max_pos = torch.maximum(max_val, zero)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        if spec.signed:
            scale = torch.maximum(-min_neg, max_pos) / ((qmax - qmin) / 2)
        else:
            scale = max_pos / float(qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        if spec.scale_format == "power_of_two":
            scale = pow2_scale(scale)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=_EPS)
        if spec.scale_format == "power_of_two":
            scale = pow2_scale(scale)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale.float(), zero_point.float()


# ---------------------------------------------------------------------------------------------
# the fake-quantization function

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def broadcast_shape(x: torch.Tensor, axis: int) -> Tuple[int, ...]:
    """The shape that broadcasts a per-index-of-`axis` vector against x: (1, …, −1, …, 1)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return tuple(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: Optional[int] = None, rounding: str = "nearest",
                  generator: Optional[torch.Generator] = None, inplace: bool = False) -> torch.Tensor:
    """Fake-quantize x with one (scale, zero_point) per tensor (axis None) or per index of `axis`.

    `inplace=True` lets the inference path overwrite x (only when nothing else reads x)."""
    if axis is not None and axis < 0:
        axis += x.dim()
    learnable = scale.requires_grad or zero_point.requires_grad
    if learnable or rounding == "stochastic":
        return _fq_formula(x, scale, zero_point, qmin, qmax, axis, rounding, generator)
    if rounding != "nearest":
        raise ValueError(f"unknown rounding '{rounding}'; allowed: nearest, stochastic")
    if x.requires_grad and torch.is_grad_enabled():
        # torch's fused op: identical forward, straight-through backward with its exact mask
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(
                x, scale.reshape(()).float(), zero_point.reshape(()).round().int(), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), zero_point.round().int(), axis, qmin, qmax)
    return _fq_inference(x, scale, zero_point, qmin, qmax, axis, inplace)


def _fq_inference(x, scale, zero_point, qmin, qmax, axis, inplace):
    if axis is None:
        z = float(zero_point)
        inv = 1.0 / scale.reshape(())          # float32 1/s, as torch's kernel computes it
        y = x.mul_(inv) if inplace else torch.mul(x, inv)
        y.clamp_(qmin - z, qmax - z).round_()
        return y.mul_(scale.reshape(()))
    shape = broadcast_shape(x, axis)
    s = scale.reshape(shape)
    z = zero_point.round().reshape(shape)
    y = x.mul_(1.0 / s) if inplace else torch.mul(x, 1.0 / s)
    y = torch.clamp(y, qmin - z, qmax - z, out=y).round_()
    return y.mul_(s)


def _fq_formula(x, scale, zero_point, qmin, qmax, axis, rounding, generator):
    if axis is not None:
        shape = broadcast_shape(x, axis)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    z = round_ste(zero_point)
    v = x * (1.0 / scale)
    if rounding == "stochastic":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = v + (torch.floor(v + noise) - v).detach()
    else:
        r = round_ste(v)
    q = r + z
    # clipped values are constants (gradient 0 for x, q_min/q_max − z for s); the boundary itself is
    # inside, as in torch's mask (torch.clamp's own backward drops it)
    inside = (q >= qmin) & (q <= qmax)
    q = torch.where(inside, q, q.detach().clamp(qmin, qmax))
    return (q - z) * scale


# ---------------------------------------------------------------------------------------------
# the module

class FakeQuantize(nn.Module):
    """A quantizer in the simulated graph: holds (scale, zero_point) tensors for one QSpec.

    States:
      observing  calibration: the observer sees the (FP) input, which passes through unchanged;
      enabled    fake quantization on (after calibration, or always when dynamic);
      dynamic    the range is recomputed from every input (per sample), no calibration needed.
    `pre_act` ('relu' | 'relu6' | None) is an activation the quantizer applies first: it lets the
    simulated graph drop a separate ReLU pass when the grid makes it redundant (z = q_min).
    `channel_axis` is the tensor axis of per-channel scales (weights: output channels).
    `estimator` is the rounding/gradient part: None for the plain grid (torch's straight-through
    estimator), or a learnable one QAT sets and removes (quant.lsq: LSQ, PACT); the range/scale part
    (spec, observer, scale, zero_point) stays the same object throughout.
    """

    def __init__(self, spec: QSpec, observer=None, *, channel_axis: Optional[int] = None,
                 dynamic: bool = False, name: str = ""):
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.channel_axis = spec.axis if channel_axis is None else channel_axis
        self.dynamic = dynamic
        self.qname = name
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = True
        self.observing = False
        self.calibrated = False
        self.pre_act: Optional[str] = None
        self.auto_sign = False         # symmetric grid: choose unsigned at calibration if data >= 0
        self.inplace = False           # set by the graph builder when nothing else reads the input
        self.range_setting = getattr(observer, "name", None) if not dynamic else "dynamic_minmax"
        self.rounding_label = spec.rounding   # "adaround" once AdaRound has chosen the roundings
        self.prescaled_input = False   # the producing conv/linear folds 1/s into its weights (no-grad eval)
        self._vbase = 0                # bumps whenever scale/zero_point change (see `version`)
        self._fast = None              # (z float, absorbable pre_act) cache for the per-tensor path
        self.estimator = None          # the rounding/gradient part (None: plain)

    # -- properties --------------------------------------------------------------------------
    @property
    def version(self):
        """Changes whenever the grid changes (weight caches key on it): with a learnable estimator it
        includes the parameters' in-place version counters, so optimizer steps invalidate caches too."""
        if self.estimator is None:
            return self._vbase
        return (self._vbase,) + self.estimator.versions(self)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    @property
    def axis(self) -> Optional[int]:
        return None if self.spec.granularity == "per_tensor" else self.channel_axis

    def extra_repr(self) -> str:
        state = "dynamic" if self.dynamic else ("calibrated" if self.calibrated else "uncalibrated")
        act = f", pre_act={self.pre_act}" if self.pre_act else ""
        return f"{self.spec.describe()}, {state}, enabled={self.enabled}{act}"

    # -- parameters --------------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        dev = self.scale.device
        scale = scale.detach().to(dev, torch.float32)
        zero_point = zero_point.detach().to(dev, torch.float32)
        if isinstance(self.scale, nn.Parameter):   # learnable (QAT): keep the Parameter objects
            with torch.no_grad():
                self.scale.data = scale.reshape(self.scale.shape).clone()
                self.zero_point.data = zero_point.reshape(self.zero_point.shape).clone()
        else:
            self.scale = scale.clone()
            self.zero_point = zero_point.clone()
        self.calibrated = True
        self._vbase += 1
        self._fast = None

    def drop_caches(self) -> None:
        """Forget cached decisions about the grid (after the grid's tensors were replaced)."""
        self._fast = None

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        self.set_qparams(*compute_qparams(min_val, max_val, self.spec))

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The representable [min, max] of the current grid."""
        z = self.zero_point.round()
        return (self.qmin - z) * self.scale, (self.qmax - z) * self.scale

    def calibrate(self) -> None:
        """Set (scale, zero_point) from the observer's statistics and stop observing."""
        if self.observer is None:
            raise RuntimeError(f"quantizer '{self.qname}' has no observer to calibrate from")
        if self.auto_sign:
            seen = getattr(self.observer, "min_val", None)
            lo = seen if seen is not None and self.observer.needs_data else self.observer.compute_range(self)[0]
            signed = bool(float(lo.min()) < 0)
            if signed != self.spec.signed:
                self.spec = self.spec.model_copy(update={"signed": signed})
        self.set_range(*self.observer.compute_range(self))
        self.observing = False

    # -- forward -----------------------------------------------------------------------------
    def _apply_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_act == "relu":
            return torch.relu(x)
        if self.pre_act == "relu6":
            return torch.nn.functional.relu6(x)
        return x

    def _pre_act_absorbed(self) -> bool:
        """True when the grid itself clips at 0 (and at 6 for ReLU6), making the activation a no-op.
        Never with a learnable estimator: the grid moves during training."""
        if self.estimator is not None:
            return False
        if self._fast is None:
            absorbed = False
            if self.pre_act and self.axis is None and not self.dynamic:
                z = float(self.zero_point.round())
                lo = (self.qmin - z) * float(self.scale)
                hi = (self.qmax - z) * float(self.scale)
                absorbed = lo == 0.0 and (self.pre_act == "relu" or hi <= 6.0)
            self._fast = absorbed
        return self._fast

    def prescale_active(self) -> bool:
        """Whether the producing layer multiplies by 1/s itself in this call (inference only): then
        this quantizer only clamps, rounds and scales, saving one pass over the activation."""
        if not (self.prescaled_input and self.enabled and self.calibrated) or self.observing or self.dynamic:
            return False
        if self.estimator is not None:     # the producing layer never pre-divides by a learnable scale
            return False
        if torch.is_grad_enabled() or self.axis is not None or self.spec.rounding != "nearest":
            return False
        return self.pre_act in (None, "relu") or self._pre_act_absorbed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prescaled_input and self.prescale_active():
            if self.pre_act == "relu" and not self._pre_act_absorbed():
                x = torch.relu(x)                    # relu(v/s) = relu(v)/s, s > 0
            z = float(self.zero_point.round())
            return x.clamp_(self.qmin - z, self.qmax - z).round_().mul_(self.scale.reshape(()))
        if self.estimator is not None and self.enabled and not (self.observing or self.dynamic):
            return self.estimator.forward(self, x)
        if self.observing:
            x = self._apply_pre_act(x)
            if self.observer is not None:
                self.observer.update(x.detach())
            return x
        if not self.enabled:
            return self._apply_pre_act(x)
        training_grad = torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)
        inplace = self.inplace and not training_grad
        if self.pre_act and (training_grad or not self.calibrated or not self._pre_act_absorbed()):
            x = self._apply_pre_act(x)
            inplace = not training_grad      # the activation made a fresh tensor
        if self.dynamic:
            return self._dynamic(x)
        if not self.calibrated:
            raise RuntimeError(f"quantizer '{self.qname}' is used before its range was set "
                               "(calibrate it, or mark it dynamic)")
        if self.spec.granularity == "per_group":
            return self._per_group(x)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis,
                             self.spec.rounding, inplace=inplace)

    def eager_pre_hook(self, module: nn.Module, args):
        """Forward pre-hook that quantizes a module's first input (eager-mode placement)."""
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (self(args[0]),) + tuple(args[1:])

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        # one range per sample (dim 0), so results do not depend on the evaluation batch size
        flat = x.detach().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().reshape(1, -1)
        scale, zp = compute_qparams(flat.amin(1), flat.amax(1), self.spec)
        if x.dim() <= 1:
            return fake_quantize(x, scale.reshape(()), zp.reshape(()), self.qmin, self.qmax, None, self.spec.rounding)
        return fake_quantize(x, scale, zp, self.qmin, self.qmax, 0, self.spec.rounding)

    def _per_group(self, x: torch.Tensor) -> torch.Tensor:
        rows, shape_back = group_rows(x, self.channel_axis, self.spec.group_size)
        out = fake_quantize(rows, self.scale.reshape(-1), self.zero_point.reshape(-1), self.qmin, self.qmax, 0,
                            self.spec.rounding)
        return shape_back(out)


def group_rows(x: torch.Tensor, axis: int, group_size: int):
    """View x as (channels·groups, group_size) rows (zero-padding a short last group) and return
    (rows, fn) where fn maps rows of the same layout back to x's shape."""
    moved = x.movedim(axis, 0)
    c = moved.shape[0]
    flat = moved.reshape(c, -1)
    n = flat.shape[1]
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    rows = flat.reshape(c * groups, group_size)
    moved_shape = moved.shape

    def back(r: torch.Tensor) -> torch.Tensor:
        out = r.reshape(c, groups * group_size)[:, :n].reshape(moved_shape)
        return out.movedim(0, axis)
    return rows, back
