"""The LaTeX outputs compile (issue 15 item 19): a card (`qcard render --format tex`) and a comparison
table (`qcard compare --format tex`), both with hostile labels (every LaTeX special character, unicode),
each \\input-able into a minimal document that loads booktabs only, as their header says.

Needs pdflatex. `make test` installs it where it can (as root, or in CI); a run without it skips these
tests with the reason, and in CI (CI=true) conftest turns that skip into a failure."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qcard.cards.compare import compare_cards
from qcard.cards.render import render_card, tex_escape
from qcard.cards.tex_unicode import TEX_SYMBOLS

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
SPECIALS = "\\ { } $ & # ^ _ ~ % < > | \" ' ` -- [x] {}"
UNICODE = "Grüße façade naïve Ångström — ± Δ µ → ≤ ≥ × · … 量化 ∑ ✓ ✗ 😀 ⚠️ α ą ǖ € \u00a0 \t \x07 \u200d"
HOSTILE = f"{SPECIALS} {UNICODE}\n%\\end{{document}}"

needs_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                    reason="pdflatex not installed: `make test` installs texlive-latex-base and "
                                           "texlive-latex-recommended as root or in CI")


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def hostile(card, i=0):
    card = json.loads(json.dumps(card))
    card["id"] = f"{i:064x}"
    card["model"]["ref"] = HOSTILE
    card["experiment"] = HOSTILE
    card["method"]["label"] = f"{HOSTILE} #{i}"
    card["method"]["pipeline"].append(HOSTILE)
    card["quantization"]["hardware_unfriendly"].append(HOSTILE)
    card["cost"]["profile"] = HOSTILE
    if card["cost"]["layers"]:
        card["cost"]["layers"][0]["name"] = HOSTILE
    card["warnings"].append(HOSTILE)
    card["reproduce"] = HOSTILE
    return card


def compile_doc(tmp_path, body: str, preamble: str = "") -> Path:
    doc = ("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n" + preamble + "\\begin{document}\n\\scriptsize\n"
           + body + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, errors="replace", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    pdf = tmp_path / "doc.pdf"
    assert pdf.stat().st_size > 1000
    return pdf


@needs_pdflatex
def test_card_with_hostile_labels_compiles(tmp_path):
    body = "\n".join(render_card(hostile(fixture(name), i), "tex")
                     for i, name in enumerate(("ptq_w4a8_resnet18", "sparq_resnet18", "marvin_resnet8")))
    compile_doc(tmp_path, body)


@needs_pdflatex
def test_comparison_with_hostile_labels_compiles(tmp_path):
    a = hostile(fixture("ptq_w4a8_resnet18"), 0)
    b = hostile(fixture("ptq_w4a8_resnet18"), 1)
    b["quantization"]["batch_norm"] = "kept"
    b["dataset"]["ref"] = HOSTILE
    cmp = compare_cards([a, b, hostile(fixture("sparq_resnet18"), 2)], reference="all")
    assert any("Grüße" in d for d in cmp.differences)       # the hostile text reaches the comments too
    compile_doc(tmp_path, cmp.to_latex())


def test_tex_escape_leaves_only_ascii_and_names_what_it_cannot_typeset():
    out = tex_escape("量 ∑≤≥±×→✓ 😀 é ǖ ß a\u200db")
    assert out.isascii()
    assert "\\texttt{[U+91CF]}" in out and "\\texttt{[U+1F600]}" in out      # still says what it was
    for sym in (r"$\sum$", r"$\leq$", r"$\geq$", r"$\pm$", r"$\times$", r"$\rightarrow$", r"$\surd$"):
        assert sym in out
    assert "\\'{e}" in out and '\\={\\"{u}}' in out and "\\ss{}" in out and "ab" in out   # zero-width joiner dropped


def test_every_character_outside_ascii_is_escaped():
    text = "".join(chr(c) for c in range(0x80, 0x3000)) + "".join(chr(c) for c in range(0x1F300, 0x1F320))
    assert tex_escape(text).isascii()


@needs_pdflatex
@pytest.mark.parametrize("preamble", ["", "\\usepackage[T1]{fontenc}\n"], ids=["OT1", "T1"])
def test_every_named_symbol_and_unknown_characters_compile(tmp_path, preamble):
    accented = "àáâãäåçèéêëìíîïñòóôõöùúûüýÿÀÉÎÕÜčďěňřšťžőűĺŕśźżẹǖ"
    body = tex_escape("".join(TEX_SYMBOLS) + " " + accented + " 量化 ✨ 😀 \x01 \U0010FFFF")
    compile_doc(tmp_path, body, preamble)


@needs_pdflatex
def test_t1_document_compiles_card_with_cjk_labels(tmp_path):
    card = hostile(fixture("ptq_w4a8_resnet18"))
    card["model"]["label"] = "模型 ∑ ✓ 🚀"
    compile_doc(tmp_path, render_card(card, "tex"), "\\usepackage[T1]{fontenc}\n")
