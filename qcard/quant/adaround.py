"""AdaRound (Nagel et al. 2020): learn, layer by layer, whether each weight rounds up or down.

For each conv/linear in topological order: W̃(V) = s·(clamp(⌊W/s⌋ + h(V) + z, q_min, q_max) − z), with
h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, minimising
    ‖f(W x) − f(W̃ x̂)‖² + λ·Σ(1 − |2h(V) − 1|^β)
where x is the layer's input in the FP model, x̂ its input in the quantized model built so far
(upstream layers already rounded, activations FP), f the fused activation; β anneals from 20 to 2
after a warm start (20% of the iterations, without the regulariser); Adam, lr 1e-3; λ = 0.01.
Defaults follow AIMET (10k iterations, 15k below 8 bits). The rounded weight is written into the layer
(on the quantizer's grid, so the frozen quantizer reproduces it exactly); the FP weight is kept in
`layer.qcard_fp_weight`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import quant_state, sim_info
from .layerwise import capture_inputs, layer_forward, weight_rows

__all__ = ["adaround"]

ZETA, GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _act(name: Optional[str]):
    if name == "relu":
        return torch.relu
    if name == "relu6":
        return F.relu6
    return lambda y: y


def adaround(model: nn.Module, batches: Sequence[torch.Tensor], iters: int = 10000, reg: float = 0.01,
             beta_start: float = 20.0, beta_end: float = 2.0, warm_start: float = 0.2, batch_size: int = 32,
             lr: float = 1e-3, device: str = "cpu", seed: int = 0, progress: bool = False) -> Dict[str, Any]:
    info = sim_info(model)
    layers = [li for li in info.gemm_layers() if li.weight_quantizer is not None]
    gen = torch.Generator().manual_seed(seed)
    stats: Dict[str, Any] = {"iterations": iters, "layers": []}
    seen = set()
    it = layers
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(layers, desc="adaround", leave=False)
    for li in it:
        m = li.module
        if id(m) in seen:
            continue
        seen.add(id(m))
        with quant_state(model, weights=False, activations=False):
            x_fp = torch.cat(capture_inputs(model, m, batches, device))
        with quant_state(model, activations=False):
            x_q = torch.cat(capture_inputs(model, m, batches, device))
        act = None if (li.bn == "kept") else _act(m.qcard_act)
        if act is None:
            act = _act(None)
        rec = _round_layer(m, li.weight_quantizer, x_fp, x_q, act, iters, reg, beta_start, beta_end, warm_start,
                           batch_size, lr, gen)
        li.weight_quantizer.rounding_label = "adaround"
        stats["layers"].append({"name": li.name, **rec})
    return stats


def _round_layer(m, wq, x_fp, x_q, act, iters, reg, beta_start, beta_end, warm_start, batch_size, lr, gen):
    w = m.weight.detach().clone()
    if "qcard_fp_weight" not in m.__dict__:
        m.__dict__["qcard_fp_weight"] = w.clone()
    rows, s, z, back = weight_rows(w, wq)
    qmin, qmax = wq.qmin, wq.qmax
    inv = 1.0 / s
    w_floor = torch.floor(rows * inv)
    rest = (rows * inv - w_floor).clamp(0.0, 1.0)
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1).clamp(-30, 30)
    v = v.detach().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        target = act(layer_forward(m, x_fp, w))
    n = x_q.shape[0]
    bs = min(batch_size, n)
    warm = int(warm_start * iters)

    def soft_w(h):
        return back(s * (torch.clamp(w_floor + h + z, qmin, qmax) - z))

    def nearest_err():
        with torch.no_grad():
            wn = back(s * (torch.clamp(torch.round(rows * inv) + z, qmin, qmax) - z))
            return float((act(layer_forward(m, x_q, wn)) - target).pow(2).flatten(1).sum(1).mean())

    err_nearest = nearest_err()
    bias_req = m.bias.requires_grad if m.bias is not None else None
    if m.bias is not None:
        m.bias.requires_grad_(False)
    try:
        for i in range(iters):
            idx = torch.randint(0, n, (bs,), generator=gen)
            h = _h(v)
            out = act(layer_forward(m, x_q[idx], soft_w(h)))
            loss = (out - target[idx]).pow(2).flatten(1).sum(1).mean()
            if i >= warm and reg > 0:
                t = (i - warm) / max(1, iters - warm)
                beta = beta_end + (beta_start - beta_end) * max(0.0, 1.0 - t)
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        if m.bias is not None:
            m.bias.requires_grad_(bias_req)
    with torch.no_grad():
        hard = (v >= 0).to(rows.dtype)
        w_new = soft_w(hard)
        m.weight.copy_(w_new)
        err = float((act(layer_forward(m, x_q, w_new)) - target).pow(2).flatten(1).sum(1).mean())
        flipped = float(((w_floor + hard) != torch.round(rows * inv)).float().mean())
    return {"output_mse_nearest": err_nearest, "output_mse_adaround": err, "changed_vs_nearest": flipped}
