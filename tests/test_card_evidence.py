"""Cards checked against their own per-sample outcomes (issue 20 part 1 and its acceptance): copies of a
published card with a moved top-1, flipped or swapped outcome bits, or a widened interval are rejected by
`qcard card validate` (exit 1, naming file, field, stored and recomputed values), refused by render and
compare, and `qcard verify` of the flipped copy exits 1; the untouched card validates and verifies.

The recomputed values the tests expect are computed here independently of qcard (numpy's unpackbits,
statsmodels' Wilson interval, a Newcombe interval written in this file), so the checker is not its own
reference."""
import base64
import copy
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from click.testing import CliRunner
from statsmodels.stats.proportion import proportion_confint

from qcard.cards.evidence import NO_EVIDENCE, EvidenceError, check_card, results_from_outcomes
from qcard.cards.schema import card_from_dict, load_card
from qcard.cli import main

ROOT = Path(__file__).resolve().parent.parent
# one of the cheapest published cards to rerun (PTQ W4A8 on resnet8, 1,000 images, 0.1 s of method time);
# the README's "Verifying a card" shows it
PUBLISHED = ROOT / "cards" / "quickstart" / "resnet8__W4A8-minmax__ef5d8e7733" / "card.json"
README = ROOT / "README.md"
FIXTURES = Path(__file__).parent / "fixtures" / "cards"


def published():
    return json.loads(PUBLISHED.read_text(encoding="utf-8"))


def bits_of(text, n):
    """Independent decoding of packbits-base64 (numpy only)."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def packed(bits):
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def wilson(k, n):
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return [round(100 * lo, 4), round(100 * hi, 4)]


def fmt(x):
    return f"{x:.4f}"


def write(tmp_path, name, data):
    path = tmp_path / name / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------ tampered copies of a published card


def moved(c):
    r = c["results"]
    r["quantized"] = round(r["quantized"] + 0.2, 4)
    r["delta"] = round(r["delta"] + 0.2, 4)
    r["per_seed"][0]["top1"] = round(r["per_seed"][0]["top1"] + 0.2, 4)


def flipped(c):
    """Two images the seed got right made wrong: the bits say 0.2 points less than the figures."""
    o = c["results"]["outcomes"]
    bits = bits_of(o["seeds"]["0"], o["n"]).copy()
    bits[np.flatnonzero(bits)[:2]] = False
    o["seeds"]["0"] = packed(bits)


def swapped(c):
    o = c["results"]["outcomes"]
    o["fp32"], o["seeds"]["0"] = o["seeds"]["0"], o["fp32"]


def widened(c):
    c["results"]["ci95"] = [0.0, 100.0]


@pytest.fixture(scope="module")
def truth():
    """What the published card's outcomes give, computed here: correct counts, top-1s, Wilson intervals."""
    o = published()["results"]["outcomes"]
    n, fp, seed = o["n"], bits_of(o["fp32"], o["n"]), bits_of(o["seeds"]["0"], o["n"])
    return {"n": n, "fp32": 100 * fp.sum() / n, "top1": 100 * seed.sum() / n, "k": int(seed.sum()),
            "ci95": wilson(int(seed.sum()), n), "fp32_ci95": wilson(int(fp.sum()), n)}


def test_the_published_card_agrees_with_an_independent_recomputation(truth):
    r = published()["results"]
    assert r["quantized"] == pytest.approx(truth["top1"], abs=5e-5)
    assert r["per_seed"][0]["top1"] == pytest.approx(truth["top1"], abs=5e-5)
    assert r["fp32"] == pytest.approx(truth["fp32"], abs=5e-5)
    assert r["delta"] == pytest.approx(truth["top1"] - truth["fp32"], abs=1e-4)
    assert r["ci95"] == pytest.approx(truth["ci95"], abs=1e-4)
    assert r["fp32_ci95"] == pytest.approx(truth["fp32_ci95"], abs=1e-4)
    assert check_card(card_from_dict(published())).ok


def test_validate_rejects_every_tampered_copy_naming_file_field_and_both_values(tmp_path, truth):
    """The acceptance, as a user runs it: a real subprocess of the installed CLI on real files."""
    files = {"untouched": write(tmp_path, "untouched", published())}
    for name, edit in (("moved", moved), ("flipped", flipped), ("swapped", swapped), ("widened", widened)):
        data = published()
        edit(data)
        files[name] = write(tmp_path, name, data)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qcard.cli", "card", "validate", *map(str, files.values())],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.strip() == (f"{files['untouched']}: ok (schema v2, status ok; figures agree with the "
                                "per-sample outcomes)")
    err = r.stderr
    top1, fp32, k, n = truth["top1"], truth["fp32"], truth["k"], truth["n"]
    expected = [
        (files["moved"], "results.quantized", fmt(top1 + 0.2), fmt(top1)),
        (files["moved"], "results.per_seed[0].top1", fmt(top1 + 0.2), f"{fmt(top1)} ({k:,} of {n:,} images)"),
        (files["moved"], "results.delta", fmt(top1 + 0.2 - fp32), fmt(top1 - fp32)),
        (files["flipped"], "results.quantized", fmt(top1), fmt(top1 - 0.2)),
        (files["flipped"], "results.ci95", "[{}, {}]".format(*map(fmt, truth["ci95"])),
         "[{}, {}]".format(*map(fmt, wilson(k - 2, n)))),
        (files["swapped"], "results.fp32", fmt(fp32), f"{fmt(top1)} ({k:,} of {n:,} images)"),
        (files["swapped"], "results.delta", fmt(top1 - fp32), fmt(fp32 - top1)),
        (files["widened"], "results.ci95", "[0.0000, 100.0000]", "[{}, {}]".format(*map(fmt, truth["ci95"]))),
    ]
    for path, field, stored, given in expected:
        assert f"mismatch: {path}: {field}: stored {stored}, the outcomes give {given}\n" in err, (field, err)
    # the widened copy fails on its interval alone
    assert [ln for ln in err.splitlines() if str(files["widened"]) in ln and "results." in ln] == \
        [f"mismatch: {files['widened']}: results.ci95: stored [0.0000, 100.0000], the outcomes give "
         "[{}, {}]".format(*map(fmt, truth["ci95"]))]
    assert "4 problem(s) among 5 path(s), 5 card file(s) checked; 4 card(s) disagree with their own outcomes" in err


def readme_block(after: str):
    """The lines of the README's first ``` block after the line `after` (without '...' elisions)."""
    text = README.read_text(encoding="utf-8")
    body = text[text.index(after):].split("```\n", 2)[1]
    return [ln for ln in body.splitlines() if ln.strip() not in ("...", "")]


def test_the_readme_validate_example_is_what_validate_prints(tmp_path):
    write(tmp_path, "orig", published())
    data = published()
    moved(data)
    write(tmp_path, "moved", data)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qcard.cli", "card", "validate", "orig", "moved"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    block = readme_block("with its top-1 moved by +0.2")
    assert block[0] == "$ qcard card validate orig moved"
    assert block[1:] == r.stdout.splitlines() + r.stderr.splitlines()[:-1]


def test_verify_fails_the_flipped_copy_and_verifies_the_untouched_card(tmp_path):
    """One rerun of the published point (both copies share it): the flipped card fails its own evidence and
    its bits differ from the rerun's; the untouched card's outcomes are the rerun's, image by image. The
    README's example is this output."""
    write(tmp_path, "orig", published())
    data = published()
    flipped(data)
    write(tmp_path, "flip", data)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qcard.cli", "verify", "orig", "flip"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "orig/card.json: qcard:resnet8 · W4A8-minmax (ef5d8e7733): VERIFIED\n" in out
    good_part, bad_part = out.split("flip/card.json: ")
    assert "outcomes, seed 0: all 1,000 eval images the same" in good_part
    assert "NOT VERIFIED" in bad_part and "FAIL the card disagrees with its own per-sample outcomes" in bad_part
    assert ("outcomes, seed 0: 2 of 1,000 eval images changed outcome (0 right on the card and wrong in the "
            "rerun, 2 the reverse); exact McNemar p = 0.50") in bad_part
    assert "1 of 2 card(s) verified; not verified: flip/card.json" in out
    assert r.stderr.count("rerunning") == 1          # the same point reran once
    for line in readme_block("verified together (`qcard verify orig flip`"):
        assert line in out.splitlines(), line


def test_compare_and_render_refuse_a_card_that_disagrees_with_its_outcomes(tmp_path, truth):
    data = published()
    moved(data)
    bad = write(tmp_path, "moved", data)
    good = write(tmp_path, "untouched", published())
    r = CliRunner().invoke(main, ["compare", str(good), str(bad)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: results.per_seed[0].top1: stored "
                                                   f"{fmt(truth['top1'] + 0.2)}, the outcomes give {fmt(truth['top1'])}")
    assert "(and 2 more mismatch(es): `qcard card validate" in lines[0]
    r = CliRunner().invoke(main, ["render", str(bad)])
    assert r.exit_code == 2 and r.output.startswith(f"error: {bad}: results.per_seed[0].top1: stored")
    with pytest.raises(EvidenceError) as info:
        load_card(bad)
    assert len(info.value.lines) == 3
    load_card(bad, check_evidence=False)          # the schema alone accepts it
    r = CliRunner().invoke(main, ["compare", str(good)])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ what is checked, field by field


def mismatched_fields(edit):
    data = published()
    edit(data)
    return [m.field for m in check_card(card_from_dict(data)).mismatches]


@pytest.mark.parametrize("edit, fields", [
    (lambda c: c["results"]["outcomes"]["seeds"].update({"0": c["results"]["outcomes"]["seeds"]["0"][:-4]}),
     ["results.outcomes.seeds['0']"]),
    (lambda c: c["results"]["outcomes"]["seeds"].update({"0": "not base64!"}), ["results.outcomes.seeds['0']"]),
    (lambda c: c["results"]["outcomes"].update(fp32=None), ["results.outcomes.fp32"]),
    (lambda c: c["results"]["outcomes"].update(n=999), ["dataset.eval_size", "results.outcomes.fp32",
                                                        "results.outcomes.seeds['0']"]),
    (lambda c: c["results"]["per_seed"][0].update(seed=1), ["results.per_seed[*].seed", "results.seeds"]),
    (lambda c: c["results"].update(n_runs=2), ["results.n_runs"]),
    (lambda c: c["results"].update(std=0.5), ["results.std"]),
    (lambda c: c["results"].update(delta_ci95=None), ["results.delta_ci95"]),
    (lambda c: c["results"].update(fp32_ci95=[97.0, 99.5]), ["results.fp32_ci95"]),
    (lambda c: c["results"].update(ci_method="95 % bootstrap"), ["results.ci_method"]),
    (lambda c: c["results"]["outcomes"].update(fingerprint="0" * 64), ["results.outcomes.fingerprint"]),
    (lambda c: c["results"].update(outcomes=None), ["results.outcomes"]),
    (lambda c: c["results"].pop("quantized"), ["results.quantized"]),
])
def test_each_broken_piece_is_named(edit, fields):
    assert mismatched_fields(edit) == fields


def test_rounding_is_not_a_mismatch_but_a_tenth_of_a_point_is():
    assert mismatched_fields(lambda c: c["results"].update(quantized=c["results"]["quantized"] + 0.00004)) == []
    assert mismatched_fields(lambda c: c["results"].update(quantized=c["results"]["quantized"] + 0.0002)) == \
        ["results.quantized"]
    assert mismatched_fields(lambda c: c["results"]["ci95"].__setitem__(0, c["results"]["ci95"][0] - 0.001)) == \
        ["results.ci95"]


def test_cards_without_outcomes_load_and_say_so(tmp_path):
    r = CliRunner().invoke(main, ["card", "validate", str(FIXTURES / "ptq_w4a8_resnet18.json")])
    assert r.exit_code == 0, r.output
    # schema 1, upgraded on load to 2: no outcomes, so nothing to check the figures against
    assert r.output.strip() == f"{FIXTURES / 'ptq_w4a8_resnet18.json'}: ok (schema v2, status ok; {NO_EVIDENCE})"
    evidence = check_card(load_card(FIXTURES / "ptq_w4a8_resnet18.json"))
    assert evidence.ok and not evidence.checked
    # a failed card has no outcomes either
    data = published()
    data.update(status="failed", error="RuntimeError: boom")
    data["results"] = {"metric": "top1", "seeds": [0]}
    assert check_card(card_from_dict(data)).ok and not check_card(card_from_dict(data)).checked


# ------------------------------------------------------------------ cards written before Newcombe's method 10


OLD_METHOD = ("95 % Wilson score intervals over the 1,000 eval images; Δ: Newcombe's paired score interval against "
              "FP32 on the same 1,000 images")


def newcombe_uncorrected(x, y, z=NormalDist().inv_cdf(0.975)):
    """Newcombe's paired hybrid score interval with the raw φ, as qcard computed it before the fix: written
    here from the 1998 paper's formulas, not qcard's code."""
    n = len(x)
    a, b = int((x & y).sum()), int((x & ~y).sum())
    c, d = int((~x & y).sum()), int((~x & ~y).sum())

    def wil(k):
        p = k / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wil(a + b), wil(a + c)
    phi = (a * d - b * c) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    lower = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    upper = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return [round(100 * (p1 - p2 - lower), 4), round(100 * (p1 - p2 + upper), 4)]


def old_card():
    """The published card as qcard wrote it before the fix: old ci_method, Δ interval with the raw φ."""
    data = published()
    o = data["results"]["outcomes"]
    data["results"]["ci_method"] = OLD_METHOD
    data["results"]["delta_ci95"] = newcombe_uncorrected(bits_of(o["seeds"]["0"], o["n"]), bits_of(o["fp32"], o["n"]))
    return data


def test_old_method_cards_are_valid_with_a_warning_naming_the_method(tmp_path):
    data = old_card()
    # the old method's interval (uncorrected φ) is narrower than method 10's and nested in it; the card
    # published before the fix (git 8290382) carried [-2.0904, -0.2454] for the outcomes of then
    old_lo, old_hi = data["results"]["delta_ci95"]
    new_lo, new_hi = published()["results"]["delta_ci95"]
    assert new_lo < old_lo < old_hi < new_hi
    path = write(tmp_path, "old", data)
    r = CliRunner().invoke(main, ["card", "validate", str(path)])
    assert r.exit_code == 0, r.output
    assert f"warning: {path}: results.delta_ci95 " in r.output
    assert "superseded Newcombe interval with uncorrected φ" in r.output and OLD_METHOD in r.output
    assert "method 10 as published gives [" in r.output and "rerun the point" in r.output
    r = CliRunner().invoke(main, ["render", str(path)])
    assert r.exit_code == 0 and "superseded Newcombe interval" in r.output
    # an old-method card whose Δ interval is not nested in method 10's was not written by either method
    data["results"]["delta_ci95"] = [-3.0, 1.0]
    path = write(tmp_path, "old-edited", data)
    r = CliRunner().invoke(main, ["card", "validate", str(path)])
    assert r.exit_code == 1 and f"mismatch: {path}: results.delta_ci95: stored [-3.0000, 1.0000]" in r.output


# ------------------------------------------------------------------ cards built from chosen outcomes


def test_results_from_outcomes_with_two_seeds_match_an_independent_computation():
    rng = np.random.default_rng(0)
    fp = rng.random(400) < 0.9
    seeds = {3: rng.random(400) < 0.8, 1: rng.random(400) < 0.85}
    r = results_from_outcomes(fp, seeds, fingerprint="f")
    top1s = [100 * seeds[s].sum() / 400 for s in (3, 1)]
    assert [row["seed"] for row in r["per_seed"]] == [3, 1] and r["seeds"] == [3, 1]
    assert r["quantized"] == pytest.approx(statistics.fmean(top1s), abs=5e-5)
    assert r["std"] == pytest.approx(statistics.stdev(top1s), abs=5e-5)
    assert r["fp32_ci95"] == pytest.approx(wilson(int(fp.sum()), 400), abs=1e-4)
    # several seeds: the Wilson interval of the mean correct count over the same 400 images
    assert r["ci95"] == pytest.approx(wilson(statistics.fmean(int(b.sum()) for b in seeds.values()), 400), abs=1e-4)
    card = copy.deepcopy(published())
    card["dataset"].update(eval_size=400, fingerprint="f")
    card["results"].update(r)
    assert check_card(card_from_dict(card)).ok
    card["results"]["std"] = 0.0
    assert [m.field for m in check_card(card_from_dict(card)).mismatches] == ["results.std"]


def test_the_fp32_card_has_no_delta_interval_but_a_quantized_card_must():
    bits = np.arange(200) % 7 != 0
    card = copy.deepcopy(published())
    card["dataset"].update(eval_size=200, fingerprint=None)
    card["results"].update(results_from_outcomes(bits, {0: bits}, is_baseline=True))
    assert card["results"]["delta_ci95"] is None
    card["method"].update(name="fp32", family="none", pipeline=[])
    assert check_card(card_from_dict(card)).ok
    card["method"].update(name="ptq", family="ptq")       # a quantized card with FP32's bits still has a Δ interval
    assert [m.field for m in check_card(card_from_dict(card)).mismatches] == ["results.delta_ci95"]
