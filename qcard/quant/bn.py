"""Batch-norm folding: W̃ = γ·W/√(σ² + ε), b̃ = β + γ·(b − μ)/√(σ² + ε)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .modules import weight_channel_axis

__all__ = ["fold_bn", "can_fold", "bn_affine"]


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(β, γ) of a batch norm: the mean and standard deviation of its output per channel."""
    c = bn.num_features
    dev = bn.running_mean.device if bn.running_mean is not None else None
    gamma = bn.weight.detach().clone() if bn.weight is not None else torch.ones(c, device=dev)
    beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(c, device=dev)
    return beta.float(), gamma.float()


def can_fold(layer: nn.Module, bn: nn.Module) -> Optional[str]:
    """None when bn can be folded into layer, else the reason it cannot."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return f"{type(bn).__name__} is not a batch norm"
    if bn.running_mean is None or bn.running_var is None:
        return "batch norm without running statistics (track_running_stats=False)"
    axis = weight_channel_axis(layer)
    if axis == 1 and getattr(layer, "groups", 1) != 1:
        return "grouped transposed convolution"
    out_ch = layer.weight.shape[axis] * (getattr(layer, "groups", 1) if axis == 1 else 1)
    if out_ch != bn.num_features:
        return f"channel mismatch ({out_ch} outputs vs {bn.num_features} batch-norm channels)"
    return None


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold bn (eval statistics) into layer's weight and bias, in place."""
    reason = can_fold(layer, bn)
    if reason:
        raise ValueError(f"cannot fold batch norm: {reason}")
    w = layer.weight
    axis = weight_channel_axis(layer)
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    beta, gamma = bn_affine(bn)
    factor = gamma / std
    shape = [1] * w.dim()
    shape[axis] = -1
    w.mul_(factor.reshape(shape).to(w.dtype))
    b = layer.bias.detach().float() if layer.bias is not None else torch.zeros_like(beta)
    new_b = beta + (b - bn.running_mean.float()) * factor
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b)
