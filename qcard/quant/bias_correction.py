"""Bias correction (Nagel et al. 2019; white paper §4.3): remove the mean output shift ε = E[W̃x] − E[Wx]
that weight quantization causes, by b ← b − ε.

  empirical  layer by layer in topological order, x is the layer's input in the partly corrected
             quantized model (activations FP, as in the pipeline before activation ranges are set);
             ε is measured exactly, the layer's own padding and geometry included
  analytic   from the batch norm feeding the layer: E[x] = γ·φ(−β/γ) + β·(1 − Φ(−β/γ)) for a ReLU'd
             Gaussian (β for no activation), ε = (ΔW summed over the kernel)·E[x]; layers whose input
             does not come straight from a conv/linear + BN are left alone (and listed)
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence

import torch
import torch.fx as fx
from torch import nn

from .calibrate import quant_state, sim_info
from .layerwise import capture_inputs, fp_weight, layer_forward, run_by_node

__all__ = ["empirical_bias_correction", "analytic_bias_correction"]


def _ensure_bias(m: nn.Module) -> None:
    if m.bias is None:
        out = m.weight.shape[1] * m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else m.weight.shape[0]
        m.bias = nn.Parameter(torch.zeros(out, device=m.weight.device, dtype=m.weight.dtype),
                              requires_grad=m.weight.requires_grad)


def _channel_mean(y: torch.Tensor, m: nn.Module) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return y.reshape(-1, y.shape[-1]).mean(0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


@torch.no_grad()
def empirical_bias_correction(model: nn.Module, batches: Sequence[torch.Tensor], device: str = "cpu",
                              progress: bool = False) -> Dict[str, Any]:
    """On an fx graph, all layers are corrected in one node-by-node pass over the batches (each layer
    sees its input after every layer before it was corrected, as layer by layer); the eager fallback
    reruns the model up to each layer."""
    info = sim_info(model)
    layers = [li for li in info.gemm_layers() if li.weight_quantizer is not None]
    todo = {}
    for li in layers:
        todo.setdefault(id(li.module), li)
    corrected: List[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="bias correction", leave=False)

    def correct(m: nn.Module, xs: Iterable[torch.Tensor]) -> None:
        li = todo.pop(id(m), None)
        if li is None:
            return
        if _correct_layer(m, xs):
            corrected.append(li.name)
        if bar is not None:
            bar.update(1)

    with quant_state(model, activations=False):
        if isinstance(model, fx.GraphModule):
            run_by_node(model, batches, device, correct, only=[li.module for li in todo.values()])
        for li in list(todo.values()):     # eager models (and any layer the graph did not call)
            if id(li.module) in todo:
                correct(li.module, capture_inputs(model, li.module, batches, device))
    if bar is not None:
        bar.close()
    order = {li.name: i for i, li in enumerate(layers)}
    corrected.sort(key=lambda n: order.get(n, 0))
    info.bias_correction = "empirical"
    return {"corrected_layers": corrected}


def _correct_layer(m: nn.Module, xs: Iterable[torch.Tensor]) -> bool:
    """b <- b - mean over xs of (W_q - W) x, per output channel; False when there is no input."""
    w_fp = fp_weight(m)
    dw = m.quantized_weight().detach() - w_fp
    if m.bias is not None:
        bias, m.bias = m.bias, None
    else:
        bias = None
    try:
        total, n = None, 0
        for x in xs:
            eps = _channel_mean(layer_forward(m, x, dw), m)
            k = x.shape[0]
            total = eps * k if total is None else total + eps * k
            n += k
    finally:
        if bias is not None:
            m.bias = bias
    if total is None:
        return False
    _ensure_bias(m)
    m.bias.sub_((total / n).to(m.bias.dtype))
    return True


def _relu_gauss_mean(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    gamma = gamma.abs().clamp(min=1e-12)
    t = -beta / gamma
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return gamma * pdf + beta * (1 - cdf)


@torch.no_grad()
def analytic_bias_correction(model: nn.Module) -> Dict[str, Any]:
    info = sim_info(model)
    corrected: List[str] = []
    skipped: List[str] = []
    seen = set()
    for li in info.gemm_layers():
        m = li.module
        if li.weight_quantizer is None or id(m) in seen:
            continue
        seen.add(id(m))
        src = info.input_producers.get(li.name)
        bn = getattr(src[0], "qcard_bn", None) if src else None
        if bn is None or isinstance(m, nn.modules.conv._ConvTransposeNd):
            skipped.append(li.name)
            continue
        act = src[1]
        beta, gamma = bn["beta"], bn["gamma"]
        ex = _relu_gauss_mean(beta, gamma) if act in ("relu", "relu6") else beta
        dw = (m.quantized_weight().detach() - fp_weight(m)).float()
        ex = ex.to(dw.device)
        if isinstance(m, nn.Linear):
            if dw.shape[1] != ex.numel():
                skipped.append(li.name)
                continue
            eps = dw @ ex
        else:
            per_in = dw.sum(dim=tuple(range(2, dw.dim())))        # (out, in/groups)
            g = m.groups
            if g == 1:
                eps = per_in @ ex
            else:
                cin = per_in.shape[1]
                ex_g = ex.reshape(g, cin)
                eps = (per_in.reshape(g, -1, cin) * ex_g.unsqueeze(1)).sum(-1).reshape(-1)
        _ensure_bias(m)
        m.bias.sub_(eps.to(m.bias.dtype))
        corrected.append(li.name)
    info.bias_correction = "analytic"
    return {"corrected_layers": corrected, "skipped_layers": skipped}
