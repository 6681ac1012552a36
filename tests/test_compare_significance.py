"""`qcard compare` with per-sample outcomes (issue 13 items 3 and 4, issue 20 item 4), the runtime column
(issue 12) and the config's row order (issue 15 item 15). Cards are built from the fixture card with
hand-made outcome bits whose discordant pairs give the gaps the tests need.

Every p-value, mark and interval the significance tests check is recomputed here independently of qcard:
Newcombe's method 10 written out, its p-value found with scipy's brentq, Benjamini–Hochberg from
statsmodels (`multipletests`), and the Benjamini–Yekutieli level 1 - R*q/m by hand."""
import copy
import math
import shutil
import statistics
import subprocess
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

from qcard.cards.compare import compare_cards
from qcard.cards.compare.display import cell
from qcard.cards.evidence import results_from_outcomes
from qcard.cards.schema import unquantized_block
from qcard.cli import main
from qcard.stats.outcomes import pack_outcomes

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
N = 1000
FP = "sha256:5be1a7c0d4e2"       # the fixture's eval fingerprint
LEGEND = "≈: not significantly different from"
Q = 0.05


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


def card(bits_by_seed, *, name, fingerprint=FP, fp32=False, fp32_top1=98.7, model=None, experiment=None, **prov):
    """A schema-2 card whose results come from its outcome bits (the seeds' mean and spread), id and label
    from name."""
    c = copy.deepcopy(base())
    c["schema_version"] = "2"
    c["id"] = f"{abs(hash(name)):016x}".ljust(64, "0")
    c["method"]["label"] = name
    c["dataset"]["fingerprint"] = fingerprint
    c["dataset"]["eval_size"] = N
    if model:
        c["model"]["ref"] = model
    if experiment:
        c["experiment"] = experiment
    # the results a runner would write from these outcomes (FP32's bits included), so the card passes the
    # evidence check that `qcard compare` applies to card files
    fp_bits = fp32_bits(round(fp32_top1 * N / 100))
    c["results"].update(results_from_outcomes(fp_bits, bits_by_seed, fingerprint=fingerprint, is_baseline=fp32))
    if fp32:
        c.update(quantization=unquantized_block())
        c["method"].update(name="fp32", family="none", label=name, params={}, pipeline=[])
        c["dataset"]["calibration"] = None
    c["provenance"].update(prov)
    return c


def fp32_card(n_correct=987, **kw):
    return card({0: fp32_bits(n_correct)}, name=kw.pop("name", "fp32"), fp32=True, fp32_top1=n_correct / 10, **kw)


# --- the statistics, written out independently of qcard ------------------------------------------------

def newcombe10(x, y, conf):
    """Newcombe (1998) method 10 for mean(x) - mean(y), per-image outcomes in [0, 1], in points."""
    n = len(x)
    e, f = float(np.sum(x * y)), float(np.sum(x * (1 - y)))
    g, h = float(np.sum((1 - x) * y)), float(np.sum((1 - x) * (1 - y)))
    z = stats.norm.ppf(0.5 + conf / 2)

    def wilson(k):
        p = k / n
        mid, rad = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, (mid - rad) / (1 + z * z / n)), min(1.0, (mid + rad) / (1 + z * z / n))

    p1, p2 = (e + f) / n, (e + g) / n
    (l1, u1), (l2, u2) = wilson(e + f), wilson(e + g)
    adbc = e * h - f * g
    adbc = adbc - n / 2 if adbc > n / 2 else (0.0 if adbc >= 0 else adbc)
    denom = (e + f) * (g + h) * (e + g) * (f + h)
    phi = adbc / math.sqrt(denom) if denom else 0.0
    dl = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0))
    du = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0))
    return 100 * (p1 - p2 - dl), 100 * (p1 - p2 + du)


def newcombe_p(x, y):
    """The alpha at which Newcombe's 1 - alpha interval reaches 0 (brentq on the confidence level)."""
    d = np.mean(x) - np.mean(y)
    if d == 0:
        return 1.0
    near = (lambda a: newcombe10(x, y, 1 - a)[0]) if d > 0 else (lambda a: -newcombe10(x, y, 1 - a)[1])
    return optimize.brentq(near, 1e-15, 1 - 1e-12, xtol=1e-16, rtol=1e-13)


def expected(pairs):
    """[(x, y)] of one family -> [(p, p_adjusted, significant, level, (lo, hi))] recomputed here."""
    ps = [newcombe_p(x, y) for x, y in pairs]
    rejected, adjusted, _, _ = multipletests(ps, alpha=Q, method="fdr_bh")
    level = 1 - max(int(rejected.sum()), 1) * Q / len(ps)
    return [(p, a, bool(r), level, newcombe10(x, y, level)) for p, a, r, (x, y) in zip(ps, adjusted, rejected, pairs)]


def seed_mean(*bits):
    return np.mean([b.astype(float) for b in bits], axis=0)


def p_text(p):
    """Two significant digits, written out: 0.054, 0.0012, 1.0, '< 0.0001'."""
    if p < 1e-4:
        return "< 0.0001"
    digits = 1 - math.floor(math.log10(p))
    return f"{round(p, digits):.{max(digits, 1)}f}"


def limit_text(v):
    text = f"{v:+.1f}"
    return f"{v:+.2g}" if float(text) == 0 and v != 0 else text


# --- the tests -----------------------------------------------------------------------------------------

def test_gap_of_0_3_points_is_within_noise_and_5_points_is_not():
    ref = fp32_bits()
    small = card({0: flipped(ref, 5, 2)}, name="w8a8")        # 98.40 vs 98.70: 0.3 points
    large = card({0: flipped(ref, 55, 5)}, name="w4a4")       # 93.70 vs 98.70: 5 points
    cmp = compare_cards([fp32_card(), small, large])
    a, b, c = cmp.rows
    assert b["quantized"] == pytest.approx(98.4) and c["quantized"] == pytest.approx(93.7)
    assert (b["ref"], b["significant"], c["ref"], c["significant"]) == ("A", False, "A", True)
    assert a["is_reference"] and a["significant"] is None
    assert b["p_value"] == pytest.approx(newcombe_p(flipped(ref, 5, 2), ref), rel=1e-9) and c["p_value"] < 1e-8
    md = cmp.to_markdown()
    assert "| ≈ 98.40 \\[97.4, 99.0\\] |" in md and "| 93.70 \\[92.0, 95.0\\] |" in md and "≈ 93.70" not in md
    assert (f"{LEGEND} the FP32 card of the same model (A) at a false discovery rate of 0.05 (Benjamini–Hochberg "
            "within each model, --family model: torchvision:resnet18: 2 tests, 1 significant, Δ interval at 97.5 %)") in md
    p_b = b["p_adjusted"]
    assert cmp.significance.within_noise == [f"within noise: B vs A (p = {p_text(p_b)}, BH-adjusted over 2 tests)"]
    assert f"- within noise: B vs A (p = {p_text(p_b)}, BH-adjusted over 2 tests)" in md
    assert md.index("within noise") < md.index("## Cards")       # in the confounders section
    assert f"| A: {p_text(p_b)} (2 tests) |" in md and "| ref |" in md                # the p column
    tests = json.loads(cmp.to_json())["significance"]["tests"]
    assert [(t["card"], t["ref"], t["only_ref_correct"], t["only_card_correct"], t["family_size"]) for t in tests] == \
        [("B", "A", 5, 2, 2), ("C", "A", 55, 5, 2)]
    assert r"$\approx$ 98.40" in cmp.to_latex()


def test_benjamini_hochberg_within_the_family():
    """A raw p below 0.05 alone; among three tests its BH-adjusted p is three times that."""
    ref = fp32_bits()
    edge_bits = flipped(ref, 14, 4)
    edge = card({0: edge_bits}, name="edge")
    same1 = card({0: flipped(ref, 3, 3)}, name="same1")
    same2 = card({0: flipped(ref, 3, 3)}, name="same2")
    cmp = compare_cards([fp32_card(), edge, same1, same2])
    b = cmp.rows[1]
    raw = newcombe_p(edge_bits, ref)
    assert b["p_value"] == pytest.approx(raw, rel=1e-9) and raw < 0.05 < 3 * raw
    assert b["p_adjusted"] == pytest.approx(3 * raw, rel=1e-9) and b["significant"] is False
    assert "≈ 97.70" in cmp.to_markdown() and "3 tests, 0 significant" in cmp.significance.legend[0]
    alone = compare_cards([fp32_card(), edge])
    assert alone.rows[1]["significant"] is True and "≈" not in alone.to_markdown().split("## Cards")[1].split("\n\n")[1]


def _cells(md, letter):
    """{column header: cell text} of one row of compare's Markdown table."""
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| card |"))
    row = next(l for l in lines if l.startswith(f"| {letter} |"))
    split = lambda l: [c.strip().replace("\\[", "[").replace("\\]", "]").replace("\\<", "<") for c in l.strip("|").split(" | ")]
    return dict(zip(split(header), split(row)))


def test_golden_rows_mark_p_and_interval_tell_one_story():
    """Chosen outcome tables: model x has the seven tables of the published resnet8 quickstart rows against
    an FP32 card with 985 of 1,000 right (images only the row got right, only FP32 got right), among them
    the issue's G (W4A8 per-channel, 4/15) and E (per-tensor, 1/10); model y has the 2-seed card and one
    more row. Every p, mark and interval is recomputed here, family by family, and in every row the
    interval excludes 0 exactly when the row is not marked ≈."""
    ref_x, ref_y = fp32_bits(985), fp32_bits(990)
    x_rows = {"W8A8": (2, 0), "W4A8-pt (E)": (1, 10), "W4A8-pc (G)": (4, 15), "SPARQ-8": (4, 3),
              "SPARQ-4": (3, 3), "QAT": (4, 5), "MARViN": (5, 8)}
    families = {"x": (ref_x, {k: {0: flipped(ref_x, c, b)} for k, (b, c) in x_rows.items()}),
                "y": (ref_y, {"two-seeds": {0: ref_y.copy(), 1: flipped(ref_y, 50, 0)},
                              "y-w8": {0: flipped(ref_y, 3, 1)}})}
    cards = []
    for model, (ref, rows) in families.items():
        cards.append(fp32_card(int(ref.sum()), name=f"{model}-fp32", model=model))
        cards += [card(bits, name=k, model=model, fp32_top1=ref.mean() * 100) for k, bits in rows.items()]
    cmp = compare_cards(cards)
    md = cmp.to_markdown()
    by_label = {r["label"]: r for r in cmp.rows}
    for model, (ref, rows) in families.items():
        want = expected([(seed_mean(*bits.values()), ref.astype(float)) for bits in rows.values()])
        for (label, bits), (p, adjusted, significant, level, (lo, hi)) in zip(rows.items(), want):
            r = by_label[label]
            cells = _cells(md, r["card"])
            assert r["p_value"] == pytest.approx(p, rel=1e-8, abs=1e-15), label
            assert r["p_adjusted"] == pytest.approx(adjusted, rel=1e-8, abs=1e-15), label
            assert r["significant"] is significant and r["interval_level"] == pytest.approx(level), label
            assert (r["delta_vs_ref_lo"], r["delta_vs_ref_hi"]) == pytest.approx((lo, hi), abs=1e-6), label
            delta = 100 * (seed_mean(*bits.values()).mean() - ref.mean())
            assert cells["Δ"] == f"{delta:+.2f} [{limit_text(lo)}, {limit_text(hi)}]", label
            assert cells["vs ref (BH p)"] == f"{r['ref']}: {p_text(adjusted)} ({len(rows)} tests)", label
            assert cells["quantized"].startswith("≈ ") is (not significant), label
            assert (lo > 0 or hi < 0) is significant, label                 # one story
    # G's row read "≈ 97.40 | -1.10 [-2.1, -0.2] | A: 0.05"; now its interval reaches past 0 like its mark
    g = _cells(md, by_label["W4A8-pc (G)"]["card"])
    assert g["quantized"].startswith("≈ 97.40") and g["Δ"].startswith("-1.10 [") and g["Δ"].endswith("]")
    assert by_label["W4A8-pc (G)"]["delta_vs_ref_hi"] > 0 and by_label["W4A8-pt (E)"]["significant"] is False
    assert by_label["two-seeds"]["significant"] is True and by_label["y-w8"]["significant"] is False
    assert "x: 7 tests, 0 significant, Δ interval at 99.3 %" in md                  # 1 - 0.05/7
    assert "y: 2 tests, 1 significant, Δ interval at 97.5 %" in md                  # 1 - 1 * 0.05/2


def _two_models(**experiments):
    """Model X: FP32, a row with raw p = 0.038 and a row equal to FP32 in accuracy; model Y: FP32 and three
    rows far below it."""
    ref = fp32_bits()
    xs = [fp32_card(name="x-fp32", model="x"), card({0: flipped(ref, 13, 4)}, name="x-edge", model="x"),
          card({0: flipped(ref, 3, 3)}, name="x-null", model="x")]
    ys = [fp32_card(name="y-fp32", model="y")] + [card({0: flipped(ref, 55 + k, 5)}, name=f"y-{k}", model="y")
                                                   for k in range(3)]
    for c in xs:
        c["experiment"] = experiments.get("x", "exp")
    for c in ys:
        c["experiment"] = experiments.get("y", "exp")
    return xs + ys, newcombe_p(flipped(ref, 13, 4), ref)


def test_family_option_decides_which_tests_bh_corrects_together():
    """The issue's 'mark that depends on unrelated cards': x-edge is significant among all 5 tests of the
    table and ≈ among the 2 tests of its model. --family says which, and the family size is printed."""
    cards, p_edge = _two_models()
    assert 0.025 < p_edge <= 0.04
    per_model = compare_cards(cards)                         # the default: model
    edge = per_model.rows[1]
    assert edge["label"] == "x-edge" and edge["family_size"] == 2
    assert edge["p_adjusted"] == pytest.approx(2 * p_edge, rel=1e-9) and edge["significant"] is False
    assert "--family model: x: 2 tests, 0 significant" in per_model.significance.legend[0]
    assert "y: 3 tests, 3 significant, Δ interval at 95 %" in per_model.significance.legend[0]
    table = compare_cards(cards, family="table")
    edge = table.rows[1]
    assert edge["family_size"] == 5 and edge["significant"] is True
    assert edge["p_adjusted"] == pytest.approx(5 / 4 * p_edge, rel=1e-9)
    assert "over the whole table, --family table: 5 tests, 4 significant, Δ interval at 96 %" in table.to_markdown()
    assert f"| A: {p_text(5 / 4 * p_edge)} (5 tests) |" in table.to_markdown()
    # experiments: one per model is the model family; one for both is the table
    split, _ = _two_models(x="ex1", y="ex2")
    assert compare_cards(split, family="experiment").rows[1]["significant"] is False
    assert compare_cards(cards, family="experiment").rows[1]["significant"] is True
    with pytest.raises(Exception, match="unknown test family 'bogus'; allowed: table, model, experiment"):
        compare_cards(cards, family="bogus")


def test_family_option_on_the_command_line(tmp_path):
    cards, _ = _two_models()
    for i, c in enumerate(cards):
        (tmp_path / f"c{i}.json").write_text(json.dumps(c))
    files = sorted(map(str, tmp_path.glob("c*.json")))
    r = CliRunner().invoke(main, ["compare", *files, "--format", "json", "--family", "table"])
    assert r.exit_code == 0, r.output
    sig = json.loads(r.stdout)["significance"]
    assert sig["family"] == "table" and {t["family_size"] for t in sig["tests"]} == {5}
    r = CliRunner().invoke(main, ["compare", *files, "--family", "seed"])
    assert r.exit_code == 2 and "'seed' is not one of 'table', 'model', 'experiment'" in r.output
    r = CliRunner().invoke(main, ["compare", "--help"])
    assert "--family [table|model|experiment]" in r.output and "default: model" in r.output


def test_p_values_print_with_two_significant_digits():
    from qcard.cards.compare import fmt_p
    assert [fmt_p(p) for p in (0.0538, 0.00123, 0.00001, 0.87, 1.0, 0.5, 0.0001, 0.0995)] == \
        ["0.054", "0.0012", "< 0.0001", "0.87", "1.0", "0.50", "0.00010", "0.10"]
    for p in (0.0538, 0.00123, 0.87, 0.5, 0.000456):
        assert fmt_p(p) == p_text(p)


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


def test_multi_seed_card_is_tested_over_all_its_seeds_in_any_order():
    """The issue's synthetic 2-seed card (≈ 96.00 ± 3.54 | −2.50 | A: 1.00 when only its first seed was
    tested): one seed equal to FP32, one 5 points worse. What the row shows is the seed mean, and that is
    what is tested: the same p in either seed order, recomputed here from the per-image seed means."""
    ref = fp32_bits(985)
    same, worse = ref.copy(), flipped(ref, 50, 0)
    p = newcombe_p(seed_mean(same, worse), ref)
    for order in ({0: same, 1: worse}, {1: worse, 0: same}):
        cmp = compare_cards([fp32_card(985), card(order, name="two-seeds", fp32_top1=98.5)])
        row = cmp.rows[1]
        assert row["p_value"] == pytest.approx(p, rel=1e-9) and row["significant"] is True
        md = cmp.to_markdown()
        assert "| 96.00 \\[94.6, 97.0\\] |" in md and "≈ 96.00" not in md
        assert "several seeds: each image counts as the fraction of the card's seeds that got it right" in md
    assert p < 1e-4           # 25 images lost on average out of 985: not noise


def test_baseline_option_and_its_errors(tmp_path):
    ref = fp32_bits()
    a = card({0: flipped(ref, 5, 2)}, name="a")
    b = card({0: flipped(ref, 6, 2)}, name="b")        # one image from a
    c = card({0: flipped(ref, 60, 0)}, name="c")
    cmp = compare_cards([fp32_card(), a, b, c], baseline=a["id"][:8])
    rows = {r["card"]: r for r in cmp.rows}
    assert rows["B"]["is_reference"] and rows["A"]["ref"] == "B" and rows["C"]["ref"] == "B"
    assert rows["C"]["significant"] is False and rows["D"]["significant"] is True
    assert "from card B (--baseline)" in cmp.significance.legend[0] and ": 3 tests," in cmp.significance.legend[0]
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
    bits = flipped(ref, 5, 2)
    b = card({0: bits}, name="w8a8")
    b["results"].update(ci95=[97.6, 99.0], fp32_ci95=[97.9, 99.3], delta_ci95=[-0.7, 0.1])
    cmp = compare_cards([fp32_card(), b])
    lo, hi = newcombe10(bits.astype(float), ref.astype(float), 0.95)     # one test, none significant: 95 %
    delta = f"-0.30 [{limit_text(lo)}, {limit_text(hi)}]"
    tex = cmp.to_latex(columns=["fp32", "quantized", "delta"])
    assert f"98.70 [97.9, 99.3] & $\\approx$ 98.40 [97.6, 99.0] & {delta}" in tex
    md = cmp.to_markdown()      # Markdown escapes the brackets (they render as typed)
    assert f"| 98.70 \\[97.9, 99.3\\] | ≈ 98.40 \\[97.6, 99.0\\] | {delta.replace('[', chr(92) + '[').replace(']', chr(92) + ']')} |" in md
    assert r"\[lo, hi\] on FP32 and quantized and on the Δ of untested rows: the card's own 95 % interval" in md
    # untested (different eval set): the Δ cell is the card's own
    b["dataset"]["fingerprint"] = b["results"]["outcomes"]["fingerprint"] = "sha256:other"
    assert "| -0.30 \\[-0.7, +0.1\\] |" in compare_cards([fp32_card(), b]).to_markdown()


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
    cells = [cell(r, "runtime") for r in cmp.rows]
    assert cells == ["98.20 (ORT)", "98.70 (ORT)", "not deployable", "failed", "—"]
    assert [r["runtime_status"] for r in cmp.rows] == ["ok", "ok", "not_deployable", "failed", None]   # raw
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
    c["results"]["ci95"] = None                  # a card without an interval: no error bar
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
    doc = ("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n\\usepackage{booktabs,graphicx}\n"
           "\\begin{document}\n\\tiny\n" + tex + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
