"""GPTQ (Frantar et al. 2023; OBQ, Frantar & Alistarh 2022): second-order rounding, layer by layer.

For each conv/linear in topological order, from its calibration inputs X in the network quantized so far
(im2col rows for convolutions, one Hessian per group for grouped ones):
    H = 2·X·Xᵀ / N; dead inputs (H_ii = 0) get H_ii = 1 and their weights 0; H += δ·mean(diag H)·I;
optional act-order (columns by decreasing diag H, ties at float32 precision in column order); U = upper
Cholesky factor of H⁻¹, the factorisations of H and H⁻¹ in float32 (Brevitas's and the GPTQ paper's
choice: half the time of float64, same integer weights as Brevitas; benchmarks/bench_gptq.md), the
rest in float64. X·Xᵀ is computed per batch in the inputs' precision (float32) and summed in
float64, its diagonal in float64. Columns are
quantized in blocks of B on the layer's fixed grid (the weight quantizer's scales, set by the same
weight-range step as PTQ): q_j = quant(w_j), e_j = (w_j − q_j) / U_jj, later columns of the block
w_k −= e_j·U_jk, then the block's errors go to all later columns at once. The quantized weight is written
into the layer (FP weight kept in `qcard_fp_weight`); the card gets δ, B, act-order and ‖WX − ŴX‖²
before (nearest rounding) and after, per layer.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .calibrate import quant_state, sim_info
from .layerwise import capture_inputs, run_by_node, weight_rows

__all__ = ["gptq", "gptq_rows", "layer_columns"]


def layer_columns(m: nn.Module, x: torch.Tensor) -> Optional[List[torch.Tensor]]:
    """The layer's inputs as columns matching its weight rows (in × N), one matrix per group; None for
    layers GPTQ does not handle here (transposed or non-2d convolutions)."""
    if isinstance(m, nn.Linear):
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return [x.reshape(-1, x.shape[-1]).t()]
    if isinstance(m, nn.Conv2d) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        g = m.groups
        per = cols.shape[1] // g
        cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
        return [cols[i * per:(i + 1) * per] for i in range(g)]
    return None


def _quant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return s * (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z)


def gptq_rows(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
              damp: float = 0.01, block: int = 128, act_order: bool = False,
              factor_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ on weight rows w (rows × in) with Hessian h (in × in) and per-row grid (s, z: rows × 1);
    the Cholesky factorisations of H and H⁻¹ in factor_dtype, everything else in float64."""
    w = w.clone().double()
    h = h.clone().double()
    s, z = s.double(), z.double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        # ties at float32 precision keep column order: im2col columns often tie exactly in exact
        # arithmetic, and the last bits of a float64 sum must not decide which goes first
        perm = torch.argsort(torch.diag(h).float(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hf = h.to(factor_dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hf)), upper=True).double()
    q = torch.zeros_like(w)
    n = w.shape[1]
    for a in range(0, n, block):
        b = min(a + block, n)
        wb = w[:, a:b].clone()
        err = torch.zeros_like(wb)
        ub = u[a:b, a:b]
        for j in range(b - a):
            col = wb[:, j:j + 1]
            qc = _quant(col, s, z, qmin, qmax)
            q[:, a + j:a + j + 1] = qc
            e = (col - qc) / ub[j, j]
            wb[:, j:] -= e @ ub[j:j + 1, j:]
            err[:, j:j + 1] = e
        w[:, b:] -= err @ u[a:b, b:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.float()


def gptq(model: nn.Module, batches: Sequence[torch.Tensor], damp: float = 0.01, block: int = 128,
         act_order: bool = False, device: str = "cpu") -> Dict[str, Any]:
    """Round every quantized conv/linear of `model` with GPTQ, in place; returns the card's record.

    On the captured graph all layers take one pass (quant.layerwise.run_by_node: each layer is rounded
    when the pass reaches it, so later layers see its rounded weights); in eager mode each layer's
    inputs are captured by running the model up to it."""
    info = sim_info(model)
    t0 = time.perf_counter()
    rows_out: List[Dict[str, Any]] = []
    # activations quantized while capturing when their ranges are set (gptq after activation_ranges)
    acts_ready = all(q.calibrated or q.dynamic for q in info.act_quantizers.values())
    layers = {id(li.module): li for li in info.gemm_layers() if li.weight_quantizer is not None}
    done = set()

    def visit(m: nn.Module, xs: Iterable[torch.Tensor]) -> None:
        li = layers.get(id(m))
        if li is None or id(m) in done:
            return
        done.add(id(m))
        rows_out.append(_round_layer(li, xs, damp, block, act_order))

    with quant_state(model, activations=None if acts_ready else False):
        if isinstance(model, fx.GraphModule):
            run_by_node(model, batches, device, visit, only=[li.module for li in layers.values()])
        else:
            for li in info.gemm_layers():
                if id(li.module) in layers:
                    visit(li.module, capture_inputs(model, li.module, batches, device))
    missed = [li.name for k, li in layers.items() if k not in done]
    rows_out += [{"name": n, "skipped": "not reached by the calibration pass"} for n in missed]
    return {"damp": damp, "block": block, "act_order": act_order, "activations": acts_ready, "layers": rows_out,
            "wall_s": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def _round_layer(li, xs: Iterable[torch.Tensor], damp: float, block: int, act_order: bool) -> Dict[str, Any]:
    m, wq = li.module, li.weight_quantizer
    if wq.spec.granularity == "per_group":
        return {"name": li.name, "skipped": "per-group weight grids: nearest rounding kept"}
    if wq.spec.granularity == "per_channel" and wq.channel_axis != 0:
        return {"name": li.name, "skipped": "weight grid not along output channels: nearest rounding kept"}
    hs: Optional[List[torch.Tensor]] = None
    diags: Optional[List[torch.Tensor]] = None
    n = 0
    for x in xs:                                   # X·Xᵀ accumulated batch by batch (im2col rows are large)
        cols = layer_columns(m, x)
        if cols is None:
            return {"name": li.name, "skipped": f"{type(m).__name__}: nearest rounding kept"}
        # one batch's product in the inputs' precision (float32, as Brevitas; the bulk of GPTQ's time in
        # float64), summed over batches in float64; the diagonal in float64 (cheap), since act-order sorts
        # by it and im2col columns often tie exactly (shifted windows over zero borders)
        prod = [(c @ c.t()).double() for c in cols]
        sq = [c.double().pow(2).sum(1) for c in cols]
        hs = prod if hs is None else [a + b for a, b in zip(hs, prod)]
        diags = sq if diags is None else [a + b for a, b in zip(diags, sq)]
        n += cols[0].shape[1]
    if not hs:
        return {"name": li.name, "skipped": "no calibration input"}
    for h, dg in zip(hs, diags):
        h.diagonal().copy_(dg)
    w = m.weight.detach()
    _, s, z, _ = weight_rows(w, wq)
    full = w.reshape(w.shape[0], -1)                   # out × in/g·k·k, matching unfold's order
    s_rows = s.expand(full.shape[0], 1) if s.shape[0] == 1 else s
    z_rows = z.expand(full.shape[0], 1) if z.shape[0] == 1 else z
    q_full = torch.empty_like(full)
    per = full.shape[0] // len(hs)
    before = after = 0.0
    for gi, xx in enumerate(hs):
        sl = slice(gi * per, (gi + 1) * per)
        wg = full[sl].float()
        qg = gptq_rows(wg, 2.0 * xx / n, s_rows[sl], z_rows[sl], wq.qmin, wq.qmax, damp, block, act_order)
        q_full[sl] = qg.to(full.dtype)
        nearest = _quant(wg, s_rows[sl], z_rows[sl], wq.qmin, wq.qmax)
        # ‖d·X‖² = Σ d X Xᵀ dᵀ for nearest and GPTQ rounding in one float32 product (a reported figure)
        d = torch.cat([wg - nearest, wg - qg]).float()
        e = ((d @ xx.float()) * d).sum(1, dtype=torch.float64)
        before += float(e[:per].sum())
        after += float(e[per:].sum())
    if "qcard_fp_weight" not in m.__dict__:
        m.__dict__["qcard_fp_weight"] = w.clone()
    m.weight.copy_(q_full.reshape(w.shape))
    wq.rounding_label = "gptq"
    return {"name": li.name, "output_err_nearest": before / n, "output_err_gptq": after / n}
