"""Setting the ranges of a simulated model: weights from the weights, activations from data."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

from .ranges import BNObserver, tensor_range
from .sim import SimInfo

__all__ = ["sim_info", "set_weight_ranges", "calibrate_activations", "quant_state", "run_batches"]


def sim_info(model: nn.Module) -> SimInfo:
    info = getattr(model, "qcard_sim", None)
    if not isinstance(info, SimInfo):
        raise ValueError("this model was not built by qcard.quant (no qcard_sim attribute)")
    return info


@torch.no_grad()
def set_weight_ranges(model: nn.Module, method: Optional[str] = None, percentile: float = 99.99) -> None:
    """Set every weight quantizer's range from its layer's current weight (min-max, MSE or percentile)."""
    info = sim_info(model)
    seen = set()
    for li in info.gemm_layers():
        wq = li.weight_quantizer
        if wq is None or id(wq) in seen:
            continue
        seen.add(id(wq))
        m = method or wq.range_setting or "minmax"
        lo, hi = tensor_range(li.module.weight.detach().float(), wq.spec, m, axis=wq.channel_axis,
                              percentile=percentile)
        wq.set_range(lo, hi)
        wq.range_setting = m


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu", progress: bool = False,
                desc: str = "calibrate") -> int:
    n = 0
    bar = None
    if progress:      # counted in images: the bar shows images/s and, for a list of batches, an ETA
        from tqdm.auto import tqdm
        total = sum(int(x.shape[0]) for x in batches) if isinstance(batches, (list, tuple)) else None
        bar = tqdm(total=total, desc=desc, leave=False, unit="img", unit_scale=True)
    for x in batches:
        model(x.to(device))
        n += int(x.shape[0])
        if bar is not None:
            bar.update(int(x.shape[0]))
    if bar is not None:
        bar.close()
    return n


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu",
                          progress: bool = False) -> int:
    """Observe every activation quantizer on the batches (values pass through unquantized, weights
    quantized as set), then fix (scale, zero point). Data-free BN ranges read the batch norms' (β, γ)
    as they are now (after CLE / bias absorption). Returns the number of samples seen."""
    info = sim_info(model)
    qs = [q for q in info.act_quantizers.values() if not q.dynamic]
    for q in qs:
        if q.observer is not None:
            q.observer.reset()
            q.observing = True
    n = 0
    try:
        needs_data = any(q.observer is not None and q.observer.needs_data for q in qs)
        if needs_data or any(isinstance(q.observer, BNObserver) for q in qs):
            n = run_batches(model, batches, device, progress)
    finally:
        for q in qs:
            q.observing = False
    for q in qs:
        if q.observer is None:
            continue
        if isinstance(q.observer, BNObserver):
            src = info.bn_sources.get(q.qname)
            bn = getattr(src[0], "qcard_bn", None) if src else None
            if bn is not None:
                q.observer.set_bn(bn["beta"], bn["gamma"], src[1])
        q.calibrate()
        if q.observer.fallback_reason:
            q.range_setting = f"{q.observer.name}->minmax"
    return n


@contextlib.contextmanager
def quant_state(model: nn.Module, weights: Optional[bool] = None, activations: Optional[bool] = None):
    """Temporarily switch weight and/or activation quantization on or off (None: leave as is)."""
    info = sim_info(model)
    saved = []
    if weights is not None:
        for q in info.weight_quantizers():
            saved.append((q, q.enabled))
            q.enabled = weights
    if activations is not None:
        for q in info.act_quantizers.values():
            saved.append((q, q.enabled))
            q.enabled = activations
    try:
        yield model
    finally:
        for q, e in reversed(saved):
            q.enabled = e
