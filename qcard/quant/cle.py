"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019; white paper §4.3).

For two consecutive layers with a positive-homogeneous activation between them (ReLU, identity;
ReLU6 is replaced by ReLU, as the white paper does), output channel i of the first layer is scaled
by 1/s_i and input channel i of the second by s_i, with s_i = √(r¹_i·r²_i)/r²_i (r = the channel's
weight range), which leaves the function unchanged and equalizes both ranges to √(r¹_i·r²_i).
Pairs are equalized repeatedly until the scales settle (chains such as expand → depthwise → project).

High-bias absorption then moves c_i = max(0, β_i − 3γ_i) of the first layer's bias into the second
layer's bias (b₂ += W₂·c), where (β, γ) describe the first layer's pre-activation output per channel
(from its folded batch norm, rescaled by CLE). Exact wherever x ≥ c (≈99.9% for a Gaussian) up to
zero padding at conv borders.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import sim_info

__all__ = ["equalize", "absorb_high_bias", "pair_supported"]


def _is_dw(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def pair_supported(m1: nn.Module, m2: nn.Module) -> bool:
    """Both plain conv2d/linear (no transposed/grouped convs except depthwise), matching channels."""
    ok1 = (isinstance(m1, nn.Conv2d) and (m1.groups == 1 or _is_dw(m1))) or isinstance(m1, nn.Linear)
    ok2 = (isinstance(m2, nn.Conv2d) and (m2.groups == 1 or _is_dw(m2))) or isinstance(m2, nn.Linear)
    if not (ok1 and ok2) or isinstance(m1, nn.Linear) != isinstance(m2, nn.Linear):
        return False
    out1 = m1.out_features if isinstance(m1, nn.Linear) else m1.out_channels
    in2 = m2.in_features if isinstance(m2, nn.Linear) else m2.in_channels
    return out1 == in2


def _in_ranges(m2: nn.Module) -> torch.Tensor:
    w = m2.weight.detach()
    if _is_dw(m2):
        return w.abs().flatten(1).amax(1)
    return w.abs().transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def _equalize_pair(m1: nn.Module, m2: nn.Module) -> float:
    r1 = m1.weight.detach().abs().flatten(1).amax(1)
    r2 = _in_ranges(m2)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
    s = s.clamp(1e-8, 1e8)
    shape1 = [-1] + [1] * (m1.weight.dim() - 1)
    m1.weight.div_(s.reshape(shape1))
    if m1.bias is not None:
        m1.bias.div_(s)
    if _is_dw(m2):
        m2.weight.mul_(s.reshape([-1] + [1] * (m2.weight.dim() - 1)))
    else:
        m2.weight.mul_(s.reshape([1, -1] + [1] * (m2.weight.dim() - 2)))
    bn = getattr(m1, "qcard_bn", None)
    if bn is not None:
        bn["beta"] = bn["beta"] / s.to(bn["beta"].device)
        bn["gamma"] = bn["gamma"] / s.to(bn["gamma"].device)
    return float(torch.log(s).abs().max()) if s.numel() else 0.0


def equalize(model: nn.Module, max_iter: int = 100, tol: float = 1e-4) -> Dict[str, Any]:
    """Equalize every recorded layer pair of a simulated model in place (before weight ranges)."""
    info = sim_info(model)
    pairs = [p for p in info.cle_pairs if pair_supported(p["m1"], p["m2"])]
    iters = 0
    for iters in range(1, max_iter + 1):
        change = 0.0
        for p in pairs:
            change = max(change, _equalize_pair(p["m1"], p["m2"]))
        if change < tol:
            break
    replaced = 0
    for p in pairs:
        if p.get("act") == "relu6":
            _relu6_to_relu(model, p)
            p["act"] = "relu"
            replaced += 1
    info.cle.update(applied=bool(pairs), pairs=[f"{p['name1']} -> {p['name2']}" for p in pairs],
                    iterations=iters, relu6_replaced=replaced)
    return {"pairs": len(pairs), "iterations": iters, "relu6_replaced_by_relu": replaced}


def _relu6_to_relu(model: nn.Module, pair: Dict[str, Any]) -> None:
    fq = pair.get("act_fq")
    if fq is not None and fq.pre_act == "relu6":
        fq.pre_act = "relu"
        fq.drop_caches()
    path = pair.get("act_path")
    if path:
        try:
            m = model.get_submodule(path)
        except AttributeError:
            m = None
        if isinstance(m, nn.ReLU6):
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, path.rsplit(".", 1)[-1], nn.ReLU())
    name, graph = pair.get("act_node"), getattr(model, "graph", None)
    node = next((n for n in graph.nodes if n.name == name), None) if name and graph is not None else None
    if node is not None and node.op == "call_function" and node.target is F.relu6:
        node.target = F.relu
        model.recompile()
    for li in sim_info(model).layers:
        if li.module is pair["m1"]:
            li.fused_act = "relu"
    if getattr(pair["m1"], "qcard_act", None) == "relu6":
        pair["m1"].qcard_act = "relu"
    info = sim_info(model)
    for q, (holder, act) in list(info.bn_sources.items()):
        if holder is pair["m1"] and act == "relu6":
            info.bn_sources[q] = (holder, "relu")


@torch.no_grad()
def absorb_high_bias(model: nn.Module, n_sigma: float = 3.0) -> Dict[str, Any]:
    """Move c = max(0, β − nσ·γ) from each equalized pair's first bias into the second layer's bias."""
    info = sim_info(model)
    done: List[str] = []
    skipped: List[str] = []
    for p in info.cle_pairs:
        m1, m2 = p["m1"], p["m2"]
        bn = getattr(m1, "qcard_bn", None)
        if not pair_supported(m1, m2) or bn is None or m1.bias is None or p.get("act") not in ("relu", None):
            skipped.append(f"{p['name1']} -> {p['name2']}")
            continue
        beta, gamma = bn["beta"].to(m1.bias.device), bn["gamma"].to(m1.bias.device).abs()
        c = torch.clamp(beta - n_sigma * gamma, min=0.0)
        if not bool((c > 0).any()):
            continue
        m1.bias.sub_(c.to(m1.bias.dtype))
        bn["beta"] = beta - c
        w2 = m2.weight.detach()
        if isinstance(m2, nn.Linear):
            shift = w2 @ c
        elif _is_dw(m2):
            shift = w2.flatten(1).sum(1) * c
        else:
            shift = w2.sum(dim=tuple(range(2, w2.dim()))) @ c
        if m2.bias is None:
            m2.bias = nn.Parameter(torch.zeros(w2.shape[0], device=w2.device, dtype=w2.dtype),
                                   requires_grad=m2.weight.requires_grad)
        m2.bias.add_(shift.to(m2.bias.dtype))
        done.append(f"{p['name1']} -> {p['name2']}")
    info.cle["bias_absorption"] = bool(done)
    info.cle["absorbed_pairs"] = done
    return {"absorbed_pairs": len(done), "skipped_pairs": skipped}
