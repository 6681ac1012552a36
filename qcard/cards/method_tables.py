"""Method-specific tables of a card, read from method_stats, for every rendering (md, html, tex).

Each table is a plain dict: {"title", "note", "columns": [(name, "l"|"r")], "rows": [[str, ...]],
"left_out": int (rows not shown; card.json has them all)}. Only what is present is drawn:
  SPARQ      method_stats.sparq.layers (per-layer statistics) and .cost_comparison (PE modes)
  MARViN     method_stats.marvin.trajectories / .switches / .final (per-layer word lengths and the
             switch log, with the step and epoch of every switch)
  training   method_stats.training.curve (loss, accuracies and learning rate per evaluation point)
  seeds      method_stats.per_seed (each seed's headline figures, when a point ran several seeds)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

DASH = "—"
MAX_ROWS = 40


def _pct(v: Any) -> str:
    if v is None:
        return DASH
    try:
        return f"{100 * float(v):.1f}"
    except (TypeError, ValueError):      # a method of the user's may store anything: show it as it is
        return str(v)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:                   # counts (BOPs, bits) that came out fractional: expected values
        return f"{round(v):,}"
    return f"{v:.{digits}g}"


def _table(title: str, columns, rows: List[List[str]], note: Optional[str] = None,
           limit: int = MAX_ROWS) -> Dict[str, Any]:
    shown = rows if len(rows) <= limit else rows[:limit]
    return {"title": title, "note": note, "columns": list(columns), "rows": shown,
            "left_out": len(rows) - len(shown)}


# ------------------------------------------------------------------ SPARQ

def _window_text(hist: Dict[str, Any]) -> str:
    total = sum(float(v) for v in hist.values()) or 1.0
    tops = sorted((k for k in hist if k.isdigit()), key=int, reverse=True)
    parts = [f"{k}:{100 * float(hist[k]) / total:.0f}%" for k in tops]
    for key, name in (("partner_budget", "partner"), ("zero", "zero")):
        if key in hist:
            parts.append(f"{name} {100 * float(hist[key]) / total:.0f}%")
    return " ".join(parts)


def _sparq_tables(st: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    layers = st.get("layers")
    if isinstance(layers, list):       # the list form (each entry names its layer) reads the same
        layers = {str(l.get("name")): l for l in layers if isinstance(l, dict)}
    if isinstance(layers, dict) and layers:
        cols = [("layer", "l"), ("runs as", "l"), ("zeros %", "r"), ("pairs with a zero %", "r"),
                ("mean eff. bits", "r"), ("MSE (codes)", "r"), ("window top bit: share of values", "l")]
        rows = []
        for name, l in layers.items():
            hist = l.get("window_hist") or l.get("window_histogram") or {}
            rows.append([name, str(l.get("role") or l.get("mode") or DASH), _pct(l.get("zero_fraction")),
                         _pct(l.get("zero_partner_fraction")), _num(l.get("mean_bits")), _num(l.get("mse")),
                         _window_text(hist) if hist else DASH])
        out.append(_table("SPARQ per-layer statistics", cols, rows,
                          "zeros and pairs measured on the statistics pass; mean effective bits count a zero "
                          "code as 0 bits and the partner of a zero as its full 8; MSE against the 8-bit codes"))
    cmp_ = st.get("cost_comparison")
    if isinstance(cmp_, dict) and any(isinstance(v, dict) for v in cmp_.values()):
        cols = [("row", "l"), ("PE", "l"), ("latency (cycles)", "r"), ("speedup vs A8W8", "r"),
                ("SPARQ layers' cycles", "r"), ("activation traffic (bits)", "r"), ("BOPs", "r")]
        names = {"a8w8": "A8W8", "a4w8": "plain A4W8", "sparq": "SPARQ", "this_run": "this run"}
        rows = []
        for key, label in names.items():
            e = cmp_.get(key)
            if not isinstance(e, dict):
                continue
            rows.append([label + (f" ({e['variant']})" if key == "this_run" and e.get("variant") else ""),
                         str(e.get("pe_mode") or DASH), _num(e.get("latency_cycles")),
                         DASH if e.get("speedup_vs_a8w8") is None else f"{e['speedup_vs_a8w8']:.2f}×",
                         _num(e.get("quantized_layers_cycles")), _num(e.get("activation_traffic_bits")),
                         _num(e.get("bops"))])
        out.append(_table("SPARQ cost beside A8W8 and plain A4W8 (" + str(next(
            (v.get("profile") for v in cmp_.values() if isinstance(v, dict) and v.get("profile")), "cost model")) + ")",
            cols, rows, cmp_.get("note")))
    elif isinstance(cmp_, dict) and cmp_.get("error"):
        out.append(_table("SPARQ cost comparison", [("error", "l")], [[str(cmp_["error"])]]))
    return out


# ------------------------------------------------------------------ MARViN

def _fmt(wl: Any, fl: Any = None) -> str:
    if wl is None:
        return DASH
    return f"{wl} bits" if fl is None else f"<{wl}, {fl}>"


def _point(p: Any) -> Dict[str, Any]:
    """A trajectory entry as a dict: {"wl", "fl", "step", "epoch", ...} or a bare bit width."""
    if isinstance(p, dict):
        return {**p, "wl": p.get("wl", p.get("bits"))}
    return {"wl": p}


def _at(sw: Optional[Dict[str, Any]]) -> str:
    if not sw:
        return DASH
    prog = sw.get("epoch_progress")
    where = f"epoch {sw.get('epoch')}" + (f" ({100 * float(prog):.0f} %)" if prog is not None else "")
    return f"step {sw.get('step')}, {where}" if sw.get("step") is not None else where


def _switches_from(traj: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Switches read off the trajectories (where the method did not log them one by one)."""
    out = []
    for name, points in traj.items():
        pts = [_point(p) for p in points]
        for prev, cur in zip(pts, pts[1:]):
            if (prev.get("wl"), prev.get("fl")) != (cur.get("wl"), cur.get("fl")):
                out.append({"layer": name, "step": cur.get("step"), "epoch": cur.get("epoch"),
                            "epoch_progress": cur.get("epoch_progress"), "from": [prev.get("wl"), prev.get("fl")],
                            "to": [cur.get("wl"), cur.get("fl")], "intra_epoch": None})
    return sorted(out, key=lambda s: (s.get("step") if s.get("step") is not None else -1, s.get("epoch") or 0))


def _yes_no(v: Any) -> str:
    return DASH if v is None else ("yes" if v else "no")


def _marvin_tables(st: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    traj = st.get("trajectories") if isinstance(st.get("trajectories"), dict) else {}
    final = st.get("final") if isinstance(st.get("final"), dict) else {}
    switches = st.get("switches")
    logged = isinstance(switches, list) and all(isinstance(x, dict) for x in switches)
    switches = switches if logged else _switches_from(traj)
    by_layer: Dict[str, List[Dict[str, Any]]] = {}
    for sw in switches:
        by_layer.setdefault(str(sw.get("layer")), []).append(sw)
    names = list(traj) or list(final)
    if names:
        cols = [("layer", "l"), ("start", "l"), ("final", "l"), ("switches", "r"), ("inside an epoch", "r"),
                ("first switch", "l"), ("last switch", "l"), ("weight sparsity %", "r")]
        rows = []
        for name in names:
            t = [_point(p) for p in traj.get(name) or []]
            start = t[0] if t else {}
            fin = final.get(name) or (t[-1] if t else {})
            sws = by_layer.get(name, [])
            intra = DASH if not logged else str(sum(1 for s in sws if s.get("intra_epoch")))
            rows.append([name, _fmt(start.get("wl"), start.get("fl")), _fmt(fin.get("wl"), fin.get("fl")),
                         str(len(sws)), intra, _at(sws[0] if sws else None), _at(sws[-1] if sws else None),
                         _pct(fin.get("sparsity"))])
        out.append(_table("MARViN word lengths per layer", cols, rows,
                          "fixed-point <word length, fraction length>; the plot of each layer's trajectory is in "
                          "the HTML card", limit=200))
    if switches:
        cols = [("step", "r"), ("epoch", "l"), ("layer", "l"), ("from", "l"), ("to", "l"), ("strategy", "l"),
                ("inside an epoch", "l")]
        rows = []
        for sw in switches:
            f, t = list(sw.get("from") or [None, None]) + [None], list(sw.get("to") or [None, None]) + [None]
            prog = sw.get("epoch_progress")
            rows.append([DASH if sw.get("step") is None else str(sw["step"]),
                         f"{sw.get('epoch')}" + (f" ({100 * float(prog):.0f} %)" if prog is not None else ""),
                         str(sw.get("layer")), _fmt(f[0], f[1]), _fmt(t[0], t[1]), str(sw.get("strategy") or DASH),
                         _yes_no(sw.get("intra_epoch"))])
        intra = f", {sum(1 for s in switches if s.get('intra_epoch'))} inside an epoch" if logged else ""
        out.append(_table(f"MARViN precision switches ({len(switches)}{intra})", cols, rows,
                          "epoch progress in brackets: how far into the epoch the switch happened"
                          if logged else "read off the per-layer trajectories"))
    return out


# ------------------------------------------------------------------ training curve

def _curve_table(tr: Dict[str, Any]) -> List[Dict[str, Any]]:
    curve = [p for p in (tr.get("curve") or []) if isinstance(p, dict)]
    steps = [p for p in (tr.get("step_curve") or []) if isinstance(p, dict)]
    title = "Training curve"
    if len(steps) > len(curve):       # short runs: windows of optimizer steps say more than one epoch row
        curve, title = steps, "Training curve (windows of optimizer steps)"
    if not curve:
        return []
    known = ("epoch", "step", "loss", "train_acc", "eval_acc", "lr")
    keys = [k for k in known if any(k in p for p in curve)]
    keys += [k for k in dict.fromkeys(k for p in curve for k in p)      # other series, in their order
             if k not in known and all(isinstance(p.get(k), (int, float, type(None))) for p in curve)
             and not any(isinstance(p.get(k), bool) for p in curve)]
    heads = {"epoch": "epoch", "step": "step", "loss": "loss", "train_acc": "train acc %",
             "eval_acc": "eval acc %", "lr": "learning rate"}
    heads.update({k: k.replace("_", " ") for k in keys if k not in heads})
    if not keys:
        return []
    thinned = ""
    if len(curve) > MAX_ROWS:       # evenly spaced points, the last one always kept
        idx = sorted({round(i * (len(curve) - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)})
        thinned = f"{len(idx)} of {len(curve)} points, evenly spaced (all in card.json)"
        curve = [curve[i] for i in idx]
    rows = [[DASH if p.get(k) is None else (str(p[k]) if k in ("epoch", "step") else _num(p[k], 4)) for k in keys]
            for p in curve]
    recipe = tr.get("recipe") if isinstance(tr.get("recipe"), dict) else {}
    bits = [f"{k} {recipe[k]}" for k in ("optimizer", "lr", "batch_size", "epochs", "schedule") if recipe.get(k) is not None]
    note = "; ".join(x for x in (("recipe: " + ", ".join(bits)) if bits else "", thinned) if x)
    return [_table(title, [(heads[k], "l" if k == "epoch" else "r") for k in keys], rows, note or None)]


def _per_seed_table(ms: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows_in = [r for r in (ms.get("per_seed") or []) if isinstance(r, dict)]
    if not rows_in:
        return []
    keys = [k for k in dict.fromkeys(k for r in rows_in for k in r) if k != "seed"]
    cols = [("seed", "l")] + [(k, "r") for k in keys]
    rows = [[str(r.get("seed"))] + [_num(r.get(k)) if not isinstance(r.get(k), str) else r[k] for k in keys]
            for r in rows_in]
    return [_table("Per seed", cols, rows, f"the statistics above are seed {ms.get('stats_seed')}'s")]


_BUILDERS = (("sparq", _sparq_tables), ("marvin", _marvin_tables), ("training", _curve_table))


def method_tables(card: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The tables for this card's method_stats (empty when it has none of the known blocks). A block of
    an unexpected shape (a user's method may store anything) gives a one-line note, never an error."""
    ms = card.get("method_stats") or {}
    tables: List[Dict[str, Any]] = []
    for key, build in _BUILDERS:
        if not isinstance(ms.get(key), dict):
            continue
        try:
            tables += build(ms[key])
        except Exception as exc:             # the card must render whatever the statistics hold
            tables.append(_table(f"{key} statistics", [("note", "l")],
                                 [[f"not tabulated ({type(exc).__name__}: {exc}); see card.json"]]))
    try:
        tables += _per_seed_table(ms)
    except Exception:
        pass
    return tables
