"""The ptq method's card sections: what its rounding steps (adaround, brecq, qdrop, gptq) did, per unit."""
from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["card_sections"]


def _g(v: Any) -> str:
    return "—" if v is None else f"{float(v):.4g}"


def _reconstruction(step: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    rows = [[u.get("unit", "?"), str(len(u.get("layers", []))), _g(u.get("loss_nearest")), _g(u.get("loss_after")),
             f"{100 * float(u.get('changed_vs_nearest', 0)):.1f}", _g(u.get("seconds"))]
            for u in rec.get("per_unit", [])]
    note = (f"unit: {rec.get('unit')}; {rec.get('iters')} iterations per unit, batch {rec.get('batch_size')}; "
            f"λ {rec.get('reg')}, β {rec.get('beta_start')}→{rec.get('beta_end')} after {rec.get('warm_start')} "
            f"warm-up; lr {rec.get('lr')} (rounding), {rec.get('scale_lr')} (activation steps); input "
            f"{rec.get('input')}; targets {rec.get('targets')}"
            + (f"; keep probability {rec.get('drop_prob')}" if rec.get("drop") else "")
            + f"; wall {rec.get('wall_s')} s. Loss: ‖y_fp − y_q‖² per sample on the calibration set, with "
              "nearest rounding and after reconstruction.")
    return {"kind": "table", "title": f"{step} reconstruction units", "note": note,
            "columns": [("unit", "l"), ("layers", "r"), ("loss nearest", "r"), ("loss after", "r"),
                        ("% rounded ≠ nearest", "r"), ("s", "r")], "rows": rows}


def _adaround(rec: Dict[str, Any]) -> Dict[str, Any]:
    rows = [[l.get("name", "?"), _g(l.get("output_mse_nearest")), _g(l.get("output_mse_adaround")),
             f"{100 * float(l.get('changed_vs_nearest', 0)):.1f}"] for l in rec.get("layers", [])]
    return {"kind": "table", "title": "adaround layers",
            "note": f"{rec.get('iterations')} iterations per layer; targets {rec.get('targets', 'rounded_so_far')}",
            "columns": [("layer", "l"), ("loss nearest", "r"), ("loss adaround", "r"), ("% rounded ≠ nearest", "r")],
            "rows": rows}


def _gptq(rec: Dict[str, Any]) -> Dict[str, Any]:
    rows = [[l.get("name", "?"), _g(l.get("output_err_nearest")), _g(l.get("output_err_gptq")), l.get("skipped", "")]
            for l in rec.get("layers", [])]
    return {"kind": "table", "title": "gptq layers",
            "note": f"dampening {rec.get('damp')}, block {rec.get('block')}, act-order {rec.get('act_order')}, "
                    f"activations quantized while capturing: {rec.get('activations')}; wall {rec.get('wall_s')} s. "
                    "Error: ‖WX − ŴX‖² per input column.",
            "columns": [("layer", "l"), ("error nearest", "r"), ("error gptq", "r"), ("note", "l")], "rows": rows}


def card_sections(stats: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    if isinstance(stats.get("adaround"), dict):
        out.append(_adaround(stats["adaround"]))
    for step in ("brecq", "qdrop"):
        if isinstance(stats.get(step), dict):
            out.append(_reconstruction(step, stats[step]))
    if isinstance(stats.get("gptq"), dict):
        out.append(_gptq(stats["gptq"]))
    return out
