"""Card renderings (Markdown, HTML, LaTeX) against golden files, escaping of hostile strings, and
`qcard render`.

Golden files live in tests/fixtures/cards/golden/<fixture>.<md|html|tex>. After an intended change
to a template or to the formatting, regenerate them and review the diff:

    QCARD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_cards_render.py

Embedded plots (base64 PNG) are not byte-stable across matplotlib versions, so the HTML golden
comparison masks every plot payload; separate tests check that the plots are there and are PNGs.
The fixtures themselves are made by tests/fixtures/cards/make_fixtures.py.
"""
import base64
import copy
import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cards.render import card_view, render_card, tex_escape
from qcard.cards.schema import card_from_dict, load_card
from qcard.cli import main
from qcard.errors import QcardError
from qcard.methods import with_sections

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
GOLDEN = FIXTURES / "golden"
NAMES = ["ptq_w4a8_resnet18", "sparq_resnet18", "marvin_resnet8"]
UPDATE = os.environ.get("QCARD_UPDATE_GOLDEN") == "1"
PLOT_RE = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
HOSTILE = "<script>alert(1)</script> 50%_{x}&y $#^~\\"


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def html_of(name):
    """HTML of a fixture, rendered once per test session (matplotlib takes about a second per card)."""
    return render_card(with_sections(load_card(FIXTURES / f"{name}.json")), "html")


def mask(html: str) -> str:
    return PLOT_RE.sub("data:image/png;base64,<PLOT>", html)


def check_golden(text: str, path: Path):
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"missing golden file {path}; create it with QCARD_UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{path.name} differs from the golden file (QCARD_UPDATE_GOLDEN=1 regenerates it)"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_golden_text_formats(name, fmt):
    check_golden(render_card(with_sections(load_card(FIXTURES / f"{name}.json")), fmt), GOLDEN / f"{name}.{fmt}")


@pytest.mark.parametrize("name", NAMES)
def test_golden_html_with_plots_masked(name):
    check_golden(mask(html_of(name)), GOLDEN / f"{name}.html")


def _plots(html):
    """{figure id: decoded PNG bytes} of the embedded plots."""
    out = {}
    for m in re.finditer(r'<figure id="([^"]+)">.*?src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html, re.S):
        out[m.group(1)] = base64.b64decode(m.group(2))
    return out


def test_html_plots_present_for_the_keys_present():
    plots = _plots(html_of("sparq_resnet18"))
    assert set(plots) == {"plot-accuracy", "plot-layer-cost", "plot-sparq"}
    for png in plots.values():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    plots = _plots(html_of("marvin_resnet8"))
    assert set(plots) == {"plot-accuracy", "plot-layer-cost", "plot-marvin", "plot-training"}
    # the PTQ card has no SPARQ/MARViN/training statistics: none of those plots
    plots = _plots(html_of("ptq_w4a8_resnet18"))
    assert set(plots) == {"plot-accuracy", "plot-layer-cost"}


def test_method_stats_key_variants_are_read():
    from qcard.cards.plots import training_plot
    from qcard.methods.marvin.card import trajectory_plot
    from qcard.methods.sparq.card import window_plot
    marvin_plot = lambda card: trajectory_plot(card["method_stats"])      # noqa: E731 (the methods' plot specs)
    sparq_plot = lambda card: window_plot(card["method_stats"])            # noqa: E731
    card = fixture("marvin_resnet8")
    # MARViN: plain per-epoch lists; QAT: a curve under another key; SPARQ: window_histogram synonym
    card["method_stats"] = {
        "marvin": {"trajectories": {"conv1": [8, 8, 7, 6], "fc": [8, 9, 9, 9]}},
        "qat": {"curve": [{"epoch": 0, "train_loss": 1.0, "val_top1": 50.0}, {"epoch": 1, "train_loss": 0.5, "val_top1": 80.0}]},
        "sparq": {"bits": 4, "layers": [{"name": "l1", "window_histogram": {"7": 5, "3": 10, "zero": 4}}]},
    }
    assert marvin_plot(card) is not None and training_plot(card) is not None and sparq_plot(card) is not None
    card["method_stats"] = {"marvin": {"trajectories": "not a dict"}, "sparq": {"layers": [{"name": "x"}]}}
    assert marvin_plot(card) is None and sparq_plot(card) is None and training_plot(card) is None


def test_html_is_self_contained():
    html = html_of("sparq_resnet18")
    no_payload = mask(html)
    # nothing fetched from anywhere: no external URLs in src/href/url(), no scripts, a CSP that forbids both
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", no_payload)
    assert "url(" not in no_payload and "<script" not in no_payload and "@import" not in no_payload
    assert "default-src 'none'" in html


def test_hardware_unfriendly_flagged_in_every_format():
    card = fixture("ptq_w4a8_resnet18")
    flag = "residual adds unquantized (gemm_inputs_only)"
    md = render_card(card, "md")
    assert "**⚠ Hardware-unfriendly choices:**" in md and flag in md
    html = html_of("ptq_w4a8_resnet18")
    assert 'id="hardware-unfriendly"' in html and f"<li>⚠ {flag}</li>" in html
    tex = render_card(card, "tex")
    assert r"\textbf{Hardware-unfriendly choices}" in tex
    assert r"\textbf{residual adds unquantized (gemm\_inputs\_only)}" in tex
    # and unquantized layers are marked in the per-layer table of each format
    assert "| `conv1` ⚠ FP32 |" in md
    assert '<tr class="fp32"><td><code>conv1</code> <span class="badge">FP32</span>' in html
    assert r"\texttt{conv1} \textbf{!}" in tex


def hostile_card():
    card = fixture("ptq_w4a8_resnet18")
    card["model"]["ref"] = HOSTILE
    card["experiment"] = HOSTILE
    card["method"]["label"] = HOSTILE
    card["method"]["pipeline"].append(HOSTILE)
    card["quantization"]["hardware_unfriendly"].append(HOSTILE)
    card["quantization"]["unquantized_layers"][0]["name"] = HOSTILE
    card["cost"]["layers"][0]["name"] = HOSTILE
    card["warnings"].append(HOSTILE)
    card["reproduce"] = HOSTILE
    card["method_stats"] = {HOSTILE: {HOSTILE: HOSTILE}}
    return card


def test_html_escapes_hostile_strings():
    html = render_card(hostile_card(), "html")
    assert "<script>" not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; 50%_{x}&amp;y" in html


def _tex_text_is_safe(tex: str):
    """Every special character in the hostile string arrives escaped (narrow columns may break it after _ / . :)."""
    tex = tex.replace("\\allowbreak{}", "")
    escaped = (r"\textless{}script\textgreater{}alert(1)\textless{}/script\textgreater{} "
               r"50\%\_\{x\}\&y \$\#\textasciicircum{}\textasciitilde{}\textbackslash{}")
    assert escaped in tex
    # every place the hostile text reaches (title, comment lines, tables, ...) carries the escaped form
    assert tex.count("alert(1)") == tex.count(escaped) > 3


def test_latex_escapes_every_special_character():
    tex = render_card(hostile_card(), "tex")
    _tex_text_is_safe(tex)
    assert tex_escape("a_b%c") == r"a\_b\%c" and tex_escape(None) == "---"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (apt-get install texlive-latex-recommended)")
def test_latex_fragment_compiles(tmp_path):
    body = render_card(hostile_card(), "tex") + "\n" + render_card(fixture("sparq_resnet18"), "tex")
    doc = ("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n\\usepackage{booktabs,graphicx}\n"
           "\\begin{document}\n\\tiny\n" + body + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_markdown_escapes_hostile_strings():
    md = render_card(hostile_card(), "md")
    assert r"\<script\>alert(1)\</script\>" in md
    # raw HTML only inside code spans (CommonMark shows code spans literally) or the fenced block
    body = md.split("```")[0] + md.split("```")[-1]
    outside = re.sub(r"``.*?``|`[^`\n]*`", "", body)
    assert "<script>" not in outside


def test_render_accepts_a_dict_and_validates_it():
    d = fixture("ptq_w4a8_resnet18")
    assert render_card(d, "md") == render_card(card_from_dict(d), "md")
    bad = copy.deepcopy(d)
    del bad["results"]
    with pytest.raises(QcardError, match="results"):
        render_card(bad, "md")
    with pytest.raises(QcardError, match="allowed: md, html, tex"):
        render_card(d, "pdf")


def test_failed_card_renders_in_every_format():
    d = fixture("ptq_w4a8_resnet18")
    d.update(status="failed", error="CUDA out of memory <b>", cost={}, method_stats={},
             results={"metric": "top1", "seeds": [0]})
    md = render_card(d, "md")
    assert "**This point FAILED:** CUDA out of memory \\<b\\>" in md and "## Cost" not in md
    html = render_card(d, "html")
    assert 'id="failed"' in html and "CUDA out of memory &lt;b&gt;" in html
    assert "plot-accuracy" not in html
    assert r"\textbf{FAILED:} CUDA out of memory \textless{}b\textgreater{}" in render_card(d, "tex")


def test_view_columns_follow_the_data():
    v = card_view(load_card(FIXTURES / "marvin_resnet8.json").model_dump(mode="json"))
    heads = [h for h, _ in v["layer_cols"]]
    assert "energy" not in heads and "cycles" not in heads   # the bitops profile has neither
    v = card_view(load_card(FIXTURES / "sparq_resnet18.json").model_dump(mode="json"))
    assert "eff. A bits" in [h for h, _ in v["layer_cols"]]


# ---------------------------------------------------------------------------
# qcard render
# ---------------------------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_render_stdout_and_out(tmp_path):
    r = run_cli("render", FIXTURES / "ptq_w4a8_resnet18.json")
    assert r.exit_code == 0, r.output
    assert r.output == render_card(fixture("ptq_w4a8_resnet18"), "md")
    # a run folder: OUT/EXPERIMENT/<point>/card.json -> DIR/<point>/card.tex
    runs = tmp_path / "runs" / "exp"
    for i, name in enumerate(NAMES[:2]):
        (runs / f"p{i}").mkdir(parents=True)
        shutil.copy(FIXTURES / f"{name}.json", runs / f"p{i}" / "card.json")
    r = run_cli("render", runs, "--format", "tex", "--out", tmp_path / "site")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "site" / "p0" / "card.tex").read_text() == render_card(fixture(NAMES[0]), "tex")
    assert (tmp_path / "site" / "p1" / "card.tex").is_file()
    r = run_cli("render", runs / "p0" / "card.json", "--format", "html", "--out", tmp_path / "one")
    assert r.exit_code == 0 and (tmp_path / "one" / "card.html").read_text().startswith("<!DOCTYPE html>")


def test_cli_render_errors_exit_2(tmp_path):
    r = run_cli("render", tmp_path / "missing.json")
    assert r.exit_code == 2 and "no such card file" in r.output
    (tmp_path / "bad.json").write_text("{not json")
    r = run_cli("render", tmp_path / "bad.json")
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = run_cli("render", FIXTURES / "ptq_w4a8_resnet18.json", FIXTURES / "sparq_resnet18.json", "--format", "html")
    assert r.exit_code == 2 and "--out" in r.output


def fp32_card():
    from qcard.cards.schema import unquantized_block
    d = fixture("ptq_w4a8_resnet18")
    d.update(quantization=unquantized_block(), method={"name": "fp32", "family": "none", "params": {},
                                                             "pipeline": [], "label": "fp32"},
             method_stats={}, warnings=[], cost_profiles={})
    d["dataset"]["calibration"] = None
    d["results"].update(quantized=69.758, delta=0.0, std=None, n_runs=1, seeds=[0])
    d["cost"] = {"profile": "bitops", "bops": 1.857e12, "size_bits": 374064384.0, "macs": 1814073344}
    return d


@pytest.mark.parametrize("fmt", ["md", "tex", "html"])
def test_fp32_baseline_card_renders(fmt):
    text = render_card(fp32_card(), fmt)
    assert "FP32" in text and "none used" in text
    if fmt == "md":
        assert "| bits | FP32 | FP32 |" in text and "Per-layer" not in text


# ---------------------------------------------------------------- method tables from real cards

QUICKSTART = Path(__file__).resolve().parent.parent / "cards" / "quickstart"


def _published(label: str, model: str = "resnet8"):
    paths = sorted(QUICKSTART.glob(f"{model}__{label}__*/card.json"))
    assert paths, f"no published {label} card under {QUICKSTART} (make cards)"
    return [json.loads(p.read_text()) for p in paths]


def test_marvin_card_tables_show_every_switch_with_step_and_epoch():
    from qcard.cards.method_tables import method_tables
    card = with_sections(_published("MARViN")[0])
    st = card["method_stats"]["marvin"]
    tables = {t["title"].split(" (")[0]: t for t in method_tables(card)}
    per_layer = tables["MARViN word lengths per layer"]
    assert [r[0] for r in per_layer["rows"]] == list(st["trajectories"])
    log = tables["MARViN precision switches"]
    assert len(log["rows"]) + log["left_out"] == len(st["switches"]) == st["switch_count"]
    first = st["switches"][0]
    assert log["rows"][0][0] == str(first["step"]) and log["rows"][0][2] == first["layer"]
    assert log["rows"][0][-1] == ("yes" if first["intra_epoch"] else "no")
    md = render_card(card, "md")
    assert "### MARViN precision switches" in md and "inside an epoch" in md
    assert "### Training curve" in md


def test_sparq_card_tables_show_per_layer_statistics_and_pe_comparison():
    from qcard.cards.method_tables import method_tables
    card = with_sections(next(c for c in _published("SPARQ-A4W8") if c["method"]["params"]["variant"] == "sparq"))
    st = card["method_stats"]["sparq"]
    tables = {t["title"].split(" (")[0]: t for t in method_tables(card)}
    layers = tables["SPARQ per-layer statistics"]
    assert [r[0] for r in layers["rows"]] == list(st["layers"])
    first = next(iter(st["layers"].values()))
    assert layers["rows"][0][2] == f"{100 * first['zero_fraction']:.1f}"
    costs = tables["SPARQ cost beside A8W8 and plain A4W8"]
    assert [r[0].split(" (")[0] for r in costs["rows"]] == ["A8W8", "plain A4W8", "SPARQ", "this run"]
    for fmt in ("md", "html", "tex"):
        assert "SPARQ per-layer statistics" in render_card(card, fmt)


def test_method_tables_never_break_a_card_on_odd_statistics():
    """A user's method may store anything under the known keys: the card still renders, with a note."""
    from qcard.cards.method_tables import method_tables
    card = fixture("sparq_resnet18")
    card["method_stats"] = {
        "sparq": {"layers": {"a": "not a dict"}, "cost_comparison": {"x": {"speedup_vs_a8w8": "fast"}}},
        "marvin": {"final": {"conv1": 8}, "switches": [{"layer": "conv1", "from": 8, "to": 9, "step": 3}]},
        "training": {"recipe": "sgd", "curve": [{"epoch": 1, "lr": [0.1, 0.01]}, "junk"]},
        "per_seed": [{"seed": 0, "x.y": 1.5}, {"seed": 1, "x.y": 2.5}], "stats_seed": 1,
    }
    card = with_sections(card)
    tables = method_tables(card)
    titles = [t["title"] for t in tables]
    assert any("not tabulated" in t["rows"][0][0] for t in tables if t["columns"] == [("note", "l")])
    assert "Per seed" in titles and "Training curve" in titles
    for fmt in ("md", "html", "tex"):
        render_card(card, fmt)


def test_long_training_curves_are_thinned_with_a_note():
    from qcard.cards.method_tables import MAX_ROWS, method_tables
    card = fixture("marvin_resnet8")
    card["method_stats"]["training"]["curve"] = [{"epoch": i, "step": 10 * i, "loss": 1.0 / (i + 1)}
                                                 for i in range(200)]
    (curve,) = [t for t in method_tables(card) if t["title"] == "Training curve"]
    assert len(curve["rows"]) <= MAX_ROWS and curve["rows"][-1][0] == "199"
    assert "of 200 points" in curve["note"]


def test_marvin_plot_runs_on_steps_so_switches_inside_an_epoch_show():
    from qcard.methods.marvin.card import trajectories
    _trajectories = lambda card: trajectories(card["method_stats"])      # noqa: E731
    card = {"method_stats": {"marvin": {"trajectories": {"conv1": [
        {"step": 0, "epoch": 1, "wl": 8}, {"step": 21, "epoch": 1, "wl": 15}, {"step": 42, "epoch": 1, "wl": 14}]}}}}
    x_name, series = _trajectories(card)
    assert x_name == "step"
    assert series == [("conv1", [0.0, 21.0, 42.0], [8.0, 15.0, 14.0])]


def test_cli_render_fills_sections_of_older_cards_from_the_method():
    """A card written before methods handed over their sections gets them from its method's protocol."""
    assert fixture("sparq_resnet18").get("sections") is None
    r = run_cli("render", FIXTURES / "sparq_resnet18.json")
    assert r.exit_code == 0, r.output
    assert "### SPARQ per-layer statistics" in r.output
    assert r.output == render_card(with_sections(fixture("sparq_resnet18")), "md")
    # cards/ alone renders what the card holds: no sections, no method tables
    assert "SPARQ per-layer statistics" not in render_card(fixture("sparq_resnet18"), "md")


def test_synthetic_data_and_warnings_are_in_the_top_banner_of_every_format():
    card = fixture("ptq_w4a8_resnet18")
    card["dataset"]["ref"] = "synthetic"
    card["warnings"] = ["12 attention block(s) left in FP32"]
    md = render_card(card, "md")
    banner = md.split("## Results")[0]
    assert "**⚠ Read first:**" in banner and "accuracy is meaningless" in banner and "12 attention" in banner
    html = render_card(card, "html").split("<h2>Results</h2>")[0]
    assert 'id="read-first"' in html and "accuracy is meaningless" in html and "12 attention" in html
    tex = render_card(card, "tex").split("Results (accuracy")[0]
    assert r"\textbf{Read first}" in tex and "accuracy is meaningless" in tex
    # the tie rule of top-1/top-5 is stated beside the results
    assert "lowest class index" in md
    plain = fixture("ptq_w4a8_resnet18")
    plain["warnings"] = []
    assert "Read first" not in render_card(plain, "md")
