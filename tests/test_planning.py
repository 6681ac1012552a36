"""`qcard run --dry-run` lists each point's work; `--estimate` turns it into wall time (issue #24 item 5)."""
from __future__ import annotations

import re

from click.testing import CliRunner

from qcard.cli import main
from qcard.config import load_config
from qcard.methods.work import train_work
from qcard.planning import fmt_seconds, plan_points
from qcard.training import TrainRecipe

SWEEP = """\
experiment: plan
models: [qcard:mlp]
dataset: {ref: qcard:mnist5k, eval_size: 300, calibration: {size: 128}}
seeds: [0, 1]
methods:
  - fp32
  - {name: ptq, params: {w_bits: 4, a_bits: 8, pipeline: qdrop, reconstruction: {unit: layer, iters: 20000}}}
  - {name: ptq, params: {w_bits: 8, a_bits: 8, pipeline: standard_adaround, sensitivity: sqnr}}
  - {name: qat, params: {w_bits: 4, a_bits: 4, train: {epochs: 3, batch_size: 100}}}
  - {name: marvin, params: {train: {epochs: 2, batch_size: 50, max_steps: 70}}}
  - {name: sparq}
  - {name: fp32_train, params: {train: {epochs: 1, batch_size: 64, grad_accumulation: 2}}}
"""


def test_train_work_counts_steps_and_images():
    assert train_work(TrainRecipe(epochs=3, batch_size=100), 4000) == {"steps": 120, "images": 12000, "model": "fp32"}
    # 63 batches of 64 per epoch, 2 per step: 32 steps; max_steps caps
    assert train_work(TrainRecipe(epochs=1, batch_size=64, grad_accumulation=2), 4000)["steps"] == 32
    assert train_work(TrainRecipe(epochs=5, batch_size=50, max_steps=70), 4000)["images"] == 3500


def test_plan_of_each_method(write_config):
    exp = load_config(write_config(SWEEP))
    plans = {p.point.method_label + ("-" + p.point.params.pipeline if hasattr(p.point.params, "pipeline") else ""): p
             for p in plan_points(exp, exp.points())}
    layers = plans["fp32"].facts.layers
    assert layers == 3                                       # qcard:mlp: three Linear layers
    fp32 = plans["fp32"]
    assert fp32.fp32_eval == 300 and fp32.work["quantized_eval"] == 0 and not fp32.work["passes"]
    qdrop = plans["ptq-qdrop"]
    assert qdrop.fp32_eval == 0                              # the baseline is shared with the fp32 point
    assert qdrop.work["reconstruction"] == [{"step": "qdrop", "unit": "layer", "iters": 20000, "batch": 32,
                                              "units": layers}]
    assert [r["what"] for r in qdrop.work["passes"]] == ["read calibration images", "activation ranges"]
    ada = plans["ptq-standard_adaround"]
    assert ada.work["reconstruction"][0]["iters"] == 10000 and ada.work["reconstruction"][0]["units"] == layers
    sens = [r for r in ada.work["passes"] if "sensitivity" in r["what"]][0]
    assert sens["count"] == layers + 1 and sens["images"] == 128
    assert plans["qat"].work["train"] == {"steps": 120, "images": 12000, "model": "quantized"}
    assert plans["marvin"].work["train"]["steps"] == 70
    assert [r["images"] for r in plans["sparq"].work["passes"]][-1] == 128     # stats_size capped by calibration
    assert plans["fp32_train"].work["train"]["steps"] == 32 and plans["fp32_train"].work["quantized_eval"] == 300


def test_dry_run_prints_work_and_total(write_config):
    path = write_config(SWEEP)
    r = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "reconstruction qdrop: 20,000 iterations × 3 layers (batch 32) = 60,000 unit iterations × 2 seeds" in r.output
    assert "training (quantized model): 120 steps, 12,000 images forward+backward × 2 seeds" in r.output
    # 7 points: one FP32 baseline of 300 images, six methods x 2 seeds x 300 quantized images
    total = re.search(r"sweep total: 7 point\(s\); ([\d,]+) images evaluated; ([\d,]+) training steps; "
                      r"([\d,]+) reconstruction unit iterations", r.output)
    assert total, r.output
    assert total.group(1) == f"{300 + 6 * 2 * 300:,}"
    assert total.group(2) == f"{2 * (120 + 70 + 32):,}"
    assert total.group(3) == f"{2 * (20000 * 3 + 10000 * 3):,}"
    assert "estimated" not in r.output                      # no probe without --estimate


def test_estimate_times_the_points(write_config):
    path = write_config("experiment: e\nmodels: [qcard:mlp]\ndataset: {ref: qcard:mnist5k, calibration: {size: 64}}\n"
                        "methods:\n  - fp32\n  - {name: ptq, params: {w_bits: 4, a_bits: 8, pipeline: qdrop, "
                        "reconstruction: {iters: 20000}}}\n  - {name: ptq, params: {w_bits: 4, a_bits: 8, pipeline: "
                        "qdrop, reconstruction: {iters: 200}}}\n")
    exp = load_config(path)
    plans = plan_points(exp, exp.points(), estimate=True)
    assert all(p.seconds and p.seconds > 0 for p in plans)
    assert plans[1].facts.blocks is not None and plans[1].work["reconstruction"][0]["units"] == plans[1].facts.blocks
    # the reconstruction part scales with the iterations (the probe is the same for both points)
    long, short = plans[1].parts["reconstruction"], plans[2].parts["reconstruction"]
    assert long > 20 * short
    r = CliRunner().invoke(main, ["run", str(path), "--estimate"])
    assert r.exit_code == 0, r.output
    assert r.output.count("estimated: ") == 3 and "estimated wall time: " in r.output
    assert not (path.parent / "runs").exists()               # nothing ran


def test_fmt_seconds():
    assert fmt_seconds(42) == "42 s" and fmt_seconds(600) == "10 min"
    assert fmt_seconds(3 * 3600 + 120) == "3 h 02 min" and fmt_seconds(3 * 86400) == "3.0 days"
