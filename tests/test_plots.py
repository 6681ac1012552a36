"""Readable plots (issue 15 item 18): Pareto labels that do not overlap, a marker per model, and
chart kinds that tell their series and values apart (the MARViN word-length chart: 15 vs 16 bits)."""
import json
from pathlib import Path

import matplotlib
import pytest

from qcard.cards.compare import compare_cards, load_cards
from qcard.cards.plots import STYLE, _overlap, lines, pareto_figure, step_heatmap
from qcard.methods import with_sections

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "cards"


def quickstart_points():
    cmp = compare_cards(load_cards([ROOT / "cards" / "quickstart"]))
    ok = [i for i, r in enumerate(cmp.rows) if r["status"] == "ok"]
    points = [{"label": f"{cmp.rows[i]['card']} {cmp.rows[i]['label']}", "x": float(cmp.rows[i]["bops"]),
               "y": float(cmp.rows[i]["quantized"]), "model": cmp.rows[i]["model"]} for i in ok]
    return points, [ok.index(i) for i in cmp.pareto if i in ok]


def boxes(fig, artists):
    r = fig.canvas.get_renderer()
    return [tuple(a.get_window_extent(r).bounds) for a in artists]


def test_pareto_labels_do_not_overlap_and_models_get_markers():
    points, front = quickstart_points()
    with matplotlib.rc_context(STYLE):
        fig, labels = pareto_figure(points, front, "BOPs")
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ext = [a.get_window_extent(r) for a in labels]
        assert len(ext) == len(points) == 16
        b = [(e.x0, e.y0, e.x1, e.y1) for e in ext]
        clashes = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(b)) for j in range(i + 1, len(b))
                   if _overlap(b[i], b[j])]
        assert clashes == []                       # G W8A8 and J QAT-W4A4 overlapped before
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sorted(legend[1:]) == ["qcard:mobilenet_tiny", "qcard:resnet8"]   # in the rows' order
        shapes = {h.get_marker() for h in ax.get_legend().legend_handles[1:]}
        assert len(shapes) == 2
        lb = ax.get_legend().get_window_extent(r)
        assert not any(_overlap(x, (lb.x0, lb.y0, lb.x1, lb.y1)) for x in b)


def test_word_lengths_each_get_their_own_colour():
    path = ROOT / "cards" / "quickstart" / "resnet8__MARViN__81a30fc272" / "card.json"
    card = with_sections(json.loads(path.read_text()))
    (spec,) = [s for s in card["sections"] if s["kind"] == "plot" and s["chart"] == "step_heatmap"]
    values = sorted({v for s in spec["series"] for v in s["y"]})
    assert {15, 16} <= set(values)
    with matplotlib.rc_context(STYLE):
        fig = step_heatmap(spec)
    im = fig.axes[0].get_images()[0]
    colours = [im.cmap(im.norm(k)) for k in range(len(values))]      # cells hold each value's rank
    assert im.cmap.N == len(values) and len(set(colours)) == len(values)
    c15, c16 = colours[values.index(15)], colours[values.index(16)]
    bar = fig.axes[1]
    assert [t.get_text() for t in bar.get_yticklabels()] == [f"{v:g}" for v in values]
    assert sum(abs(a - b) for a, b in zip(c15[:3], c16[:3])) > 0.15      # not two shades of one green


def test_lines_differ_in_marker_and_style():
    spec = {"series": [{"name": n, "x": [0, 1, 2], "y": [k, k + 1, k]} for k, n in enumerate("abcde")]}
    with matplotlib.rc_context(STYLE):
        fig = lines(spec)
    drawn = fig.axes[0].get_lines()
    assert len({(l.get_marker(), l.get_linestyle()) for l in drawn}) == 5


def test_pareto_plot_draws_intervals_as_vertical_error_bars():
    """Issue 13 item 3: results.ci95 drawn as an asymmetric error bar; a point without one has none."""
    points = [{"label": "A", "x": 1.0, "y": 98.4, "ci": (97.6, 99.0)},
              {"label": "B", "x": 2.0, "y": 99.0, "err": 0.2},
              {"label": "C", "x": 3.0, "y": 99.2}]
    with matplotlib.rc_context(STYLE):
        fig, _ = pareto_figure(points, [0, 1, 2], "BOPs")
    bars = fig.axes[0].containers
    assert [c.has_yerr for c in bars] == [True, True, False]
    (seg,) = bars[0].lines[2][0].get_segments()            # the vertical bar of A: from lo to hi
    assert seg[0][1] == pytest.approx(97.6) and seg[1][1] == pytest.approx(99.0)
    (seg,) = bars[1].lines[2][0].get_segments()            # B: ± std where there is no interval
    assert seg[0][1] == pytest.approx(98.8) and seg[1][1] == pytest.approx(99.2)
