"""Helpers for layer-by-layer algorithms: capture a layer's inputs, run a layer with a given weight."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import group_rows

__all__ = ["capture_inputs", "layer_forward", "weight_rows", "fp_weight"]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor], device: str = "cpu",
                   stop_early: bool = True) -> List[torch.Tensor]:
    """The (unquantized) input of `layer` for every batch, running the model only up to that layer."""
    out: List[torch.Tensor] = []

    def hook(module, args):
        out.append(args[0].detach())
        if stop_early:
            raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    return out


def layer_forward(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """m's own computation on x with weight w (bias and geometry from m; no quantizers)."""
    if isinstance(m, nn.Linear):
        return F.linear(x, w, m.bias)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.dim() - 2]
        return fn(x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    if isinstance(m, nn.modules.conv._ConvNd):
        return m._conv_forward(x, w, m.bias)
    raise TypeError(f"not a conv/linear layer: {type(m).__name__}")


def fp_weight(m: nn.Module) -> torch.Tensor:
    """The layer's FP weight before AdaRound replaced it with its rounded version (if it did)."""
    w = m.__dict__.get("qcard_fp_weight")
    return w if w is not None else m.weight.detach()


def weight_rows(w: torch.Tensor, wq):
    """(rows, scale, zero_point, back): w viewed as rows that each own one (scale, zero point) of
    the quantizer wq (one row per tensor, channel or group), and the map from rows back to w's shape."""
    spec = wq.spec
    if spec.granularity == "per_tensor":
        rows = w.reshape(1, -1)

        def back(r):
            return r.reshape(w.shape)
    elif spec.granularity == "per_channel":
        axis = wq.channel_axis
        moved = w.movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        mshape = moved.shape

        def back(r):
            return r.reshape(mshape).movedim(0, axis)
    else:
        rows, back = group_rows(w, wq.channel_axis, spec.group_size)
    return rows, wq.scale.reshape(-1, 1), wq.zero_point.round().reshape(-1, 1), back
