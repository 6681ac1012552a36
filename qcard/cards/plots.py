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


MAX_DISCRETE = 16     # at most this many distinct values get a colour each; more: a continuous scale


def _discrete_colors(values: Iterable[Optional[float]]) -> Optional[Dict[Optional[float], Any]]:
    """{value: colour}, one clearly different colour per distinct value (FP32/None red), ordered
    (fewer bits darker): 15 and 16 bits must not look alike, as they do on a log2 scale. None when
    there are too many distinct values to tell apart."""
    distinct = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    if len(distinct) > MAX_DISCRETE:
        return None
    import matplotlib
    cmap = matplotlib.colormaps["viridis" if len(distinct) <= 5 else "turbo"]
    n = len(distinct)
    colors: Dict[Optional[float], Any] = {v: cmap(0.1 + 0.8 * (i / (n - 1) if n > 1 else 0.5))
                                          for i, v in enumerate(distinct)}
    colors[None] = FP32_COLOR
    return colors


def _text_color(rgba) -> str:
    """Black or white, whichever reads better on a cell of this colour."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


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
    palette = _discrete_colors(l.get("weight_bits") for l in layers)
    color_of = (lambda b: palette[b]) if palette else _bits_color
    colors = [color_of(l.get("weight_bits")) for l in layers]
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
    fig.legend(handles=[Patch(color=color_of(b), label="FP32" if b is None else f"W{_b(b)}") for b in bits],
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
    values = sorted({v for r in rows for v in r if not math.isnan(v)})
    palette = _discrete_colors(values)
    if palette:
        # one colour per value (e.g. each word length), a colour bar with one band per value
        # cells hold the value's rank, so each value has an equal band on the colour bar
        from matplotlib.colors import BoundaryNorm, ListedColormap
        cmap = ListedColormap([palette[v] for v in values])
        rank = {v: k for k, v in enumerate(values)}
        ranked = [[math.nan if math.isnan(v) else rank[v] for v in r] for r in rows]
        im = ax.imshow(ranked, aspect="auto", cmap=cmap, norm=BoundaryNorm([k - 0.5 for k in range(len(values) + 1)],
                                                                           cmap.N), interpolation="nearest")
    else:
        im = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(series)), [n for n, _, _ in series])
    step = max(1, len(grid) // 12)
    ax.set_xticks(range(0, len(grid), step), [f"{grid[i]:g}" for i in range(0, len(grid), step)])
    ax.set_xlabel(spec.get("x_label") or "")
    if len(grid) * len(series) <= 500:
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                if not math.isnan(v):
                    cell = palette[v] if palette else im.cmap(im.norm(v))
                    ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color=_text_color(cell))
    bar = fig.colorbar(im, ax=ax, label=spec.get("value_label") or "", shrink=0.9)
    if palette:
        bar.set_ticks(range(len(values)), labels=[f"{v:g}" for v in values])
        bar.minorticks_off()
    return fig


def lines(spec: Dict[str, Any]):
    """One line per series over x."""
    series = [s for s in spec.get("series") or [] if s.get("x")]
    if not series:
        return None
    fig = _figure(5.6, 2.9)
    ax = fig.add_subplot()
    for k, s in enumerate(series):   # a marker and a line style each: series stay apart in grey print too
        ax.plot(s["x"], s["y"], marker=MARKERS[k % len(MARKERS)], linestyle=LINESTYLES[k % len(LINESTYLES)],
                markersize=3.5, markevery=max(1, len(s["x"]) // 25), label=s["name"])
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
        for n, k in enumerate(keys):
            pts = [(x, p.get(k)) for x, p in zip(xs, curve) if isinstance(p.get(k), (int, float))]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker=MARKERS[n % len(MARKERS)],
                    linestyle=LINESTYLES[n % len(LINESTYLES)], markersize=3, markevery=max(1, len(pts) // 25),
                    label=k)
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

def pareto_figure(points: Sequence[Dict[str, Any]], front: Iterable[int], x_label: str, title: str = ""):
    """(figure, label artists) of accuracy against one cost axis, the Pareto front as a staircase.
    points: [{"label", "x", "y", "ci" (optional: the 95 % interval (lo, hi), drawn as a vertical error bar),
    "err" (optional: ± std, drawn where there is no interval), "model" (optional: one marker shape per model)}];
    front: indices into points. Labels are placed where they overlap no other label or point."""
    front = sorted(set(front), key=lambda i: points[i]["x"])
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    on = set(front)
    models = list(dict.fromkeys(str(p.get("model") or "") for p in points))
    marker = {m: MARKERS[k % len(MARKERS)] for k, m in enumerate(models)}
    for i, p in enumerate(points):
        ax.errorbar(p["x"], p["y"], yerr=_yerr(p), fmt=marker[str(p.get("model") or "")],
                    color="#1f77b4" if i in on else "#9e9e9e", markersize=6.5 if i in on else 5.5, capsize=2,
                    zorder=3 if i in on else 2)
    handles = []
    if front:
        # the front as a staircase: each point holds its accuracy until the next cheaper-is-worse point
        (line,) = ax.step([points[i]["x"] for i in front], [points[i]["y"] for i in front], where="post",
                          color="#1f77b4", linewidth=1.2, zorder=1, label=f"Pareto front ({len(front)} of {len(points)})")
        handles.append(line)
    if len(models) > 1:
        from matplotlib.lines import Line2D
        handles += [Line2D([], [], linestyle="", marker=marker[m], color="#555555", label=m) for m in models]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=7)
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
    labels = _place_labels(fig, ax, points) if len(points) <= 40 else []
    return fig, labels


def _yerr(p: Dict[str, Any]):
    """The interval (lo, hi) as asymmetric error-bar lengths around y (never negative: a mean over seeds may
    sit outside a pooled interval), else ± err, else None."""
    if p.get("ci"):
        lo, hi = p["ci"]
        return [[max(0.0, p["y"] - lo)], [max(0.0, hi - p["y"])]]
    return p.get("err") or None


# label offsets tried in turn (points from the marker): beside it first, then further away with a leader line
_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (0, 8), (0, -15)] + \
    [(dx * r, dy * r) for r in (2, 3, 4, 5, 6, 8) for dx, dy in ((6, 4), (6, -6), (-6, 4), (-6, -6), (0, 6), (0, -7))]


def _annotate(ax, p: Dict[str, Any], dx: float, dy: float, leader: bool):
    """The point's label at (dx, dy) points from its marker; a leader line when it sits away from it."""
    return ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                       ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                       arrowprops={"arrowstyle": "-", "color": "#757575", "lw": 0.6, "shrinkA": 1,
                                   "shrinkB": 4} if leader else None)


def _place_labels(fig, ax, points: Sequence[Dict[str, Any]]) -> List[Any]:
    """Annotate each point where its label overlaps no label placed before it, no marker and stays inside
    the axes (greedy, most accurate points first). The layout is fixed first, so the positions hold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)                           # a renderer to measure the labels with
    fig.canvas.draw()                              # the constrained layout settles the axes here
    fig.set_layout_engine("none")                  # ... and labels placed now do not move it again
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    scale = fig.dpi / 72.0
    marker_boxes = []
    for p in points:
        px, py = to_px((p["x"], p["y"]))
        # a label keeps clear of other markers by about a marker's width, so it reads as its own point's
        marker_boxes.append((px - 8 * scale, py - 8 * scale, px + 8 * scale, py + 8 * scale))
    frame = ax.get_window_extent(renderer)
    taken: List[Tuple[float, float, float, float]] = []
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        taken.append((lb.x0, lb.y0, lb.x1, lb.y1))
    out = []
    for i in sorted(range(len(points)), key=lambda i: (-points[i]["y"], points[i]["x"])):
        p = points[i]
        best, fallback = None, None          # fallback: inside the axes and clear of every label, near a marker
        for dx, dy in _OFFSETS:
            # away from the usual place: a leader line says whose it is
            ann = _annotate(ax, p, dx, dy, leader=(dx, dy) != _OFFSETS[0])
            bb = ann.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            inside = bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1
            on_label = any(_overlap(box, t) for t in taken)
            clash = on_label or any(_overlap(box, m) for j, m in enumerate(marker_boxes) if j != i)
            if inside and not clash:
                best = (ann, box)
                break
            if inside and not on_label and fallback is None:
                fallback = (dx, dy)
            ann.remove()
        if best is None and fallback is not None:     # labels never overlap; a marker may be covered
            ann = _annotate(ax, p, *fallback, leader=True)
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1))
        if best is None:    # nowhere free: the first place beside the point (a crowded plot)
            ann = _annotate(ax, p, *_OFFSETS[0], leader=False)
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        taken.append(best[1])
        out.append(best[0])
    return out


def _overlap(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def pareto_plot(points: Sequence[Dict[str, Any]], front: Iterable[int], x_label: str, path: Path,
                title: str = "") -> List[Path]:
    """Accuracy against one cost axis; the Pareto front joined by a line. Writes PATH.png, PATH.pdf
    (TrueType fonts embedded: pdf.fonttype 42) and PATH.svg (for web pages: `qcard site`), and returns the
    three paths in that order. Arguments as pareto_figure."""
    import matplotlib
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".pdf", ".svg") else path
    outputs = [stem.with_name(stem.name + ext) for ext in (".png", ".pdf", ".svg")]
    # svg.hashsalt: the SVG's element ids from a fixed salt, so the same plot writes the same bytes
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": "qcard"}):
        fig, _ = pareto_figure(points, front, x_label, title)
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        # the PNG at the figure's own dpi: labels were placed in its pixels (the PDF scales as a whole)
        fig.savefig(outputs[0], dpi=DPI * 1.5, metadata={"Software": None})
        fig.savefig(outputs[1], metadata={"Creator": "qcard", "Producer": None, "CreationDate": None})
        fig.savefig(outputs[2], metadata={"Creator": "qcard", "Date": None})
    return outputs
