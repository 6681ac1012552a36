"""Batch-norm folding: W̃ = γ·W/√(σ² + ε), b̃ = β + γ·(b − μ)/√(σ² + ε).

Which batch norm folds into which conv/linear is decided once (fold_reason): the batch norm must read
the layer's output directly, that output must have no other reader, and the shapes must fit
(can_fold). The fx builder applies it to graph nodes; find_bn_folds applies it to the op tracer's
data flow (eager builder, methods), and fold_batch_norms folds what it finds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops.kinds import gemm_type, is_batch_norm
from ..ops.tracer import OpTrace, trace_ops
from .modules import weight_channel_axis

__all__ = ["fold_bn", "can_fold", "bn_affine", "fold_reason", "BnFold", "find_bn_folds", "fold_batch_norms",
           "NOT_AFTER_GEMM", "SHARED_OUTPUT", "RUNS_TWICE"]

NOT_AFTER_GEMM = "batch norm not directly after a conv/linear: cannot be folded, runs in FP32"
SHARED_OUTPUT = "the conv/linear output feeding this batch norm is also used elsewhere: not folded"
RUNS_TWICE = "the conv/linear or the batch norm runs more than once: not folded"


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


def fold_reason(layer: Optional[nn.Module], bn: nn.Module, only_reader: bool) -> Optional[str]:
    """None when bn can be folded into layer, the module whose output it reads (None: not a module),
    else why not. only_reader: bn is the one reader of that output."""
    if layer is None or gemm_type(layer) is None:
        return NOT_AFTER_GEMM
    if not only_reader:
        return SHARED_OUTPUT
    return can_fold(layer, bn)


@dataclass
class BnFold:
    """A batch-norm call and the conv/linear whose output it reads (from one traced forward pass)."""
    bn: str                             # module path of the batch norm
    bn_module: nn.Module
    layer: Optional[str]                # the leaf module whose output it reads (None: a functional op/input)
    layer_module: Optional[nn.Module]
    reason: Optional[str]               # None: foldable; else why it is not (fold_reason)


def find_bn_folds(trace: OpTrace) -> List[BnFold]:
    """Every batch-norm call of a traced forward pass (qcard.ops.trace_ops), in call order, with the
    conv/linear it can be folded into, or the reason it cannot. A layer or batch norm that runs more
    than once is not folded (folding serves one call and changes the others)."""
    producer = trace.producers()
    runs: Dict[int, int] = {}
    for c in trace.calls:
        runs[id(c.module)] = runs.get(id(c.module), 0) + 1
    out = []
    for c in trace.leaf_calls():
        if not is_batch_norm(c.module):
            continue
        src = producer.get(c.inputs[0]) if c.inputs else None
        only = bool(c.inputs) and trace.uses.get(c.inputs[0], 0) == 1
        reason = fold_reason(src.module if src else None, c.module, only)
        if reason is None and (runs[id(c.module)] > 1 or runs[id(src.module)] > 1):
            reason = RUNS_TWICE
        out.append(BnFold(bn=c.path, bn_module=c.module, layer=src.path if src else None,
                          layer_module=src.module if src else None, reason=reason))
    return out


def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> Tuple[List[Tuple[str, str]], List[BnFold]]:
    """Fold every batch norm that find_bn_folds allows (one forward pass on `example`) into its
    conv/linear and replace it by nn.Identity, in place. Returns the folded (layer, batch norm)
    paths, and the batch-norm calls left as they are, each with its reason."""
    folded, kept = [], []
    for f in find_bn_folds(trace_ops(model, example)):
        if f.reason is not None:
            kept.append(f)
            continue
        fold_bn(f.layer_module, f.bn_module)
        model.set_submodule(f.bn, nn.Identity())
        folded.append((f.layer, f.bn))
    return folded, kept
