"""Plots for the HTML card and for `qcard compare --plot` (matplotlib, Agg, no pyplot state).

matplotlib is imported inside the functions: `qcard --help` and Markdown rendering never load it.

The HTML card draws, from card.json:
  accuracy          results.{fp32, quantized, std, top5_fp32, top5}              always (when numbers exist)
  per-layer cost    cost.layers[].{name, bops, energy_pj, weight_bits, activation_bits}   when layers exist
  method plots      the card's sections of kind "plot" (a method hands them over through
                      Method.card_sections; qcard.cards.schema.PlotSection), drawn by chart kind:
                      stacked_bars, step_heatmap, lines. cards/ never reads a method's statistics.
and, from generic keys of method_stats (written by the shared training loop), where present:
  training curve    method_stats.training.curve = [{"epoch": e, "<series>": value, ...}, ...]; series
                      whose name contains "loss" go in one panel, accuracies ("top1", "top5", "acc")
                      in another, the rest (lr, mean bits, ...) in a third. A `curve` list under any
                      other method_stats key (e.g. method_stats.qat.curve) is read the same way.
                      Where the block also has a longer `step_curve` (windows of optimizer steps), that
                      one is drawn, on the step axis.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

MAX_LAYERS = 60          # per-layer bar charts show at most this many layers (the largest)
DPI = 100
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "svg.hashsalt": "qcard", "pdf.fonttype": 42, "ps.fonttype": 42, "font.family": "DejaVu Sans",
}
FP32_COLOR = "#c0392b"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    # no Software/date metadata: the same card gives the same bytes on the same matplotlib
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bits_color(bits: Optional[float]):
    """FP32 red; otherwise a viridis shade by log2(bits) over 1..16 bits (fewer bits = darker)."""
    if bits is None:
        return FP32_COLOR
    import matplotlib
    pos = min(1.0, max(0.0, math.log2(max(bits, 1.0)) / 4.0))
    return matplotlib.colormaps["viridis"](0.1 + 0.8 * pos)


# ---------------------------------------------------------------------------
# single-card plots
# ---------------------------------------------------------------------------

def accuracy_plot(card: Dict[str, Any]):
    r = card["results"]
    groups = [(r.get("metric", "top1"), r.get("fp32"), r.get("quantized"), r.get("std")),
              ("top5", r.get("top5_fp32"), r.get("top5"), None)]
    groups = [g for g in groups if g[1] is not None or g[2] is not None]
    if not groups:
        return None
    label = card["method"].get("label") or card["method"]["name"]
    fig = _figure(5.2, 2.9)
    ax = fig.add_subplot()
    width = 0.36
    for i, (metric, fp32, quant, std) in enumerate(groups):
        for j, (value, color, name) in enumerate(((fp32, "#7f7f7f", "FP32 (this run)"), (quant, "#1f77b4", label))):
            if value is None:
                continue
            x = i + (j - 0.5) * width
            ax.bar(x, value, width, color=color, label=name if i == 0 else None,
                   yerr=std if (j == 1 and std) else None, capsize=3)
            ax.annotate(f"{value:.2f}", (x, value), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    lo = min(v for g in groups for v in (g[1], g[2]) if v is not None)
    ax.set_ylim(max(0.0, lo - 10), 100 if lo > 50 else None)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return fig


def layer_cost_plot(card: Dict[str, Any]):
    layers = [l for l in card["cost"].get("layers") or [] if l.get("bops") is not None]
    if not layers:
        return None, "", False
    note = ""
    if len(layers) > MAX_LAYERS:
        keep = {id(l) for l in sorted(layers, key=lambda l: -l["bops"])[:MAX_LAYERS]}
        note = f" ({MAX_LAYERS} of {len(layers)} layers: those with the largest BOPs)"
        layers = [l for l in layers if id(l) in keep]
    has_energy = any(l.get("energy_pj") is not None for l in layers)
    fig = _figure(7.6 if has_energy else 5.6, min(14.0, 0.9 + 0.2 * len(layers)))
    axes = fig.subplots(1, 2, sharey=True) if has_energy else [fig.add_subplot()]
    names = [f"{l['name']} (W{_b(l.get('weight_bits'))}/A{_b(l.get('activation_bits'))})" for l in layers]
    y = list(range(len(layers)))
    colors = [_bits_color(l.get("weight_bits")) for l in layers]
    axes[0].barh(y, [l["bops"] for l in layers], color=colors)
    axes[0].set_xlabel("BOPs")
    axes[0].set_xscale("log")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    if has_energy:
        axes[1].barh(y, [(l.get("energy_pj") or 0) * 1e-6 for l in layers], color=colors)
        axes[1].set_xlabel(f"energy (µJ, profile {card['cost'].get('profile')})")
    from matplotlib.patches import Patch
    bits = sorted({l.get("weight_bits") for l in layers}, key=lambda b: (b is not None, b or 0))
    fig.legend(handles=[Patch(color=_bits_color(b), label="FP32" if b is None else f"W{_b(b)}") for b in bits],
               loc="outside lower center", ncol=min(8, len(bits)), frameon=False)
    return fig, note, has_energy


def _b(v: Optional[float]) -> str:
    return "FP32" if v is None else f"{v:g}"


# ---------------------------------------------------------------------------
# a method's plots: its sections of kind "plot" (qcard.cards.schema.PlotSection), drawn by chart kind
# ---------------------------------------------------------------------------

def _segment_color(seg: Dict[str, Any]):
    if seg.get("color"):
        return seg["color"]
    if seg.get("shade") is not None:
        import matplotlib
        return matplotlib.colormaps["viridis"](float(seg["shade"]))
    return None


def stacked_bars(spec: Dict[str, Any]):
    """One horizontal bar per label, made of the segments' values, left to right."""
    labels = list(spec.get("labels") or [])
    segments = [s for s in spec.get("segments") or [] if len(s.get("values") or []) == len(labels)]
    if not labels or not segments:
        return None
    fig = _figure(7.0, min(12.0, 1.3 + 0.22 * len(labels)))
    ax = fig.add_subplot()
    y = list(range(len(labels)))
    left = [0.0] * len(labels)
    for seg in segments:
        ax.barh(y, seg["values"], left=left, color=_segment_color(seg), label=seg["label"])
        left = [a + b for a, b in zip(left, seg["values"])]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    if spec.get("x_range"):
        ax.set_xlim(*spec["x_range"])
    if spec.get("x_label"):
        ax.set_xlabel(spec["x_label"])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(labels) > 3 else -0.3), ncol=4, frameon=False)
    return fig


def step_heatmap(spec: Dict[str, Any]):
    """Rows x time heat map: each series' value holds from its x until its next x."""
    series = [(s["name"], list(s["x"]), list(s["y"])) for s in spec.get("series") or [] if s.get("x")]
    if not series:
        return None
    grid = sorted({x for _, xs, _ in series for x in xs})
    if len(grid) > 400:   # long step-level traces: sample 400 points
        grid = [grid[int(i * (len(grid) - 1) / 399)] for i in range(400)]
    import bisect
    rows = []
    for _, xs, ys in series:
        row = []
        for g in grid:
            i = bisect.bisect_right(xs, g) - 1
            row.append(ys[i] if i >= 0 else math.nan)
        rows.append(row)
    fig = _figure(min(9.0, 2.6 + 0.32 * len(grid)), min(12.0, 1.2 + 0.28 * len(series)))
    ax = fig.add_subplot()
    im = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(series)), [n for n, _, _ in series])
    step = max(1, len(grid) // 12)
    ax.set_xticks(range(0, len(grid), step), [f"{grid[i]:g}" for i in range(0, len(grid), step)])
    ax.set_xlabel(spec.get("x_label") or "")
    if len(grid) * len(series) <= 500:
        lo = min(v for r in rows for v in r if not math.isnan(v))
        hi = max(v for r in rows for v in r if not math.isnan(v))
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7,
                            color="white" if hi == lo or (v - lo) / (hi - lo) < 0.6 else "black")
    fig.colorbar(im, ax=ax, label=spec.get("value_label") or "", shrink=0.9)
    return fig


def lines(spec: Dict[str, Any]):
    """One line per series over x."""
    series = [s for s in spec.get("series") or [] if s.get("x")]
    if not series:
        return None
    fig = _figure(5.6, 2.9)
    ax = fig.add_subplot()
    for s in series:
        ax.plot(s["x"], s["y"], marker="o", markersize=2.5, label=s["name"])
    ax.set_xlabel(spec.get("x_label") or "")
    ax.set_ylabel(spec.get("y_label") or "")
    if len(series) > 1:
        ax.legend(frameon=False)
    return fig


CHARTS = {"stacked_bars": stacked_bars, "step_heatmap": step_heatmap, "lines": lines}


def section_plot(spec: Dict[str, Any]):
    """The figure of one plot section (None when it has nothing to draw)."""
    draw = CHARTS.get(spec.get("chart"))
    return draw(spec) if draw else None


def _points(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(p, dict) for p in v)


def _curve(card: Dict[str, Any]) -> Tuple[Optional[List[Dict[str, Any]]], bool]:
    """(curve, by_step): the step-level curve where it has more points than the per-epoch one."""
    stats = card.get("method_stats") or {}
    candidates = [stats.get("training")] + [v for k, v in stats.items() if k != "training"]
    for block in candidates:
        if isinstance(block, dict) and _points(block.get("curve")):
            steps = block.get("step_curve")
            if _points(steps) and len(steps) > len(block["curve"]) and all("step" in p for p in steps):
                return steps, True
            return block["curve"], False
    return None, False


def training_plot(card: Dict[str, Any]):
    curve, by_step = _curve(card)
    if not curve:
        return None
    if by_step:
        xkey = "step"
    else:
        xkey = "epoch" if all("epoch" in p for p in curve) else ("step" if all("step" in p for p in curve) else None)
    xs = [p[xkey] for p in curve] if xkey else list(range(len(curve)))
    names: List[str] = []
    for p in curve:
        for k, v in p.items():
            if k not in (xkey, "epoch", "step", "epoch_progress") and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    panels = {"loss": [n for n in names if "loss" in n.lower()],
              "accuracy (%)": [n for n in names if "loss" not in n.lower() and any(t in n.lower() for t in ("top1", "top5", "acc"))]}
    # the rest (learning rate, mean bits, ...) differ in scale: one panel each, at most 3
    for n in [n for n in names if n not in panels["loss"] and n not in panels["accuracy (%)"]][:3]:
        panels[n] = [n]
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    fig = _figure(3.0 * len(panels) + 0.6, 2.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels.items()):
        for k in keys:
            pts = [(x, p.get(k)) for x, p in zip(xs, curve) if isinstance(p.get(k), (int, float))]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", markersize=2.5, label=k)
        ax.set_xlabel(xkey or "point")
        ax.set_title(title)
        if len(keys) > 1 or title != keys[0]:
            ax.legend(frameon=False)
    return fig


def card_plots(card: Dict[str, Any]) -> List[Dict[str, str]]:
    """The HTML card's figures: [{id, title, caption, src (a data: URI), alt}] for the keys present."""
    out: List[Dict[str, str]] = []
    import matplotlib
    with matplotlib.rc_context(STYLE):
        r = card["results"]
        fig = accuracy_plot(card)
        if fig is not None:
            out.append({"id": "plot-accuracy", "title": "Accuracy",
                        "caption": f"{r.get('metric', 'top1')}: FP32 baseline of this run vs quantized"
                                   + (f" (mean ± std over {r.get('n_runs')} runs)" if r.get("std") else ""),
                        "src": _png_data_uri(fig)})
        fig, note, energy = layer_cost_plot(card)
        if fig is not None:
            what = "BOPs (log scale) and energy" if energy else "BOPs (log scale)"
            out.append({"id": "plot-layer-cost", "title": "Cost per layer",
                        "caption": f"{what} per layer, profile {card['cost'].get('profile')}, colored by weight bits; "
                                   f"red = left in FP32{note}", "src": _png_data_uri(fig)})
        for spec in card.get("sections") or []:
            fig = section_plot(spec) if spec.get("kind") == "plot" else None
            if fig is not None:
                out.append({"id": spec["id"], "title": spec["title"], "caption": spec.get("caption") or "",
                            "src": _png_data_uri(fig)})
        fig = training_plot(card)
        if fig is not None:
            out.append({"id": "plot-training", "title": "Training curve", "src": _png_data_uri(fig),
                        "caption": "method_stats.training.curve (step_curve where it has more points)"})
    for p in out:
        p["alt"] = p["title"] + ": " + p["caption"]
    return out


# ---------------------------------------------------------------------------
# comparison plot
# ---------------------------------------------------------------------------

def pareto_plot(points: Sequence[Dict[str, Any]], front: Iterable[int], x_label: str, path: Path,
                title: str = "") -> List[Path]:
    """Accuracy against one cost axis; the Pareto front joined by a line. Writes PATH.png and PATH.pdf
    (TrueType fonts embedded: pdf.fonttype 42) and returns both paths.
    points: [{"label", "x", "y", "err" (optional)}]; front: indices into points."""
    import matplotlib
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".pdf") else path
    outputs = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    front = sorted(set(front), key=lambda i: points[i]["x"])
    with matplotlib.rc_context(STYLE):
        fig = _figure(6.0, 4.0)
        ax = fig.add_subplot()
        on = set(front)
        for i, p in enumerate(points):
            ax.errorbar(p["x"], p["y"], yerr=p.get("err") or None, fmt="o",
                        color="#1f77b4" if i in on else "#9e9e9e", markersize=6 if i in on else 5, capsize=2,
                        zorder=3 if i in on else 2)
            if len(points) <= 40:
                ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if front:
            # the front as a staircase: each point holds its accuracy until the next cheaper-is-worse point
            ax.step([points[i]["x"] for i in front], [points[i]["y"] for i in front], where="post", color="#1f77b4",
                    linewidth=1.2, marker="o", markersize=6, label=f"Pareto front ({len(front)} of {len(points)})")
            ax.legend(loc="best")
        xs = [p["x"] for p in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            from matplotlib.ticker import EngFormatter
            ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy (%)")
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(outputs[0], dpi=150, metadata={"Software": None})
        fig.savefig(outputs[1], metadata={"Creator": "qcard", "Producer": None, "CreationDate": None})
    return outputs
