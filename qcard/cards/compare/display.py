"""The table in words, for the formats people read (md, tex, html): which columns, each cell's text, and
the lines around the table. Rows hold raw values (rows.py); this is the one place that words them."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...errors import QcardError
from ..reference import NOT_STATED
from ..render import fmt_bits_size, fmt_energy, fmt_si
from .rows import X_AXES, Row
from .runtime import runtime_text
from .words import (BN_WORDS, RESIDUAL_WORDS, bits, compact, edge, fmt_p, granularity_text, interval_text, missing,
                    truncate, words)

PARAM = "param:"          # a column key of a swept method parameter: "param:alpha"

# column key -> (display header, alignment); `--columns` names these keys
COLUMNS: Dict[str, Tuple[str, str]] = {
    "card": ("card", "l"), "model": ("model", "l"), "method": ("method", "l"), "label": ("label", "l"),
    "wa": ("W/A bits", "l"), "granularity": ("W granularity", "l"), "bn": ("BN", "l"),
    "first_last": ("first/last", "l"), "residual": ("residual adds", "l"), "calibration": ("calibration", "r"),
    "fp32": ("FP32", "r"), "quantized": ("quantized", "r"), "delta": ("Δ", "r"), "vs_ref": ("vs ref (BH p)", "l"),
    "runtime": ("runtime", "r"),
    "bops": ("BOPs", "r"), "size_bits": ("size", "r"), "energy_pj": ("energy", "r"),
    "latency_cycles": ("latency (cycles)", "r"), "speedup_vs_fp32": ("speedup vs FP32", "r"), "profile": ("profile", "l"),
}
MAX_ERROR_CHARS = 160      # a failed card's message in the short failed section


def default_columns(rows: Sequence[Row], params: Sequence[str]) -> List[str]:
    """Every column that says something here: a cost column no card fills is left out (e.g. energy under a
    bitops profile), the swept parameters follow the label."""
    cols = []
    for key in COLUMNS:
        if key in ("energy_pj", "latency_cycles", "speedup_vs_fp32") and all(missing(r.get(key)) for r in rows):
            continue
        if key == "runtime" and not any(r.runtime_status == "ok" for r in rows):
            continue     # a runtime column only where a deploy check ran on some card
        if key == "vs_ref" and all(r.p_adjusted is None for r in rows):
            continue
        cols.append(key)
        if key == "label":
            cols += [PARAM + p for p in params]
    return cols


def header(key: str) -> Tuple[str, str]:
    if key.startswith(PARAM):
        return key[len(PARAM):], "l"
    return COLUMNS[key]


def check_columns(keys: Sequence[str], params: Sequence[str]) -> List[str]:
    """`--columns` as given, each a known column or a swept parameter; an unknown one is an error naming
    the allowed ones."""
    allowed = list(COLUMNS) + [PARAM + p for p in params]
    out = []
    for k in keys:
        k = k.strip()
        if k in params:                  # a parameter may be named bare: alpha = param:alpha
            k = PARAM + k
        if k not in allowed:
            raise QcardError(f"unknown column '{k}'; allowed: {', '.join(allowed)}")
        out.append(k)
    return out


def label_text(r: Row) -> str:
    """The label, with the swept parameters that tell it from rows of the same label: 'W4 (alpha=0.1)'."""
    if not r.swept:
        return r.label
    return f"{r.label} (" + ", ".join(f"{k}={param_text(r.params.get(k))}" for k in r.swept) + ")"


def param_text(v: Any) -> str:
    return words(v) if v is None or isinstance(v, bool) else compact(v)


def quantized_text(r: Row) -> str:
    if r.status != "ok":
        return "FAILED"
    if missing(r.quantized):
        return "—"
    text = f"{r.quantized:.2f}"
    if r.ci95_lo is not None:      # the interval says more than ± std over seeds
        text += interval_text(r.ci95_lo, r.ci95_hi, "")
    elif not missing(r.std):
        text += f" ± {r.std:.2f}"
    return ("≈ " if r.significant is False else "") + text


def delta_text(r: Row) -> str:
    if r.delta_vs_ref is not None:      # tested: against the reference, at its family's level
        return f"{r.delta_vs_ref:+.2f}" + interval_text(r.delta_vs_ref_lo, r.delta_vs_ref_hi, "+")
    if missing(r.delta):
        return "—"
    return f"{r.delta:+.2f}" + interval_text(r.delta_ci95_lo, r.delta_ci95_hi, "+")


def cell(r: Row, key: str) -> str:
    """A row's cell in words."""
    ok = r.status == "ok"
    if key.startswith(PARAM):
        name = key[len(PARAM):]
        return param_text(r.params[name]) if name in r.params else "—"
    if key == "label":
        return label_text(r)
    if key == "wa":
        if not ok:
            return "—"
        return "FP32" if r.w_bits is None and r.a_bits is None else f"W{bits(r.w_bits)}A{bits(r.a_bits)}"
    if key == "quantized":
        return quantized_text(r)
    if key == "delta":
        return delta_text(r)
    if key == "vs_ref":
        if r.p_adjusted is not None:
            m = r.family_size
            return f"{r.ref}: {fmt_p(r.p_adjusted)} ({m} test{'s' if m != 1 else ''})"
        return "ref" if r.is_reference else "—"
    if key == "runtime":
        return runtime_text(r.runtime_status, r.runtime, r.runtime_top1, r.runtime_agreement_informative) or "—"
    if key == "granularity":
        return granularity_text(r.granularity, r.group_size) if ok and r.granularity else "—"
    if key == "bn":
        return BN_WORDS.get(r.bn, r.bn) if ok and r.bn else "—"
    if key == "residual":
        return RESIDUAL_WORDS.get(r.residual, r.residual) if ok and r.residual else "—"
    if key == "first_last":
        return f"{edge(r.first_w_bits, r.first_a_bits)} / {edge(r.last_w_bits, r.last_a_bits)}" if ok else "—"
    v = r[key]
    if missing(v):
        return "—"
    if key == "fp32":
        return f"{v:.2f}" + interval_text(r.fp32_ci95_lo, r.fp32_ci95_hi, "")
    if key in ("bops", "latency_cycles"):
        return fmt_si(float(v))
    if key == "size_bits":
        return fmt_bits_size(float(v)).split(" (")[-1].rstrip(")")
    if key == "energy_pj":
        return fmt_energy(float(v))
    if key == "speedup_vs_fp32":
        return f"{v:.2f}×"
    if key == "calibration":
        return f"{int(v):,}"
    return str(v)


REFERENCE_HEADERS = ("source", "dataset", "model", "method", "W/A bits", "W granularity", "FP32 (source)", "top1",
                     "Δ")   # the published rows' table (simulated, and apart the real-engine ones)


def reference_cells(rows: Optional[Sequence[Dict[str, Any]]]) -> Tuple[List[List[str]], Dict[str, str]]:
    """Published rows in words (REFERENCE_HEADERS' order), and their sources' citations. What a source
    does not state (FP32, granularity) is said so, not guessed."""
    cells, sources = [], {}
    for r in rows or []:
        cells.append([r["source"], r["dataset"], r["model"], r["method"], f"W{r['w_bits']}A{r['a_bits']}",
                      words(r["w_granularity"]) if r.get("w_granularity") else NOT_STATED,
                      "—" if r.get("fp32") is None else f"{r['fp32']:.2f}", f"{r['top1']:.2f}",
                      "—" if r.get("delta") is None else f"{r['delta']:+.2f}"])
        sources[r["source"]] = r["citation"]
    return cells, sources


def context(cmp: Any, columns: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Everything the md/tex/html templates show, in words (columns: keys of COLUMNS or param:NAME)."""
    _, xlabel, _ = X_AXES[cmp.x]
    cols = list(columns) if columns is not None else default_columns(cmp.rows, cmp.params)
    front = set(cmp.pareto)
    rows = [{"cells": [cell(r, c) for c in cols], "pareto": i in front, "failed": r.status != "ok", "id": r.id,
             "card": r.card}
            for i, r in enumerate(cmp.rows)]
    ref_rows, sources = reference_cells(cmp.reference_rows)
    runtime_rows, runtime_sources = reference_cells(cmp.runtime_reference_rows)
    failed = [dict(f, error=truncate(f["error"], MAX_ERROR_CHARS)) for f in cmp.failed]
    return {"n": len(cmp.rows), "n_ok": sum(r.status == "ok" for r in cmp.rows),
            "differences": cmp.differences, "method_differences": cmp.method_differences,
            "columns": [header(c) for c in cols], "column_keys": cols, "rows": rows,
            "pareto_cards": [cmp.rows[i].card for i in cmp.pareto], "x_label": xlabel, "x": cmp.x,
            "failed": failed, "superseded": cmp.superseded, "reference_rows": ref_rows, "reference_sources": sources,
            "reference_requested": cmp.reference_rows is not None, "reference_note": cmp.reference_note,
            "runtime_reference_rows": runtime_rows, "runtime_reference_sources": runtime_sources,
            "runtime_reference_note": cmp.runtime_reference_note, "reference_headers": list(REFERENCE_HEADERS),
            "profile_note": cmp.profile_note, "within_noise": cmp.significance.within_noise,
            "notes": cmp.significance.notes + cmp.notes, "legend": cmp.legend(),
            "read_first": cmp.read_first()}
