"""Mixed precision for the ptq method: a greedy bit allocation to the budgets, as overrides.

Weights are chosen per conv/linear, activations per quantized tensor (named '<layer>.output'), so the
accounting is exactly the one the card reports (each tensor stored once, at its bits). The search
measures the output noise of each choice on up to 128 calibration images (quant.sensitivity).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from ...quant.calibrate import calibrate_activations, quant_state, set_weight_ranges, sim_info
from ...quant.scheme import SearchedOverride
from ...quant.sensitivity import greedy_bit_allocation, output_noise
from .params import PTQParams

__all__ = ["search_bits"]

_Key = Tuple[str, str]              # (layer or tensor name, "w" | "a")


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _subset(xs: List[torch.Tensor], n_max: int = 128) -> List[torch.Tensor]:
    sub, n = [], 0
    for x in xs:
        sub.append(x)
        n += int(x.shape[0])
        if n >= n_max:
            break
    return sub


class _Table:
    """Output noise per (tensor, side) and bit width, and what the search may not change."""

    def __init__(self):
        self.noise: Dict[_Key, Dict[int, float]] = {}
        self.numel: Dict[_Key, int] = {}
        self.fixed_names: set = set()
        self.fixed: List[Dict[str, Any]] = []

    def fix(self, name: str, side: str, numel: int, bits: int) -> None:
        self.fixed_names.add(name)
        self.fixed.append({"side": side, "numel": numel, "bits": bits})

    def candidates(self, n_bits: int) -> List[Dict[str, Any]]:
        return [{"layer": k[0], "side": k[1], "numel": self.numel[k], "noise": v} for k, v in self.noise.items()
                if len(v) == n_bits and self.numel[k] > 0]


def _is_fixed(li, p: PTQParams) -> bool:
    return bool(li.fp32_reason or li.override or (li.position and (
        ("first" in li.position and p.first_layer != "same") or ("last" in li.position and p.last_layer != "same"))))


def _measure(sim, p: PTQParams, b: int, first: bool, sub, ref, table: _Table, search_acts: bool, device) -> None:
    """Add the noise of every free weight and activation tensor at b bits to the table."""
    info = sim_info(sim)
    seen, fixed_q = set(), set()
    for li in info.gemm_layers():
        if id(li.module) in seen:
            continue
        seen.add(id(li.module))
        if _is_fixed(li, p):
            fixed_q.update(q.qname for q in li.input_quantizers if q is not None)
            if first:
                wq = li.weight_quantizer
                table.fix(li.name, "w", li.module.weight.numel(), wq.bits if wq else 32)
            continue
        if li.weight_quantizer is not None:
            table.noise.setdefault((li.name, "w"), {})[b] = output_noise(sim, sub, [li.weight_quantizer], device, ref)
            table.numel[(li.name, "w")] = li.module.weight.numel()
    if not search_acts:
        return
    for q in info.act_quantizers.values():
        n_el = int(getattr(q, "numel", 0) or 0)
        if q is info.input_quantizer or q.qname in fixed_q or q.qname in info.tensor_overrides:
            if first and n_el:
                table.fix(q.qname, "a", n_el, q.bits)
            continue
        table.noise.setdefault((q.qname, "a"), {})[b] = output_noise(sim, sub, [q], device, ref)
        table.numel[(q.qname, "a")] = n_el


def search_bits(model: nn.Module, p: PTQParams, xs: List[torch.Tensor], build: Callable[[PTQParams], nn.Module],
                device) -> Tuple[List[SearchedOverride], Dict[str, Any]]:
    """Greedy bit allocation to the budgets; returns (overrides to append, the card's search record)."""
    allowed = sorted(set(p.mp_allowed_bits))
    search_acts = p.a_bits is not None and not p.dynamic_activations and \
        (p.mp_activation_bits is not None or p.mp_max_activation_map_bits is not None)
    sub = _subset(xs)
    table, ref = _Table(), None
    for b in allowed:
        scheme_b = p.model_copy(update={"w_bits": b, "a_bits": b if p.a_bits is not None else None})
        sim = build(scheme_b)
        set_weight_ranges(sim, p.weight_range, percentile=p.percentile)
        if scheme_b.a_bits is not None and not p.dynamic_activations:
            calibrate_activations(sim, sub, device)
        if ref is None:
            with quant_state(sim, weights=False, activations=False), torch.no_grad():
                ref = [sim(x.to(device)).detach().float() for x in sub]
        _measure(sim, p, b, b == allowed[0], sub, ref, table, search_acts, device)
    choice, acct = greedy_bit_allocation(
        table.candidates(len(allowed)), allowed, p.mp_weight_bits, p.mp_activation_bits if search_acts else None,
        p.mp_max_activation_map_bits if search_acts else None, fixed=table.fixed)
    overrides = [SearchedOverride(pattern=_escape(name), w_bits=bits if side == "w" else None,
                                  a_bits=bits if side == "a" else None, source="mixed_precision")
                 for (name, side), bits in sorted(choice.items())]
    record = {"enabled": True, "granularity": "layer", "allowed_bits": allowed,
              "search": "greedy: lower the layer weights or activation tensor adding least output noise per bit saved",
              "budget": {"mean_weight_bits": p.mp_weight_bits, "mean_activation_bits": p.mp_activation_bits,
                         "max_activation_map_bits": p.mp_max_activation_map_bits},
              "searched_activations": search_acts, "fixed": sorted(table.fixed_names),
              "search_estimate": acct,
              "weight_bits": {k[0]: v for k, v in choice.items() if k[1] == "w"},
              "activation_bits": {k[0]: v for k, v in choice.items() if k[1] == "a"}}
    return overrides, record
