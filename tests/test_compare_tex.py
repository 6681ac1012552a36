"""LaTeX that fits a paper (issue 25 item 1) and rows that say what differs (item 2).

`qcard compare --format tex` is a table float: the compact default fits a two-column paper's \\columnwidth,
`--columns` picks others, `--width \\textwidth` makes a table*; `qcard render --format tex` is a card as an
appendix page. Each is compiled in `\\documentclass[twocolumn]{article}`: zero "Overfull \\hbox" in the log,
and every card id in the PDF's text (pdftotext). Needs pdflatex and pdftotext (`make test` installs them
as root or in CI; elsewhere these tests skip, and in CI a skip is a failure)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import qcard
from qcard.cards.compare import compare_cards, load_cards
from qcard.cards.render import render_card
from qcard.cli import main
from qcard.errors import QcardError
from qcard.methods.base import Method, MethodParams, QuantResult
from user_methods import not_quantized

QUICKSTART = Path(__file__).resolve().parent.parent / "cards" / "quickstart"
needs_tex = pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("pdftotext") is None,
                               reason="pdflatex or pdftotext not installed: `make test` installs texlive-latex-base, "
                                      "texlive-latex-recommended and poppler-utils as root or in CI")


class Smooth(Method):
    """A user's method with one knob, swept in the test below; it leaves the model as it is."""
    name = "smooth"
    family = "other"

    class Params(MethodParams):
        alpha: float = 0.0

    def apply(self, model, data, params, ctx):
        return QuantResult(model=model, quantization=not_quantized(), pipeline=["smooth"], layers=[], stats={})


def compile_twocolumn(tmp_path: Path, body: str, name: str = "doc") -> str:
    """Compile `body` in a two-column article; returns the PDF's text, after checking the log has no
    Overfull \\hbox."""
    doc = ("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
           + body + "\n\\end{document}\n")
    (tmp_path / f"{name}.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"], cwd=tmp_path,
                       capture_output=True, text=True, errors="replace", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    log = (tmp_path / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    overfull = [l for l in log.splitlines() if l.startswith("Overfull \\hbox")]
    assert not overfull, "\n".join(overfull)
    text = subprocess.run(["pdftotext", "-layout", f"{name}.pdf", "-"], cwd=tmp_path, capture_output=True,
                          text=True, errors="replace", timeout=60, check=True).stdout
    return text


def quickstart(n=None):
    files = sorted(QUICKSTART.glob("*/card.json"))
    return load_cards(files[:n] if n else files)


@needs_tex
def test_compact_default_fits_a_column(tmp_path):
    cmp = compare_cards(quickstart(8))
    tex = cmp.export("tex")
    assert "\\begin{table}[tbp]" in tex and "\\resizebox{\\ifdim\\width>\\columnwidth" in tex
    assert "\\par\n" not in tex.split("\\end{tabular}}}")[0].split("\\begin{tabular}")[1]   # notes outside the box
    text = compile_twocolumn(tmp_path, tex)
    for r in cmp.rows:
        assert r.id[:10] in text, r.id
    assert "Card ids:" in text and "Confounding differences" in text


@needs_tex
def test_wide_selection_in_a_full_width_table(tmp_path):
    cmp = compare_cards(quickstart())
    cols = ["card", "model", "method", "label", "wa", "granularity", "bn", "first_last", "residual", "calibration",
            "fp32", "quantized", "delta", "vs_ref", "runtime", "bops", "size_bits", "speedup_vs_fp32", "profile"]
    tex = cmp.export("tex", columns=cols, width="\\textwidth")
    assert "\\begin{table*}" in tex and "\\end{table*}" in tex
    header = next(l for l in tex.splitlines() if l.startswith("card & model & method"))
    assert header.count("&") == len(cols) - 1
    text = compile_twocolumn(tmp_path, tex)
    for r in cmp.rows:
        assert r.id[:10] in text, r.id


def test_columns_and_width_are_checked():
    cmp = compare_cards(quickstart(3))
    with pytest.raises(QcardError, match="unknown column 'top5'; allowed: card, model"):
        cmp.export("tex", columns=["card", "top5"])
    with pytest.raises(QcardError, match="--width"):
        cmp.export("tex", width="\\input{/etc/passwd}")
    narrow = cmp.export("tex", columns=["label", "quantized"], width="0.5\\textwidth")
    assert "\\begin{table*}" in narrow and "label & quantized \\\\" in narrow


def test_cli_tex_options(tmp_path):
    r = CliRunner().invoke(main, ["compare", str(QUICKSTART), "--format", "tex", "--columns", "card,label,bops"])
    assert r.exit_code == 0, r.output
    assert "card & label & BOPs \\\\" in r.stdout
    r = CliRunner().invoke(main, ["compare", str(QUICKSTART), "--columns", "card"])
    assert r.exit_code == 2 and "--format tex only" in r.output
    r = CliRunner().invoke(main, ["compare", str(QUICKSTART), "--format", "tex", "--columns", "card,nope"])
    assert r.exit_code == 2 and "unknown column 'nope'" in r.output


@needs_tex
def test_card_as_an_appendix_page_fits(tmp_path):
    cards = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(QUICKSTART.glob("*/card.json"))]
    body = "\n\\clearpage\n".join(render_card(c, "tex") for c in cards)
    text = compile_twocolumn(tmp_path, body)
    for c in cards:
        assert c["id"][:16] in text.replace("\n", ""), c["id"]


@pytest.mark.slow
def test_swept_parameter_is_a_column_and_in_the_label(write_config, tmp_path):
    """A user method swept over alpha: [0.0, 0.1] gives two rows that say which is which."""
    cfg = write_config(f"""\
experiment: swept
out: {tmp_path / 'runs'}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 100, batch_size: 100, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
methods:
  - {{name: "test_compare_tex:Smooth", label: smooth, params: {{alpha: [0.0, 0.1]}}}}
""", "swept.yaml")
    assert qcard.run(cfg, progress=False).ok
    cmp = compare_cards(load_cards([tmp_path / "runs"]))
    assert cmp.params == ["alpha"]
    assert sorted(r.params["alpha"] for r in cmp.rows) == [0.0, 0.1] and all(r.swept == ["alpha"] for r in cmp.rows)
    md = cmp.to_markdown()
    header = next(l for l in md.splitlines() if l.startswith("| card |"))
    assert "| label | alpha |" in header
    assert "| smooth (alpha=0.0) | 0.0 |" in md and "| smooth (alpha=0.1) | 0.1 |" in md
    assert json.loads(cmp.to_json())["cards"][0]["params"]["alpha"] in (0.0, 0.1)      # raw, a number
    assert "param.alpha" in cmp.to_csv().splitlines()[0]
    tex = cmp.export("tex")
    assert "alpha=0.0" in tex and "alpha=0.1" in tex
    # rows of different labels are told apart by their labels: no column for what differs between them
    assert compare_cards([cmp.cards[0]]).params == []


def test_one_list_of_exporters_feeds_the_cli():
    from qcard.cards.compare import EXPORTERS
    from qcard.commands.compare import compare as command
    fmt = next(p for p in command.params if p.name == "fmt")
    assert list(fmt.type.choices) == list(EXPORTERS)
    for name in EXPORTERS:
        r = CliRunner().invoke(main, ["compare", str(QUICKSTART / next(QUICKSTART.glob("*/card.json")).parent.name),
                                      "--format", name])
        assert r.exit_code == 0 and r.stdout.strip(), (name, r.output)
    assert "<table class=\"compare\">" in CliRunner().invoke(main, ["compare", str(QUICKSTART), "--format", "html"]).stdout
