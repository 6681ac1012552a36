"""Per-layer sensitivity and a greedy mixed-precision search.

Sensitivity (white paper's debugging flow): quantize one conv/linear at a time (its weights and its
input activations), everything else FP32, and measure the output SQNR against the FP32 output, or the
accuracy against labels, on calibration data (training split, never the evaluation split).

Mixed precision (Garg et al. 2021 account both costs): start every layer at the highest allowed bit
width and repeatedly lower the one (layer, weights|activations) step that adds the least output noise
per bit saved, until the budgets hold: mean weight bits (weighted by weight count), mean activation
bits (weighted by activation elements) and the largest activation map in bits.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .calibrate import quant_state, sim_info

__all__ = ["layer_sensitivity", "greedy_bit_allocation", "output_noise"]


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[torch.Tensor], device: str) -> List[torch.Tensor]:
    return [model(x.to(device)).detach().float() for x in batches]


def _sqnr_db(ref: List[torch.Tensor], out: List[torch.Tensor]) -> float:
    sig = sum(float(r.pow(2).sum()) for r in ref)
    noise = sum(float((r - o).pow(2).sum()) for r, o in zip(ref, out))
    return float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)


def _accuracy(out: List[torch.Tensor], labels: List[torch.Tensor]) -> float:
    correct = sum(int((o.argmax(-1).cpu() == y.cpu()).sum()) for o, y in zip(out, labels))
    total = sum(int(y.numel()) for y in labels)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: Sequence[torch.Tensor], metric: str = "sqnr",
                      labels: Optional[List[torch.Tensor]] = None, device: str = "cpu",
                      progress: bool = False) -> Dict[str, Any]:
    """One row per conv/linear: the metric with only that layer quantized (as configured)."""
    info = sim_info(model)
    with quant_state(model, weights=False, activations=False):
        ref = _outputs(model, batches, device)
    if metric == "accuracy" and labels is None:
        raise ValueError("accuracy sensitivity needs labels")
    reference = _accuracy(ref, labels) if metric == "accuracy" else None
    rows = []
    seen = set()
    layers = [li for li in info.gemm_layers()]
    it = layers
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(layers, desc="sensitivity", leave=False)
    for li in it:
        if id(li.module) in seen:
            continue
        seen.add(id(li.module))
        qs = [q for q in [li.weight_quantizer] + list(li.input_quantizers) if q is not None]
        if not qs:
            continue
        with quant_state(model, weights=False, activations=False):
            saved = [(q, q.enabled) for q in qs]
            for q in qs:
                q.enabled = True
            try:
                out = _outputs(model, batches, device)
            finally:
                for q, e in saved:
                    q.enabled = e
        value = _accuracy(out, labels) if metric == "accuracy" else _sqnr_db(ref, out)
        rows.append({"name": li.name, "op": li.op,
                     "weight_bits": li.weight_quantizer.bits if li.weight_quantizer is not None else None,
                     "activation_bits": max((q.bits for q in li.input_quantizers if q is not None), default=None),
                     "value": round(value, 4) if math.isfinite(value) else None})
    # lowest SQNR / lowest accuracy first
    worst = [r["name"] for r in sorted(rows, key=lambda r: r["value"] if r["value"] is not None else 1e9)[:3]]
    return {"metric": "output_sqnr_db" if metric == "sqnr" else "top1",
            "data": "calibration set (training split)", "fp32_reference": reference,
            "layers": rows, "most_sensitive": worst}


@torch.no_grad()
def output_noise(model: nn.Module, batches: Sequence[torch.Tensor], enable: Sequence, device: str,
                 ref: List[torch.Tensor]) -> float:
    """Relative output noise power with only the quantizers in `enable` switched on."""
    with quant_state(model, weights=False, activations=False):
        saved = [(q, q.enabled) for q in enable]
        for q in enable:
            q.enabled = True
        try:
            out = _outputs(model, batches, device)
        finally:
            for q, e in saved:
                q.enabled = e
    sig = sum(float(r.pow(2).sum()) for r in ref)
    return sum(float((r - o).pow(2).sum()) for r, o in zip(ref, out)) / max(sig, 1e-30)


def greedy_bit_allocation(candidates: List[Dict[str, Any]], allowed: Sequence[int],
                          w_budget: Optional[float], a_budget: Optional[float],
                          peak_budget: Optional[int], fixed: Sequence[Dict[str, Any]] = ()
                          ) -> Tuple[Dict[Tuple[str, str], int], Dict[str, Any]]:
    """candidates: [{layer, side ('w'|'a'), numel, noise: {bits: relative noise}}]. Returns the chosen
    bits per (layer, side) and the resulting accounting. Raises ValueError when no allocation meets
    the budgets even at the lowest allowed bits. `fixed`: [{side, numel, bits}] that count in the
    accounting but cannot change (layers the user pinned, the network input)."""
    allowed = sorted(set(allowed))
    choice = {(c["layer"], c["side"]): allowed[-1] for c in candidates}
    by_key = {(c["layer"], c["side"]): c for c in candidates}

    def acct():
        items = [(c["side"], c["numel"], choice[(c["layer"], c["side"])]) for c in candidates]
        items += [(f["side"], f["numel"], f["bits"]) for f in fixed]
        wn = sum(n for sd, n, _ in items if sd == "w")
        an = sum(n for sd, n, _ in items if sd == "a")
        wb = sum(n * b for sd, n, b in items if sd == "w") / wn if wn else None
        ab = sum(n * b for sd, n, b in items if sd == "a") / an if an else None
        peak = max((n * b for sd, n, b in items if sd == "a"), default=None)
        return wb, ab, peak

    def over():
        wb, ab, peak = acct()
        return {"w": w_budget is not None and wb is not None and wb > w_budget + 1e-9,
                "a": a_budget is not None and ab is not None and ab > a_budget + 1e-9,
                "peak": peak_budget is not None and peak is not None and peak > peak_budget}

    steps = []
    while True:
        o = over()
        if not any(o.values()):
            break
        best, best_score = None, None
        wb, ab, peak = acct()
        for key, c in by_key.items():
            side = c["side"]
            if side == "w" and not o["w"]:
                continue
            if side == "a" and not (o["a"] or o["peak"]):
                continue
            if side == "a" and o["peak"] and not o["a"] and c["numel"] * choice[key] < peak:
                continue       # only the largest maps can lower the peak
            cur = choice[key]
            lower = [b for b in allowed if b < cur]
            if not lower:
                continue
            nb = lower[-1]
            d_noise = c["noise"][nb] - c["noise"][cur]
            saved = c["numel"] * (cur - nb)
            score = max(d_noise, 0.0) / saved
            if best_score is None or score < best_score:
                best, best_score = (key, nb), score
        if best is None:
            wb, ab, peak = acct()
            raise ValueError(f"mixed precision: the budgets cannot be met with bits {allowed} (reached mean weight "
                             f"bits {wb}, mean activation bits {ab}, largest activation map {peak} bits)")
        choice[best[0]] = best[1]
        steps.append({"layer": best[0][0], "side": best[0][1], "bits": best[1]})
    wb, ab, peak = acct()
    return choice, {"mean_weight_bits": wb, "mean_activation_bits": ab, "max_activation_map_bits": peak,
                    "steps": len(steps)}
