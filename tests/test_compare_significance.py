"""`qcard compare` with per-sample outcomes (issue 13 items 3 and 4), the runtime column (issue 12) and the
config's row order (issue 15 item 15). Cards are built from the fixture card with hand-made outcome bits
whose discordant pairs give the gaps the tests need."""
import copy
import shutil
import subprocess
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcard.cards.compare import compare_cards
from qcard.cards.evidence import results_from_outcomes
from qcard.cards.schema import unquantized_block
from qcard.cli import main
from qcard.stats.outcomes import pack_outcomes

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
N = 1000
FP = "sha256:5be1a7c0d4e2"       # the fixture's eval fingerprint
LEGEND = "≈: not significantly different from"


def base():
    return json.loads((FIXTURES / "ptq_w4a8_resnet18.json").read_text(encoding="utf-8"))


def fp32_bits(n_correct=987):
    bits = np.zeros(N, dtype=bool)
    bits[:n_correct] = True
    return bits


def flipped(ref, only_ref, only_card):
    """The reference's bits with `only_ref` of its correct images made wrong and `only_card` of its wrong
    images made right: the discordant counts (b, c) of the McNemar test."""
    bits = ref.copy()
    right, wrong = np.flatnonzero(ref), np.flatnonzero(~ref)
    bits[right[:only_ref]] = False
    bits[wrong[:only_card]] = True
    return bits


def card(bits_by_seed, *, name, fingerprint=FP, fp32=False, **prov):
    """A schema-2 card whose results come from its outcome bits (first seed), id and label from name."""
    c = copy.deepcopy(base())
    c["schema_version"] = "2"
    c["id"] = f"{abs(hash(name)):016x}".ljust(64, "0")
    c["method"]["label"] = name
    c["dataset"]["fingerprint"] = fingerprint
    c["dataset"]["eval_size"] = N
    seeds = list(bits_by_seed)
    first = bits_by_seed[seeds[0]]
    top1 = 100.0 * first.mean()
    c["results"].update(quantized=top1, fp32=98.7, delta=top1 - 98.7, std=None, n_runs=len(seeds), seeds=seeds,
                        per_seed=[], outcomes={"n": N, "fingerprint": fingerprint,
                                               "seeds": {str(s): pack_outcomes(b) for s, b in bits_by_seed.items()}})
    if fp32:
        c.update(quantization=unquantized_block())
        c["method"].update(name="fp32", family="none", label=name, params={}, pipeline=[])
        c["dataset"]["calibration"] = None
    c["provenance"].update(prov)
    return c


def fp32_card(**kw):
    return card({0: fp32_bits()}, name="fp32", fp32=True, **kw)


def test_gap_of_0_3_points_is_within_noise_and_5_points_is_not():
    ref = fp32_bits()
    small = card({0: flipped(ref, 5, 2)}, name="w8a8")        # 98.40 vs 98.70: 0.3 points, p = 0.45
    large = card({0: flipped(ref, 55, 5)}, name="w4a4")       # 93.70 vs 98.70: 5 points, p = 1e-11
    cmp = compare_cards([fp32_card(), small, large])
    a, b, c = cmp.rows
    assert b["quantized"] == pytest.approx(98.4) and c["quantized"] == pytest.approx(93.7)
    assert (b["ref"], b["significant"], c["ref"], c["significant"]) == ("A", False, "A", True)
    assert a["is_reference"] and a["significant"] is None
    assert b["p_value"] == pytest.approx(0.453125) and c["p_value"] < 1e-10
    md = cmp.to_markdown()
    assert "| ≈ 98.40 |" in md and "| 93.70 |" in md and "≈ 93.70" not in md
    assert f"{LEGEND} the FP32 card of the same model (A) (exact McNemar, Benjamini–Hochberg q=0.05 over 2 tests)" in md
    assert cmp.significance.within_noise == ["within noise: B vs A (p = 0.45, BH-adjusted)"]
    assert "- within noise: B vs A (p = 0.45, BH-adjusted)" in md
    assert md.index("within noise") < md.index("## Cards")       # in the confounders section
    assert "| A: 0.45 |" in md and "| ref |" in md                # the p column
    tests = json.loads(cmp.to_json())["significance"]["tests"]
    assert [(t["card"], t["ref"], t["only_ref_correct"], t["only_card_correct"]) for t in tests] == \
        [("B", "A", 5, 2), ("C", "A", 55, 5)]
    assert r"$\approx$ 98.40" in cmp.to_latex()


def test_benjamini_hochberg_over_all_tests():
    """Raw p = 0.031 would be significant alone; among three tests its BH-adjusted p is 0.093."""
    ref = fp32_bits()
    edge = card({0: flipped(ref, 14, 4)}, name="edge")
    same1 = card({0: flipped(ref, 3, 3)}, name="same1")
    same2 = card({0: flipped(ref, 3, 3)}, name="same2")
    cmp = compare_cards([fp32_card(), edge, same1, same2])
    b = cmp.rows[1]
    assert b["p_value"] == pytest.approx(0.0308837890625) and b["p_value"] < 0.05
    assert b["p_adjusted"] == pytest.approx(3 * 0.0308837890625) and b["significant"] is False
    assert "≈ 97.70" in cmp.to_markdown() and "over 3 tests" in cmp.significance.legend
    alone = compare_cards([fp32_card(), edge])
    assert alone.rows[1]["significant"] is True and "≈" not in alone.to_markdown().split("## Cards")[1].split("\n\n")[1]


def test_different_eval_sets_are_never_tested():
    ref = fp32_bits()
    other = card({0: flipped(ref, 55, 5)}, name="other-set", fingerprint="sha256:ffff00001111")
    cmp = compare_cards([fp32_card(), other])
    assert cmp.rows[1]["significant"] is None and cmp.significance.tests == {}
    (note,) = cmp.significance.notes
    assert note.startswith("not tested: B vs A are on different eval sets") and "same images" in note
    assert LEGEND not in cmp.to_markdown() and note in cmp.to_markdown()


def test_cards_without_outcomes_are_not_tested_and_said_once():
    v1 = [base(), base()]
    v1[1]["id"] = "1" * 64
    v1[1]["quantization"]["batch_norm"] = "kept"
    cmp = compare_cards(v1)
    assert cmp.significance.notes == ["no per-sample outcomes on the cards (written before card schema 2, or "
                                      "without them): their differences are not tested for significance"]
    md = cmp.to_markdown()
    assert md.count("no per-sample outcomes") == 1 and "≈" not in md and "vs ref" not in md
    # one card with outcomes, one without: the test is skipped and the card without is named
    cmp = compare_cards([fp32_card(), base()])
    assert cmp.significance.tests == {} and cmp.significance.notes[0].startswith("no per-sample outcomes on B ")


def test_multi_seed_card_is_tested_on_its_first_seed():
    ref = fp32_bits()
    two = card({1: flipped(ref, 55, 5), 0: flipped(ref, 2, 2)}, name="two-seeds")    # results.seeds [1, 0]
    cmp = compare_cards([fp32_card(), two])
    assert cmp.rows[1]["significant"] is True          # seed 1's bits, not seed 0's
    assert cmp.significance.legend.endswith("a card with several seeds is tested on its first seed's outcomes")


def test_baseline_option_and_its_errors(tmp_path):
    ref = fp32_bits()
    a = card({0: flipped(ref, 5, 2)}, name="a")
    b = card({0: flipped(ref, 6, 2)}, name="b")        # one image from a
    c = card({0: flipped(ref, 60, 0)}, name="c")
    cmp = compare_cards([fp32_card(), a, b, c], baseline=a["id"][:8])
    rows = {r["card"]: r for r in cmp.rows}
    assert rows["B"]["is_reference"] and rows["A"]["ref"] == "B" and rows["C"]["ref"] == "B"
    assert rows["C"]["significant"] is False and rows["D"]["significant"] is True
    assert "from card B (--baseline)" in cmp.significance.legend and "over 3 tests" in cmp.significance.legend
    files = []
    for i, (x, bits) in enumerate(((a, flipped(ref, 5, 2)), (b, flipped(ref, 6, 2)))):
        # a card file is checked against its own outcomes on load: its figures come from its bits
        x["results"].update(results_from_outcomes(ref, {0: bits}, fingerprint=FP))
        files.append(tmp_path / f"c{i}.json")
        files[-1].write_text(json.dumps(x))
    r = CliRunner().invoke(main, ["compare", *map(str, files), "--baseline", "zz"])
    assert r.exit_code == 2 and "--baseline zz: no card's id starts with it" in r.output
    r = CliRunner().invoke(main, ["compare", *map(str, files), "--baseline", a["id"][:10], "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["significance"]["tests"][0]["ref"] == "A"


def test_intervals_are_shown_where_the_cards_have_them():
    ref = fp32_bits()
    b = card({0: flipped(ref, 5, 2)}, name="w8a8")
    b["results"].update(ci95=[97.6, 99.0], fp32_ci95=[97.9, 99.3], delta_ci95=[-0.7, 0.1])
    cmp = compare_cards([fp32_card(), b])
    tex = cmp.to_latex()
    assert "98.70 [97.9, 99.3] & $\\approx$ 98.40 [97.6, 99.0] & -0.30 [-0.7, +0.1]" in tex
    md = cmp.to_markdown()      # Markdown escapes the brackets (they render as typed)
    assert r"| 98.70 \[97.9, 99.3\] | ≈ 98.40 \[97.6, 99.0\] | -0.30 \[-0.7, +0.1\] |" in md
    assert r"\[lo, hi\]: 95 % interval" in md


def deployed(c, status="ok", top1=None, sim=None, reason=None):
    c["deployment"] = {"status": status, "reason": reason, "runtime": "onnxruntime", "runtime_version": "1.20.1",
                       "top1": top1, "top1_simulated": sim}
    return c


def test_runtime_column_and_simulated_vs_runtime_confounder():
    ref = fp32_bits()
    a = deployed(card({0: flipped(ref, 5, 2)}, name="w8a8"), top1=98.2, sim=98.4)
    b = deployed(card({0: flipped(ref, 2, 2)}, name="w8a8-pc"), top1=98.7, sim=98.7)
    c = deployed(card({0: flipped(ref, 55, 5)}, name="w4a4"), status="not_deployable", reason="4-bit activations")
    d = deployed(card({0: flipped(ref, 9, 2)}, name="sparq"), status="failed", reason="export error")
    cmp = compare_cards([a, b, c, d, card({0: flipped(ref, 1, 0)}, name="plain")])
    md = cmp.to_markdown()
    header = next(l for l in md.splitlines() if l.startswith("| card |"))
    assert "| runtime |" in header
    cells = [r["runtime_cell"] for r in cmp.rows]
    assert cells == ["98.20 (ORT)", "98.70 (ORT)", "not deployable", "failed", None]
    assert "| 98.20 (ORT) |" in md and "| not deployable |" in md
    assert "simulated vs runtime accuracy: A 98.40 vs 98.20 (onnxruntime)" in cmp.differences   # B agrees
    assert "ORT: onnxruntime" in md
    # no deploy check ran anywhere: no column
    none = compare_cards([c, card({0: ref}, name="x")])
    assert "runtime" not in next(l for l in none.to_markdown().splitlines() if l.startswith("| card |"))


def test_cards_not_reproducible_from_a_commit_are_flagged():
    ref = fp32_bits()
    clean = card({0: ref}, name="clean", git_dirty=False)
    dirty = card({0: ref}, name="dirty", git_dirty=True)
    nocommit = card({0: ref}, name="nocommit", git_commit=None, git_dirty=None)
    cmp = compare_cards([clean, dirty, nocommit])
    assert cmp.notes == ["not reproducible from a commit: B, C (made from a source tree with uncommitted changes, "
                         "or no git commit on the card)"]
    assert "- not reproducible from a commit: B, C" in cmp.to_markdown()
    assert [r["reproducible"] for r in cmp.rows] == [True, False, False]
    assert compare_cards([clean, clean]).notes == []


def test_rows_follow_the_config_order():
    ref = fp32_bits()
    made = []
    for exp, idx in (("exp2", 1), ("exp1", 2), ("exp2", 0), ("exp1", 0), ("exp1", 1)):
        c = card({0: ref}, name=f"{exp}-{idx}")
        c.update(experiment=exp, point={"index": idx, "config": {}})
        made.append(c)
    cmp = compare_cards(made)
    assert [r["label"] for r in cmp.rows] == ["exp2-0", "exp2-1", "exp1-0", "exp1-1", "exp1-2"]
    assert [r["card"] for r in cmp.rows] == ["A", "B", "C", "D", "E"]       # letters follow the rows
    assert [lc.card.method.label for lc in cmp.cards] == ["exp2-0", "exp2-1", "exp1-0", "exp1-1", "exp1-2"]
    for c in made:
        c["point"] = None                     # no index (v1 cards): the order given
    assert [r["label"] for r in compare_cards(made).rows] == ["exp2-1", "exp1-2", "exp2-0", "exp1-0", "exp1-1"]


def test_pareto_plot_gets_the_intervals(monkeypatch, tmp_path):
    ref = fp32_bits()
    b = card({0: flipped(ref, 5, 2)}, name="w8a8")
    b["results"]["ci95"] = [97.6, 99.0]
    c = card({0: flipped(ref, 55, 5)}, name="w4a4")
    seen = {}
    import qcard.cards.plots as plots
    monkeypatch.setattr(plots, "pareto_plot", lambda points, *a, **k: seen.setdefault("points", points) and [])
    compare_cards([b, c]).plot(tmp_path / "p")
    assert [p["ci"] for p in seen["points"]] == [(97.6, 99.0), None]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed: `make test` installs it")
def test_latex_with_marks_intervals_and_runtime_compiles(tmp_path):
    ref = fp32_bits()
    b = deployed(card({0: flipped(ref, 5, 2)}, name="w8a8 $&_%#{}~^\\ ≈", git_dirty=True), top1=98.2, sim=98.4)
    b["results"].update(ci95=[97.6, 99.0], delta_ci95=[-0.7, 0.1])
    c = card({0: flipped(ref, 55, 5)}, name="w4a4", fingerprint="sha256:other")
    tex = compare_cards([fp32_card(), b, c, card({0: flipped(ref, 40, 0)}, name="w3a8")]).to_latex()
    assert r"$\approx$" in tex and "within noise" in tex and "not reproducible from a commit" in tex
    doc = ("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n\\usepackage{booktabs}\n"
           "\\begin{document}\n\\tiny\n" + tex + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
