"""Biases on the integer runtime's grid: int32 at s_in·s_w.

An integer kernel (onnxruntime's QLinearConv/QGemm, TFLite, TensorRT) adds the bias to the int32
accumulator, so it rounds the float bias to a multiple of the accumulator step s_in·s_w (per output
channel for per-channel weights). That rounding is at most half an accumulator step per value, but on a
trained network it flips a fraction of a percent of each layer's output codes by one step (mobilenet_v2
at W8A8 per-channel: 0.01-0.6 % per convolution), and the flips grow through the layers (30 % of the codes
one to three steps apart ten convolutions later, 97.3 % identical argmax). The simulation therefore uses
the bias the runtime uses: `round_biases(model)` puts every quantized conv/linear bias on its grid, once
the scales are final (after the method), so the card's model and the exported graph hold the same bias.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["round_biases", "saturation_warnings", "INT32_MIN", "INT32_MAX"]

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


def _grid_step(layer) -> Optional[torch.Tensor]:
    """s_in·s_w per output channel (float32, as the runtime multiplies them), or None when the layer's
    input or weight is not on one fixed grid (nothing to round to)."""
    m, wq = layer.module, layer.weight_quantizer
    qin = layer.input_quantizers[0] if layer.input_quantizers else None
    if m is None or getattr(m, "bias", None) is None or wq is None or qin is None:
        return None
    if not (wq.enabled and qin.enabled) or getattr(qin, "dynamic", False) or qin.scale.numel() != 1:
        return None
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or wq.axis not in (None, 0):
        return None               # the output channel is not the weight scale's axis
    s_w = wq.scale.detach().float().reshape(-1)
    if s_w.numel() not in (1, m.bias.numel()):
        return None               # per-group scales: no single accumulator step per channel
    return (qin.scale.detach().float().reshape(()) * s_w).expand(m.bias.numel())


def round_biases(model: nn.Module) -> Dict[str, int]:
    """Round, in place, the bias of every conv/linear of a qcard.quant simulated model whose input and weight
    are quantized to a multiple of its accumulator step s_in·s_w, saturating at int32 as the runtime does.
    A channel whose quantized weights are all zero keeps its float bias: its weight scale is arbitrary (the
    exporter gives it one at which the bias fits int32). Returns {"layers": rounded, "saturated": channels}."""
    sim = getattr(model, "qcard_sim", None)
    out = {"layers": 0, "saturated": 0}
    if sim is None:
        return out
    with torch.no_grad():
        for layer in sim.gemm_layers():
            step = _grid_step(layer)
            if step is None:
                continue
            m = layer.module
            b = m.bias
            step = step.to(b.device)
            live = m.quantized_weight().detach().reshape(b.numel(), -1).ne(0).any(1)
            q = torch.round(b.detach().float() / step)
            out["saturated"] += int(((q < INT32_MIN) | (q > INT32_MAX))[live].sum())
            rounded = (q.clamp(INT32_MIN, INT32_MAX) * step).to(b.dtype)
            b.copy_(torch.where(live, rounded, b.detach()))
            out["layers"] += 1
    return out


def saturation_warnings(counts: Dict[str, int]) -> list:
    """The card's warning when round_biases saturated a bias (the runtime loses the same part of it)."""
    if not counts.get("saturated"):
        return []
    return [f"{counts['saturated']} output channel(s) have a bias beyond int32 at s_in·s_w (the accumulator step): "
            "saturated in the simulation as on an integer runtime, so that part of the bias is lost"]
