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
           "weight_channel_axis", "SplitMultiheadAttention", "split_attention_reason"]


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


def _linear_sharing(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A plain nn.Linear computing with these parameters (shared when they are nn.Parameters)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    return lin


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention computed as timm's attention is: nn.Linear projections, q·kᵀ, softmax, ·v,
    so torch.fx sees (and the builder quantizes) the projections and both attention matmuls. Same
    parameters (`in_proj` holds the packed q/k/v weight, as `in_proj_weight` did), same outputs to float
    tolerance. Supports what nn.MultiheadAttention does without masks, bias_k/bias_v or add_zero_attn
    (the fx builder checks the calls before it swaps; see split_attention_reason)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        self.scale = float(self.head_dim) ** -0.5
        if mha._qkv_same_embed_dim:
            self.in_proj = _linear_sharing(mha.in_proj_weight, mha.in_proj_bias)
        else:
            b = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
            self.q_proj = _linear_sharing(mha.q_proj_weight, b[0])
            self.k_proj = _linear_sharing(mha.k_proj_weight, b[1])
            self.v_proj = _linear_sharing(mha.v_proj_weight, b[2])
        self.out_proj = _linear_sharing(mha.out_proj.weight, mha.out_proj.bias)
        self.attn_drop = nn.Dropout(mha.dropout)

    def _project(self, query, key, value):
        if not hasattr(self, "in_proj"):
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:             # self-attention: one packed projection
            return self.in_proj(query).chunk(3, dim=-1)
        return (self.in_proj(query).chunk(3, dim=-1)[0], self.in_proj(key).chunk(3, dim=-1)[1],
                self.in_proj(value).chunk(3, dim=-1)[2])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        q, k, v = self._project(query, key, value)
        if not self.batch_first:                      # (L, N, E) -> (N, L, E)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)   # (N, heads, L, head_dim)
        k = k.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        # scaled after the matmul (as the fused kernel does): q, k and v then reach a matmul straight from
        # the projection, whose output is quantized once, as for timm's attention
        attn = (torch.matmul(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = self.out_proj(torch.matmul(attn, v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights


def split_attention_reason(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[str]:
    """Why a call of `mha` cannot run as SplitMultiheadAttention (None: it can)."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    a = dict(zip(names, args))
    a.update(kwargs)
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        return "it has bias_k/bias_v or add_zero_attn"
    if a.get("key_padding_mask") is not None or a.get("attn_mask") is not None or a.get("is_causal"):
        return "it is called with an attention or padding mask"
    if any(not isinstance(a.get(k), torch.Tensor) or a[k].dim() != 3 for k in ("query", "key", "value")):
        return "it is called on unbatched (2-D) inputs"
    return None
