"""The sparq method's card sections, read from method_stats.sparq: the per-layer statistics, the PE
cost comparison (tables) and the window histogram per layer (a stacked bar chart). Plain data, no torch here."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ...cards.method_tables import DASH, num, pct, table


def _window_text(hist: Dict[str, Any]) -> str:
    total = sum(float(v) for v in hist.values()) or 1.0
    tops = sorted((k for k in hist if k.isdigit()), key=int, reverse=True)
    parts = [f"{k}:{100 * float(hist[k]) / total:.0f}%" for k in tops]
    for key, name in (("partner_budget", "partner"), ("zero", "zero")):
        if key in hist:
            parts.append(f"{name} {100 * float(hist[key]) / total:.0f}%")
    return " ".join(parts)


def layer_table(st: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    layers = st.get("layers")
    if isinstance(layers, list):       # the list form (each entry names its layer) reads the same
        layers = {str(l.get("name")): l for l in layers if isinstance(l, dict)}
    if not (isinstance(layers, dict) and layers):
        return None
    cols = [("layer", "l"), ("runs as", "l"), ("zeros %", "r"), ("pairs with a zero %", "r"),
            ("mean eff. bits", "r"), ("MSE (codes)", "r"), ("window top bit: share of values", "l")]
    rows = []
    for name, l in layers.items():
        hist = l.get("window_hist") or l.get("window_histogram") or {}
        rows.append([name, str(l.get("role") or l.get("mode") or DASH), pct(l.get("zero_fraction")),
                     pct(l.get("zero_partner_fraction")), num(l.get("mean_bits")), num(l.get("mse")),
                     _window_text(hist) if hist else DASH])
    return table("SPARQ per-layer statistics", cols, rows,
                 "zeros and pairs measured on the statistics pass; mean effective bits count a zero "
                 "code as 0 bits and the partner of a zero as its full 8; MSE against the 8-bit codes")


def cost_table(st: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    cmp_ = st.get("cost_comparison")
    if isinstance(cmp_, dict) and cmp_.get("error") and not any(isinstance(v, dict) for v in cmp_.values()):
        return table("SPARQ cost comparison", [("error", "l")], [[str(cmp_["error"])]])
    if not (isinstance(cmp_, dict) and any(isinstance(v, dict) for v in cmp_.values())):
        return None
    cols = [("row", "l"), ("PE", "l"), ("latency (cycles)", "r"), ("speedup vs A8W8", "r"),
            ("SPARQ layers' cycles", "r"), ("activation traffic (bits)", "r"), ("BOPs", "r")]
    names = {"a8w8": "A8W8", "a4w8": "plain A4W8", "sparq": "SPARQ", "this_run": "this run"}
    rows = []
    for key, label in names.items():
        e = cmp_.get(key)
        if not isinstance(e, dict):
            continue
        rows.append([label + (f" ({e['variant']})" if key == "this_run" and e.get("variant") else ""),
                     str(e.get("pe_mode") or DASH), num(e.get("latency_cycles")),
                     DASH if e.get("speedup_vs_a8w8") is None else f"{e['speedup_vs_a8w8']:.2f}×",
                     num(e.get("quantized_layers_cycles")), num(e.get("activation_traffic_bits")),
                     num(e.get("bops"))])
    profile = next((v.get("profile") for v in cmp_.values() if isinstance(v, dict) and v.get("profile")), "cost model")
    return table(f"SPARQ cost beside A8W8 and plain A4W8 ({profile})", cols, rows, cmp_.get("note"))


def _num_key(k: Any) -> float:
    try:
        return float(k)
    except (TypeError, ValueError):
        return -1.0


def _histograms(sp: Dict[str, Any]) -> List[Tuple[str, Dict[str, float]]]:
    rows: List[Tuple[str, Dict[str, float]]] = []
    for l in sp.get("layers") or []:
        if isinstance(l, dict):
            hist = l.get("window_hist") or l.get("window_histogram")
            if isinstance(hist, dict) and hist:
                rows.append((str(l.get("name", f"layer {len(rows)}")), hist))
    if not rows:
        hist = sp.get("window_hist") or sp.get("window_histogram")
        if isinstance(hist, dict) and hist:
            rows = [("all layers", hist)]
    return rows


def window_plot(stats: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Share of activations per window position, one stacked bar per layer (a plot section)."""
    sp = (stats or {}).get("sparq")
    if not isinstance(sp, dict):
        return None
    bits = int(sp.get("bits") or 4)
    rows = _histograms(sp)
    if not rows:
        return None
    keys: List[str] = list(dict.fromkeys(k for _, hist in rows for k in hist))
    # order: zero, partner budget, then windows from the top bit down
    tops = sorted((k for k in keys if k not in ("zero", "partner_budget")), key=lambda k: -_num_key(k))
    segments = []
    for k in [k for k in ("zero", "partner_budget") if k in keys] + tops:
        values = [float(hist.get(k, 0)) / (sum(float(v) for v in hist.values()) or 1.0) for _, hist in rows]
        if k == "zero":
            seg = {"label": "zero", "color": "#bbbbbb"}
        elif k == "partner_budget":
            seg = {"label": f"partner zero: {2 * bits}-bit budget", "color": "#e6ab02"}
        else:
            t = int(_num_key(k))
            seg = {"label": f"window {t}:{t - bits + 1}", "shade": 0.15 + 0.7 * (tops.index(k) / max(1, len(tops) - 1))}
        segments.append({**seg, "values": values})
    return {"kind": "plot", "id": "plot-sparq", "title": "SPARQ windows per layer", "chart": "stacked_bars",
            "caption": "share of activations per window position (method_stats.sparq.layers[].window_hist)",
            "labels": [n for n, _ in rows], "segments": segments, "x_label": "fraction of activations",
            "x_range": [0.0, 1.0]}


def card_sections(stats: Dict[str, Any]) -> List[Dict[str, Any]]:
    st = (stats or {}).get("sparq")
    if not isinstance(st, dict):
        return []
    plot = window_plot(stats)
    return [s for s in (plot, layer_table(st), cost_table(st)) if s is not None]
