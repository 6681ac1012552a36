"""The SPARQ layers: nn.Conv2d / nn.Linear twins that observe, then run the integer simulation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import SparqKernel
from .observers import Observer, PlainStats
from .params import WINDOW_VARIANTS

class SparqLayerMixin:
    """Shared by SparqConv2d and SparqLinear. State "fp32": the float layer; "observe": the float
    layer plus range statistics of its input; "quant": the integer simulation
    (codes_x (*) codes_w in float32, rescaled by dx*dw[c], plus the float bias)."""

    def _sparq_setup(self, name: str, channel_dim: int, percentile: Optional[float]) -> None:
        self.sparq_name = name
        self.sparq_state = "fp32"
        self.sparq_role: Optional[str] = None    # sparq | bsparq | vsparq | a4 | u8 | s8
        self.channel_dim = channel_dim
        self.observer = Observer(percentile)
        self.kernel: Optional[SparqKernel] = None
        self.plain_bits = 8
        self.dx = 1.0
        self.dw: Optional[torch.Tensor] = None
        self.plain_stats: Optional[PlainStats] = None
        self.collect_stats = False

    # -- conversion ------------------------------------------------------------------------
    @torch.no_grad()
    def sparq_convert(self, role: str, dx: float, weight_divisor: float, kernel: Optional[SparqKernel] = None,
                      plain_bits: int = 8) -> None:
        """role: sparq | bsparq | vsparq (kernel given) | plain (plain_bits-bit grid) | u8 | s8."""
        self.sparq_role, self.dx, self.kernel, self.plain_bits = role, float(dx), kernel, int(plain_bits)
        w = self.weight.detach().double()       # float64 once: w = -max|w| gives exactly -127.5 -> -128
        wmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
        dw = torch.where(wmax > 0, wmax / weight_divisor, torch.ones_like(wmax))
        shape = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.round(w / dw.view(shape)).clamp_(-128, 127)
        self.dw = dw
        self.register_buffer("w_codes", codes.to(self.weight.dtype), persistent=False)
        scale = (dw * self.dx).to(self.weight.dtype)
        self.register_buffer("out_scale", scale.view(1, -1, 1, 1) if isinstance(self, nn.Conv2d) else scale,
                             persistent=False)

    # -- the quantized input ---------------------------------------------------------------
    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's activation codes (integer-valued floats, in units of dx) for input x."""
        role, dx = self.sparq_role, self.dx
        if role in WINDOW_VARIANTS:
            out = self.kernel.float_codes(x, dx)
        elif role == "plain":                   # plain n-bit: the grid 2^(8-n)*dx, codes 0..2^n-1
            step = float(1 << (8 - self.plain_bits))
            out = torch.div(x, step * dx).round_().clamp_(0, (1 << self.plain_bits) - 1).mul_(step)
        elif role == "u8":
            out = torch.div(x, dx).round_().clamp_(0, 255)
        elif role == "s8":
            out = torch.div(x, dx).round_().clamp_(-128, 127)
        else:
            raise RuntimeError(f"layer {self.sparq_name}: not converted (role {role!r})")
        if self.collect_stats and self.plain_stats is not None:
            lo = -128 if role == "s8" else 0
            q8 = torch.div(x, dx).round_().clamp_(lo, 127 if role == "s8" else 255)
            self.plain_stats.update(q8, out, self.channel_dim)
        return out

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantized input the layer computes with: dx * input_codes(x)."""
        return self.input_codes(x).mul_(self.dx)

    def set_collect_stats(self, on: bool) -> None:
        self.collect_stats = on
        if self.kernel is not None:
            self.kernel.track_stats = on
            if on:
                self.kernel.reset_stats()
        if on and self.sparq_role not in WINDOW_VARIANTS:
            mode = {"plain": f"a{self.plain_bits}", "u8": "a8", "s8": "int8_signed"}[self.sparq_role]
            self.plain_stats = PlainStats(mode, self.plain_bits if self.sparq_role == "plain" else 8)

    def layer_stats(self) -> dict:
        st = self.kernel.stats() if self.sparq_role in WINDOW_VARIANTS else self.plain_stats.stats()
        st["dx"] = self.dx
        st["mse_real"] = st["mse"] * self.dx ** 2 if st.get("mse") is not None else None
        return st


class SparqConv2d(nn.Conv2d, SparqLayerMixin):
    def forward(self, x):
        if self.sparq_state == "quant":
            out = self._conv_forward(self.input_codes(x), self.w_codes, None).mul_(self.out_scale)
            return out if self.bias is None else out.add_(self.bias.view(1, -1, 1, 1))
        if self.sparq_state == "observe":
            self.observer.update(x)
        return super().forward(x)


class SparqLinear(nn.Linear, SparqLayerMixin):
    def forward(self, x):
        if self.sparq_state == "quant":
            out = F.linear(self.input_codes(x), self.w_codes).mul_(self.out_scale)
            return out if self.bias is None else out.add_(self.bias)
        if self.sparq_state == "observe":
            self.observer.update(x)
        return super().forward(x)


def swap_in(model: nn.Module, name: str, module: nn.Module, percentile: Optional[float]) -> SparqLayerMixin:
    """Replace model.<name> by its SPARQ twin sharing the same weight and bias Parameters."""
    if type(module) is nn.Conv2d:
        new = SparqConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, module.bias is not None,
                          module.padding_mode, device="meta")
        dim = 1
    else:
        new = SparqLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
        dim = -1
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    new._sparq_setup(name, dim, percentile)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return new

