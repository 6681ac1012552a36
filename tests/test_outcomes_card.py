"""Per-sample outcomes and 95 % intervals on real cards: the runner stores each seed's and the FP32
baseline's top-1 outcomes, the intervals follow from them, the renderings print them, v1 cards render
without them, and a baseline cache entry written before outcomes existed is measured again."""
import json
from pathlib import Path

import numpy as np
import pytest

import qcard
from qcard.cards.render import render_card
from qcard.cards.schema import load_card
from qcard.runner import _results_block
from qcard.stats.intervals import accuracy_interval, paired_delta_interval
from qcard.stats.outcomes import pack_outcomes, unpack_outcomes
from test_latex import compile_doc, fixture, hostile, needs_pdflatex

CONFIG = """\
experiment: ci
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 200, batch_size: 100, calibration: {{size: 32}}}}
cost: {{profiles: [bitops]}}
seeds: [0, 1]
methods:
  - fp32
  - {{name: user_methods:ScaleWeights, params: {{noise: 0.08}}}}
"""
NEW_KEYS = ("ci95", "fp32_ci95", "delta_ci95", "ci_method", "outcomes")


def _run(write_config, tmp_path, force=False):
    cfg = write_config(CONFIG.format(out=tmp_path / "runs"), "ci.yaml")
    summary = qcard.run(cfg, progress=False, force=force)
    assert summary.ok
    paths = sorted((tmp_path / "runs" / "ci").glob("*/card.json"))
    return {json.loads(p.read_text())["method"]["name"]: p for p in paths}


def _popcount(bits: str, n: int) -> int:
    return int(unpack_outcomes(bits, n).sum())


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outcomes")
    def write(text, name):
        (tmp / name).write_text(text)
        return tmp / name
    return tmp, _run(write, tmp)


def test_cards_carry_outcomes_that_match_their_accuracies(ran):
    _, paths = ran
    for name, path in paths.items():
        card = json.loads(path.read_text())
        r, n = card["results"], card["dataset"]["eval_size"]
        o = r["outcomes"]
        assert o["encoding"] == "packbits-base64" and o["n"] == n == 200
        assert o["fingerprint"] == card["dataset"]["fingerprint"]
        assert _popcount(o["fp32"], n) == round(r["fp32"] * n / 100)
        assert sorted(o["seeds"]) == ["0", "1"]
        for row in r["per_seed"]:
            assert set(row) == {"seed", "top1", "top5"}          # per-seed rows as before
            assert _popcount(o["seeds"][str(row["seed"])], n) == round(row["top1"] * n / 100)
        bits = [unpack_outcomes(o["seeds"][s], n) for s in ("0", "1")]
        fp = unpack_outcomes(o["fp32"], n)
        assert r["ci95"] == pytest.approx(list(accuracy_interval(bits)), abs=1e-4)
        assert r["fp32_ci95"] == pytest.approx(list(accuracy_interval([fp])), abs=1e-4)
        assert r["ci95"][0] <= r["quantized"] <= r["ci95"][1]
        assert r["fp32_ci95"][0] <= r["fp32"] <= r["fp32_ci95"][1]
        if name == "fp32":      # the FP32 point is the baseline itself: the same bits, Δ 0 with no interval
            assert set(o["seeds"].values()) == {o["fp32"]}
            assert r["delta"] == 0 and r["delta_ci95"] is None
            continue
        assert r["delta_ci95"] == pytest.approx(list(paired_delta_interval(bits, [fp])), abs=1e-4)
        assert r["delta_ci95"][0] <= r["delta"] <= r["delta_ci95"][1]
        assert "Wilson" in r["ci_method"] and "2 seeds" in r["ci_method"] and "200" in r["ci_method"]
    noisy = json.loads(paths["scale_weights"].read_text())["results"]
    assert noisy["outcomes"]["seeds"]["0"] != noisy["outcomes"]["seeds"]["1"]   # the seeds really differ


def test_outcomes_grow_the_card_by_less_than_1kb_per_1000_images_per_seed(ran):
    _, paths = ran
    card = json.loads(paths["scale_weights"].read_text())
    full = load_card(paths["scale_weights"]).to_json()
    for key in NEW_KEYS:
        card["results"][key] = None
    without = qcard.cards.schema.card_from_dict(card).to_json()
    n, seeds = 200, 2
    assert len(full) - len(without) < 1000 * seeds * max(n / 1000, 1)
    # on 10,000 images the bits dominate: 1,667 characters per seed, FP32's once
    rng = np.random.default_rng(0)
    bits = {s: pack_outcomes(rng.random(10_000) < 0.9) for s in (0, 1, 2)}
    fp32 = {"top1": 90.0, "top5": 99.0, "n": 10_000, "outcomes": pack_outcomes(rng.random(10_000) < 0.9)}
    rows = [{"seed": s, "top1": 90.0, "top5": 99.0} for s in bits]
    block = _results_block(fp32, rows, list(bits), bits, "f" * 64)
    plain = _results_block({k: v for k, v in fp32.items() if k != "outcomes"}, rows, list(bits))
    assert not set(NEW_KEYS) & set(plain)
    grown = len(json.dumps(block)) - len(json.dumps(plain))
    assert grown < 1000 * 10 * 3


def test_renderings_print_the_intervals(ran):
    _, paths = ran
    card = load_card(paths["scale_weights"])
    r = card.results
    lo, hi = r.ci95
    md = render_card(card, "md")
    assert f"{r.quantized:.2f} ± {r.std:.2f} \\[{lo:.1f}, {hi:.1f}\\]" in md
    assert f"{r.fp32:.2f} \\[{r.fp32_ci95[0]:.1f}, {r.fp32_ci95[1]:.1f}\\]" in md
    assert "In brackets: 95 % Wilson score intervals over the 200 eval images" in md
    html = render_card(card, "html")
    assert f"[{lo:.1f}, {hi:.1f}]" in html and 'id="intervals"' in html
    tex = render_card(card, "tex")
    assert f"[{lo:.1f}, {hi:.1f}]" in tex and "In brackets" in tex and "−" not in tex


def test_delta_interval_is_signed_with_a_true_minus():
    card = fixture("ptq_w4a8_resnet18")
    card["results"].update(delta=0.2, ci95=[97.9, 99.3], fp32_ci95=[97.8, 99.2], delta_ci95=[-0.3, 0.7],
                           ci_method="95 % Wilson score intervals over the 1,000 eval images; Δ: paired")
    md = render_card(card, "md")
    assert "+0.20 \\[−0.3, +0.7\\]" in md
    assert "--0.3, +0.7" in render_card(card, "tex")


def test_v1_cards_render_without_intervals():
    for name in ("ptq_w4a8_resnet18", "sparq_resnet18", "marvin_resnet8"):
        card = fixture(name)
        assert card["schema_version"] == "1"
        for fmt in ("md", "html", "tex"):
            text = render_card(card, fmt)
            assert "In brackets" not in text and "Wilson" not in text


def test_header_shows_description_and_model_label():
    card = fixture("ptq_w4a8_resnet18")
    ref = card["model"]["ref"]
    card["description"] = "W4A8 per-tensor, the paper's Table 2 setting"
    card["model"]["label"] = "ResNet-18 (ours)"
    for fmt in ("md", "html", "tex"):
        text = render_card(card, fmt)
        assert "Description" in text and "Table 2 setting" in text
        assert "ResNet-18 (ours)" in text
    assert f"| Model | {ref} (ResNet-18 (ours)) (" in render_card(card, "md")
    plain = render_card(fixture("ptq_w4a8_resnet18"), "md")
    assert "Description" not in plain


@needs_pdflatex
def test_card_with_intervals_compiles(tmp_path, ran):
    _, paths = ran
    card = json.loads(paths["scale_weights"].read_text())
    card["results"]["delta_ci95"] = [-1.25, 0.5]        # a negative bound: the minus sign must compile
    compile_doc(tmp_path, render_card(hostile(card), "tex"))


def test_stale_baseline_cache_without_outcomes_is_measured_again(write_config, tmp_path):
    paths = _run(write_config, tmp_path)
    true_fp32 = json.loads(paths["fp32"].read_text())["results"]["fp32"]
    cached = list((tmp_path / "runs" / ".cache" / "fp32").glob("*.json"))
    assert len(cached) == 1
    # what an older qcard wrote: no outcomes (and a number that would show if it were used)
    cached[0].write_text(json.dumps({"top1": 12.5, "top5": 50.0, "n": 200}))
    paths = _run(write_config, tmp_path, force=True)
    for path in paths.values():
        r = json.loads(path.read_text())["results"]
        assert r["fp32"] == true_fp32 and r["outcomes"]["fp32"] and r["fp32_ci95"]
    entry = json.loads(cached[0].read_text())
    assert entry["top1"] == true_fp32 and _popcount(entry["outcomes"], 200) == round(true_fp32 * 2)
    # a corrupt entry (bits that do not fit the eval set) is measured again too
    cached[0].write_text(json.dumps({**entry, "outcomes": pack_outcomes([True] * 8)}))
    paths = _run(write_config, tmp_path, force=True)
    assert json.loads(paths["fp32"].read_text())["results"]["fp32"] == true_fp32
    assert json.loads(cached[0].read_text())["outcomes"] == entry["outcomes"]
