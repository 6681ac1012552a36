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

__all__ = ["deployment_tables", "deployment_banner", "integer_share_line"]

DASH = "—"
# integer kernels that do conv/gemm/matmul work (the others: adds, pooling, ...)
INTEGER_COMPUTE = frozenset({"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv", "QLinearConvTranspose",
                             "QAttention"})


def _n(v: Optional[float], digits: int = 2, unit: str = "") -> str:
    return DASH if v is None else f"{v:.{digits}f}{unit}"


def _ops(ops: Dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items())) if ops else "none"


def _si(v: Optional[float]) -> str:
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if v is not None and abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return DASH if v is None else f"{v:.0f}"


def _share(d: Dict[str, Any]) -> Optional[float]:
    return (d.get("integer_macs") or {}).get("share")


def integer_share_line(d: Dict[str, Any]) -> Optional[str]:
    """'25.0 % of the conv/gemm/matmul MACs ran on integer kernels (QLinearConv ×3); in float: Conv ×6, Gemm ×1
    (layer1.conv2, ...)', or None when the card has no such count."""
    macs = d.get("integer_macs") or {}
    if macs.get("share") is None:
        return None
    ints = {k: v for k, v in (d.get("integer_ops") or {}).items() if k in INTEGER_COMPUTE}
    line = f"{100.0 * macs['share']:.1f} % of the conv/gemm/matmul MACs ran on integer kernels"
    line += f" ({_ops(ints)})" if ints else ""
    counts = macs.get("float_op_counts") or {op: 1 for op in macs.get("float_ops") or []}
    if counts:
        layers = macs.get("float_layers") or []
        line += "; in float: " + ", ".join(f"{k} ×{v}" for k, v in counts.items())
        line += f" ({', '.join(layers[:6])}{', ...' if len(layers) > 6 else ''})" if layers else ""
    return line


def _agreement(d: Dict[str, Any]) -> str:
    agree = d.get("argmax_agreement")
    if agree is None:
        return DASH
    return f"{100.0 * agree:.2f} %" + (" (not informative: see the note)" if d.get("agreement_informative") is False
                                       else "")


def _accuracy_rows(d: Dict[str, Any]) -> List[List[str]]:
    rt, sim = d.get("top1"), d.get("top1_simulated")
    delta = None if rt is None or sim is None else rt - sim
    n = d.get("eval_size")
    unit = "output steps" if (d.get("export") or {}).get("output_scale") else "absolute (float logits)"
    rows = [
        ["top-1 on the runtime", _n(rt) + (" %" if rt is not None else "")],
        ["top-1 simulated (same images)", _n(sim) + (" %" if sim is not None else "")],
        ["runtime - simulated", DASH if delta is None else f"{delta:+.2f} points"
         + (f" on {n:,} images" if n else "")],
        ["identical argmax", _agreement(d)],
        ["|logit difference| max / mean", f"{_n(d.get('logit_diff_max_steps'))} / "
         f"{_n(d.get('logit_diff_mean_steps'), 3)} {unit}"],
    ]
    outs = d.get("simulated_outputs") or {}
    if outs.get("argmax_classes") is not None:
        rows.append(["distinct simulated argmax classes", f"{outs['argmax_classes']}"
                     + (" (constant logits)" if outs.get("constant") else "")])
    return rows


def _runtime_rows(d: Dict[str, Any]) -> List[List[str]]:
    ver = d.get("runtime_version")
    rows = [["runtime", f"{d.get('runtime', 'onnxruntime')}{' ' + ver if ver else ''}"],
            ["execution provider", f"{d.get('execution_provider') or DASH}, {d.get('threads') or DASH} thread(s)"],
            ["graph", f"ONNX QDQ, opset {d.get('opset') or DASH}"],
            ["integer kernels that ran", _ops(d.get("integer_ops") or {})],
            ["float compute ops left", _ops(d.get("float_ops") or {})]]
    macs = d.get("integer_macs") or {}
    if macs.get("share") is not None:
        rows.append(["conv/gemm/matmul MACs on integer kernels",
                     f"{100.0 * macs['share']:.1f} % ({_si(macs.get('integer'))} of "
                     f"{_si((macs.get('integer') or 0) + (macs.get('float') or 0))} per image)"])
    types = (d.get("export") or {}).get("weight_types") or {}
    if types:
        rows.append(["weight initializers", _ops(types)])
    return rows


def _ms(r: Dict[str, Any], key: str) -> str:
    iqr = r.get(f"{key}_iqr")
    return _n(r.get(key), 3) + (f" [{iqr[0]:.3f}, {iqr[1]:.3f}]" if iqr else "")


def _speedup(r: Dict[str, Any]) -> str:
    iqr = r.get("speedup_iqr")
    return (_n(r.get("speedup"), 2, "×") + (f" [{iqr[0]:.2f}, {iqr[1]:.2f}]" if iqr else "")
            + (" large spread" if r.get("large_spread") else ""))


def _latency_table(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    lat = [r for r in d.get("latency") or [] if isinstance(r, dict)]
    if not lat:
        return None
    sim = d.get("simulated_speedup")
    share = _share(d)
    # below 100 % of the MACs on integer kernels the QDQ graph's latency is not an int8 latency
    label = "int8 ms" if share is None or share >= 1 else "QDQ graph ms"
    rows = [[str(r.get("batch_size")), _ms(r, "int8_ms"), _ms(r, "fp32_ms"), _speedup(r), _n(sim, 2, "×"),
             str(r.get("runs") or DASH)] for r in lat]
    spread = any(r.get("speedup_iqr") for r in lat)
    note = ("median" + (" [interquartile range]" if spread else "") + " of the timed runs per batch (at least "
            "deploy.latency_runs, more while the spread of the per-run speedup was above 10 % and the time budget "
            "lasted), QDQ and FP32 calls alternating; FP32 = the same graph without its quantizers, same runtime "
            "and threads; simulated = the card's cost model (speedup_vs_fp32)")
    if share is not None and share < 1:
        note += (f"; the QDQ graph ran only {100.0 * share:.1f} % of its conv/gemm/matmul MACs on integer kernels, "
                 "so its latency is not an int8 latency")
    return table("Runtime latency", [("batch", "l"), (label, "r"), ("FP32 ms", "r"), ("measured speedup", "r"),
                                     ("simulated speedup", "r"), ("runs", "r")], rows, note)


def deployment_banner(card: Dict[str, Any]) -> List[str]:
    """Lines for the card's Read-first banner: what ran in float on the runtime, and agreement that says
    nothing (outputs that do not vary)."""
    d = card.get("deployment")
    if not isinstance(d, dict) or d.get("status") != "ok":
        return []
    runtime = d.get("runtime") or "onnxruntime"
    out = []
    share = _share(d)
    if share is not None and share < 1:
        out.append(f"Deployment: on {runtime}, {integer_share_line(d)}; its latency is not an int8 latency")
    if d.get("agreement_informative") is False and d.get("agreement_note"):
        out.append(f"Deployment: runtime vs simulated agreement is {d['agreement_note']}")
    return out


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
    share_line = integer_share_line(d)
    notes = "; ".join(([share_line] if share_line and _share(d) < 1 else []) + list(d.get("notes") or [])) or None
    acc_note = ("the last seed's simulated model, exported as ONNX QDQ with qcard's scales and zero points, "
                "run on the images the simulation was scored on")
    if d.get("agreement_informative") is False and d.get("agreement_note"):
        acc_note += f"; agreement: {d['agreement_note']}"
    out = [table(f"Deployment on {runtime}: accuracy", [("", "l"), ("value", "r")], _accuracy_rows(d), acc_note),
           table(f"Deployment on {runtime}: what ran", [("", "l"), ("value", "l")], _runtime_rows(d), notes)]
    lat = _latency_table(d)
    return out + ([lat] if lat else [])
