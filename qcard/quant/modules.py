"""Conv/linear layers with a weight quantizer (and, in eager mode, an input quantizer).

Each quantized class subclasses the float layer it replaces, so module paths, isinstance checks
and the cost tracer see the same model. At evaluation time the fake-quantized weight is computed
once and cached (weights do not change in PTQ); the cache is keyed on the weight tensor's version
counter and the quantizer's parameter version, so in-place weight updates (AdaRound, bias
correction, QAT steps) are always seen. With gradients enabled nothing is cached.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import FakeQuantize

__all__ = ["QuantLayerMixin", "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d", "QConvTranspose2d",
           "QConvTranspose3d", "QLinear", "to_quant_module", "QUANT_CLASSES", "is_quant_layer",
           "weight_channel_axis"]


class QuantLayerMixin:
    weight_quantizer: Optional[FakeQuantize]
    input_quantizer: Optional[FakeQuantize]

    def _init_quant(self) -> None:
        self.weight_quantizer = None
        self.input_quantizer = None
        self._wq_cache = None
        self.qcard_bn = None          # (beta, gamma) of the batch norm folded into / kept after this layer
        self.qcard_act = None         # "relu" | "relu6" | None: the activation fused after it

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        w = self.weight
        if wq is None or not wq.enabled or wq.observing:
            return w
        if torch.is_grad_enabled() and (w.requires_grad or wq.scale.requires_grad):
            return wq(w)
        key = (w._version, w.data_ptr(), id(wq), wq.version, w.device, w.dtype)
        cache = self._wq_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, wq(w))
            self._wq_cache = cache
        return cache[1]

    def _weight_bias(self):
        """(weight, bias) to compute with: fake-quantized, and divided by the output quantizer's scale
        when that quantizer is fused with this layer (see FakeQuantize.prescale_active)."""
        fq = self.__dict__.get("out_prescale")
        if fq is None or not fq.prescale_active():
            return self.quantized_weight(), self.bias
        w = self.quantized_weight()
        b = self.bias
        key = (id(w), w._version, fq.version, None if b is None else (b._version, b.data_ptr()))
        cache = self.__dict__.get("_prescale_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                inv = 1.0 / fq.scale.reshape(())
                cache = (key, w * inv, None if b is None else b * inv, w)
            self.__dict__["_prescale_cache"] = cache
        return cache[1], cache[2]

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        return q(x) if q is not None else x

    def __getstate__(self):                 # the cache is derived data: do not copy or pickle it
        state = self.__dict__.copy()
        state["_wq_cache"] = None
        state["_prescale_cache"] = None
        return state


class QConv1d(nn.Conv1d, QuantLayerMixin):
    def forward(self, x):
        return self._conv_forward(self._quant_input(x), *self._weight_bias())


class QConv2d(nn.Conv2d, QuantLayerMixin):
    def forward(self, x):
        return self._conv_forward(self._quant_input(x), *self._weight_bias())


class QConv3d(nn.Conv3d, QuantLayerMixin):
    def forward(self, x):
        return self._conv_forward(self._quant_input(x), *self._weight_bias())


def _convt(fn):
    def forward(self, x, output_size=None):
        x = self._quant_input(x)
        nd = self.weight.dim() - 2
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              nd, self.dilation)
        return fn(x, self.quantized_weight(), self.bias, self.stride, self.padding, output_padding,
                  self.groups, self.dilation)
    return forward


class QConvTranspose1d(nn.ConvTranspose1d, QuantLayerMixin):
    forward = _convt(F.conv_transpose1d)


class QConvTranspose2d(nn.ConvTranspose2d, QuantLayerMixin):
    forward = _convt(F.conv_transpose2d)


class QConvTranspose3d(nn.ConvTranspose3d, QuantLayerMixin):
    forward = _convt(F.conv_transpose3d)


class QLinear(nn.Linear, QuantLayerMixin):
    def forward(self, x):
        return F.linear(self._quant_input(x), *self._weight_bias())


QUANT_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d,
    nn.ConvTranspose1d: QConvTranspose1d, nn.ConvTranspose2d: QConvTranspose2d,
    nn.ConvTranspose3d: QConvTranspose3d, nn.Linear: QLinear,
}
_QUANT_SET = tuple(QUANT_CLASSES.values())


def is_quant_layer(m: nn.Module) -> bool:
    return isinstance(m, _QUANT_SET)


def weight_channel_axis(m: nn.Module) -> int:
    """Axis of output channels in the weight: 1 for transposed convolutions, else 0."""
    return 1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0


def to_quant_module(m: nn.Module) -> nn.Module:
    """A quantized twin sharing m's parameters, buffers and hooks (m itself is not changed)."""
    if is_quant_layer(m):
        return m
    cls = QUANT_CLASSES[type(m)]
    q = cls.__new__(cls)
    q.__dict__.update(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in m.__dict__:
            q.__dict__[key] = copy.copy(m.__dict__[key])
    q._init_quant()
    return q
