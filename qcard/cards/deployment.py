"""The card's deployment block (the same quantized model run on a real integer runtime) as tables.

Tables in the shape of a TableSection (qcard.cards.schema), so the md/html/tex templates show them
with the method's own tables: what ran (runtime, provider, opset, integer kernels), accuracy on the
runtime beside the simulation on the same images, and latency int8 vs FP32 on the same runtime with
the measured speedup beside the card's simulated one. A setting the runtime cannot run as integer
gives one line: "not deployable on onnxruntime: <reason>".
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .method_tables import table

__all__ = ["deployment_tables"]

DASH = "—"


def _n(v: Optional[float], digits: int = 2, unit: str = "") -> str:
    return DASH if v is None else f"{v:.{digits}f}{unit}"


def _ops(ops: Dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items())) if ops else "none"


def _accuracy_rows(d: Dict[str, Any]) -> List[List[str]]:
    rt, sim = d.get("top1"), d.get("top1_simulated")
    delta = None if rt is None or sim is None else rt - sim
    n = d.get("eval_size")
    agree = d.get("argmax_agreement")
    unit = "output steps" if (d.get("export") or {}).get("output_scale") else "absolute (float logits)"
    return [
        ["top-1 on the runtime", _n(rt) + (" %" if rt is not None else "")],
        ["top-1 simulated (same images)", _n(sim) + (" %" if sim is not None else "")],
        ["runtime - simulated", DASH if delta is None else f"{delta:+.2f} points"
         + (f" on {n:,} images" if n else "")],
        ["identical argmax", DASH if agree is None else f"{100.0 * agree:.2f} %"],
        ["|logit difference| max / mean", f"{_n(d.get('logit_diff_max_steps'))} / "
         f"{_n(d.get('logit_diff_mean_steps'), 3)} {unit}"],
    ]


def _runtime_rows(d: Dict[str, Any]) -> List[List[str]]:
    ver = d.get("runtime_version")
    rows = [["runtime", f"{d.get('runtime', 'onnxruntime')}{' ' + ver if ver else ''}"],
            ["execution provider", f"{d.get('execution_provider') or DASH}, {d.get('threads') or DASH} thread(s)"],
            ["graph", f"ONNX QDQ, opset {d.get('opset') or DASH}"],
            ["integer kernels that ran", _ops(d.get("integer_ops") or {})],
            ["float compute ops left", _ops(d.get("float_ops") or {})]]
    types = (d.get("export") or {}).get("weight_types") or {}
    if types:
        rows.append(["weight initializers", _ops(types)])
    return rows


def _latency_table(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    lat = [r for r in d.get("latency") or [] if isinstance(r, dict)]
    if not lat:
        return None
    sim = d.get("simulated_speedup")
    runs = sorted({r.get("runs") for r in lat if r.get("runs")})
    rows = [[str(r.get("batch_size")), _n(r.get("int8_ms"), 3), _n(r.get("fp32_ms"), 3),
             _n(r.get("speedup"), 2, "×"), _n(sim, 2, "×")] for r in lat]
    note = (f"median of {', '.join(map(str, runs))} timed runs per batch, int8 and FP32 calls alternating; "
            "FP32 = the same graph without its quantizers, same runtime and threads; simulated = the card's "
            "cost model (speedup_vs_fp32)")
    return table("Runtime latency", [("batch", "l"), ("int8 ms", "r"), ("FP32 ms", "r"), ("measured speedup", "r"),
                                     ("simulated speedup", "r")], rows, note)


def deployment_tables(card: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The deployment tables of a card (none when it has no deployment block)."""
    d = card.get("deployment")
    if not isinstance(d, dict):
        return []
    status, runtime = d.get("status"), d.get("runtime") or "onnxruntime"
    if status != "ok":
        what = "not deployable on" if status == "not_deployable" else "deploy check failed on"
        line = f"{what} {runtime}: {d.get('reason') or 'no reason given'}"
        return [table("Deployment", [("status", "l"), ("reason", "l")],
                      [[what.replace(" on", ""), d.get("reason") or DASH]], line)]
    notes = "; ".join(d.get("notes") or []) or None
    out = [table(f"Deployment on {runtime}: accuracy", [("", "l"), ("value", "r")], _accuracy_rows(d),
                 "the last seed's simulated model, exported as ONNX QDQ with qcard's scales and zero points, "
                 "run on the images the simulation was scored on"),
           table(f"Deployment on {runtime}: what ran", [("", "l"), ("value", "l")], _runtime_rows(d), notes)]
    lat = _latency_table(d)
    return out + ([lat] if lat else [])
