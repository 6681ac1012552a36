"""The marvin method's card sections, read from method_stats.marvin: word lengths per layer and the
switch log (tables), and each layer's word length over training (a step heat map). Plain data, no torch here."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ...cards.method_tables import DASH, pct, table


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


def tables(st: Dict[str, Any]) -> List[Dict[str, Any]]:
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
                         pct(fin.get("sparsity"))])
        out.append(table("MARViN word lengths per layer", cols, rows,
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
        out.append(table(f"MARViN precision switches ({len(switches)}{intra})", cols, rows,
                          "epoch progress in brackets: how far into the epoch the switch happened"
                          if logged else "read off the per-layer trajectories"))
    return out


def trajectories(stats: Dict[str, Any]) -> Tuple[str, List[Tuple[str, List[float], List[float]]]]:
    mv = (stats or {}).get("marvin")
    traj = mv.get("trajectories") if isinstance(mv, dict) else None
    series: List[Tuple[str, List[float], List[float]]] = []
    x_name = "epoch"
    if not isinstance(traj, dict):
        return x_name, series
    for name, seq in traj.items():
        if not isinstance(seq, list) or not seq:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
            xs, ys = [float(i) for i in range(len(seq))], [float(v) for v in seq]
        elif all(isinstance(v, dict) for v in seq):
            # the step is the finer clock: switches inside an epoch stay visible
            xkey = "step" if all("step" in v for v in seq) else "epoch"
            ykey = "wl" if all("wl" in v for v in seq) else "bits"
            if not all(isinstance(v.get(xkey), (int, float)) and isinstance(v.get(ykey), (int, float)) for v in seq):
                continue
            x_name = xkey
            pts = sorted(((float(v[xkey]), float(v[ykey])) for v in seq), key=lambda p: p[0])   # stable
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        else:
            continue
        series.append((str(name), xs, ys))
    return x_name, series


def trajectory_plot(stats: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Layers x time heat map of word length: a value holds until the layer's next entry (a switch)."""
    x_name, series = trajectories(stats)
    if not series:
        return None
    return {"kind": "plot", "id": "plot-marvin", "title": "MARViN word length per layer", "chart": "step_heatmap",
            "caption": "per-layer word length over training; each value holds until the layer's next switch "
                       "(method_stats.marvin.trajectories)",
            "series": [{"name": n, "x": xs, "y": ys} for n, xs, ys in series], "x_label": x_name,
            "value_label": "word length (bits)"}


def card_sections(stats: Dict[str, Any]) -> List[Dict[str, Any]]:
    st = (stats or {}).get("marvin")
    if not isinstance(st, dict):
        return []
    plot = trajectory_plot(stats)
    return ([plot] if plot else []) + tables(st)
