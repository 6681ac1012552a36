"""The runner and store: cards per point, resume, failures recorded, determinism, interruption."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import qcard
from qcard.cards.schema import load_card
from qcard.cli import main

BASE = """\
experiment: {name}
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 200, batch_size: 100, calibration: {{size: 32}}}}
cost: {{profiles: [bitops]}}
"""


def make(write_config, tmp_path, methods: str, name="t", extra="", models=None, fname=None):
    text = BASE.format(name=name, out=tmp_path / "runs")
    if models:
        text = text.replace("models: [qcard:lenet5]", f"models: {models}")
    return write_config(text + extra + "methods:\n" + methods, fname or f"{name}.yaml")


def cards_of(root: Path):
    return sorted(root.glob("*/card.json"))


def test_run_writes_valid_cards_and_fp32_equals_baseline(write_config, tmp_path):
    cfg = make(write_config, tmp_path, "  - fp32\n  - {name: user_methods:ScaleWeights, params: {factor: [1.0, 0.3]}}\n")
    summary = qcard.run(cfg, progress=False)
    assert summary.ok and len(summary.outcomes) == 3
    paths = cards_of(tmp_path / "runs" / "t")
    assert len(paths) == 3
    cards = [load_card(p) for p in paths]
    by_label = {(c.method.label, c.method.params.get("factor")): c for c in cards}
    fp32 = by_label[("fp32", None)]
    assert fp32.results.quantized == fp32.results.fp32 and fp32.results.delta == 0
    assert fp32.results.fp32 > 90  # the bundled LeNet on 200 held-out MNIST images
    assert by_label[("scale_weights", 1.0)].results.quantized == fp32.results.fp32
    # shrinking weights by 0.3 changes the logits' scale only through non-linearities: the card must show
    # the measured value, whatever it is, next to the same baseline
    scaled = by_label[("scale_weights", 0.3)]
    assert scaled.results.fp32 == fp32.results.fp32
    assert scaled.results.delta == pytest.approx(scaled.results.quantized - scaled.results.fp32, abs=1e-3)
    for c in cards:
        assert c.status == "ok"
        assert c.dataset.eval_size == 200
        assert c.provenance.torch and c.provenance.python and c.provenance.wall_seconds is not None
        assert " qcard run " in f" {c.reproduce}" and c.id[:10] in c.reproduce   # after a PYTHONPATH for user code
        assert c.cost.profile == "bitops" and c.cost.macs > 0
        assert (paths[0].parent.parent / c.model.ref).name  # sanity
    md = (paths[0].parent / "card.md").read_text()
    assert "Quantization card" in md and "Reproduce" in md


def test_same_config_twice_gives_identical_results(write_config, tmp_path):
    methods = "  - {name: user_methods:ScaleWeights, params: {noise: 0.05}}\n"
    a = make(write_config, tmp_path / "a", methods, name="det", extra="seeds: [0, 1]\n", fname="a.yaml")
    b = make(write_config, tmp_path / "b", methods, name="det", extra="seeds: [0, 1]\n", fname="b.yaml")
    qcard.run(a, progress=False)
    qcard.run(b, progress=False)
    ca = json.loads(next((tmp_path / "a" / "runs" / "det").glob("*/card.json")).read_text())
    cb = json.loads(next((tmp_path / "b" / "runs" / "det").glob("*/card.json")).read_text())
    assert ca["results"] == cb["results"]
    assert ca["id"] == cb["id"]
    assert ca["results"]["n_runs"] == 2 and ca["results"]["std"] is not None
    # the seeds really matter: the two seeds' noise gives different accuracies
    assert len({r["top1"] for r in ca["results"]["per_seed"]}) == 2
    # the full method statistics are the last seed's; each seed's headline figures are kept
    assert ca["method_stats"]["stats_seed"] == 1
    assert [r["seed"] for r in ca["method_stats"]["per_seed"]] == [0, 1]


def test_scalar_figures_keep_headline_numbers_not_tables():
    from qcard.runner import _scalar_figures
    stats = {"marvin": {"inference_speedup": 1.9, "switch_count": 12, "layers": {"a": {"bits": 8}},
                        "trajectory": [1, 2], "mode": "kl", "note": "x" * 80, "flag": True},
             "graph_mode": "fx", "training": {"final_loss": 0.1, "curve": [{"step": 1}]}}
    assert _scalar_figures(stats) == {"marvin.inference_speedup": 1.9, "marvin.switch_count": 12,
                                      "marvin.mode": "kl", "graph_mode": "fx", "training.final_loss": 0.1}


def test_rerun_skips_finished_points_and_force_reruns(write_config, tmp_path):
    cfg = make(write_config, tmp_path, "  - fp32\n")
    qcard.run(cfg, progress=False)
    card = cards_of(tmp_path / "runs" / "t")[0]
    first = card.stat().st_mtime_ns
    summary = qcard.run(cfg, progress=False)
    assert [o.status for o in summary.outcomes] == ["skipped"]
    assert card.stat().st_mtime_ns == first
    summary = qcard.run(cfg, force=True, progress=False)
    assert [o.status for o in summary.outcomes] == ["ok"]


def test_failed_point_is_recorded_and_others_go_on(write_config, tmp_path):
    cfg = make(write_config, tmp_path, "  - {name: user_methods:ScaleWeights, params: {fail: [true, false]}}\n"
                                        "  - {name: user_methods:ScaleWeights, label: nan, params: {nan: true}}\n")
    result = CliRunner().invoke(main, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 1, result.output
    cards = {p.parent.name: json.loads(p.read_text()) for p in cards_of(tmp_path / "runs" / "t")}
    statuses = sorted(c["status"] for c in cards.values())
    assert statuses == ["failed", "failed", "ok"]
    errors = " ".join(c["error"] or "" for c in cards.values())
    assert "asked to fail" in errors
    assert "NaN" in errors
    for folder, c in cards.items():
        if c["status"] == "failed":
            assert (tmp_path / "runs" / "t" / folder / "error.log").exists()
            load_card(tmp_path / "runs" / "t" / folder / "card.json")  # failed cards are valid cards too
    # a rerun retries the failed points but skips the finished one
    summary = qcard.run(cfg, progress=False)
    assert sorted(o.status for o in summary.outcomes) == ["failed", "failed", "skipped"]


def test_sigkill_midway_then_rerun_finishes_every_point_once(write_config, tmp_path, subprocess_env):
    cfg = make(write_config, tmp_path, "  - {name: user_methods:ScaleWeights, params: {delay: 1.5, factor: [1.0, 0.9, 0.8, 0.7]}}\n",
               name="kill")
    out = tmp_path / "runs" / "kill"
    proc = subprocess.Popen([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress"],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(cards_of(out)) < 1:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the next point
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(cards_of(out))
    assert 1 <= done_before < 4
    result = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress"],
                            env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("already done, skipped") == done_before
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 4
    for folder in folders:
        names = sorted(p.name for p in folder.iterdir())
        assert names.count("card.json") == 1
        assert not [n for n in names if n.startswith(".tmp-")]
        json.loads((folder / "card.json").read_text())  # complete JSON


def test_torchvision_and_timm_random_weights_flow_through_on_synthetic(write_config, tmp_path):
    text = f"""\
experiment: zoo
out: {tmp_path / 'runs'}
models:
  - {{ref: torchvision:resnet18, num_classes: 10}}
  - {{ref: timm:mobilenetv3_small_050, num_classes: 10}}
dataset: {{ref: synthetic, input_shape: [3, 32, 32], num_classes: 10, size: 8, batch_size: 8}}
methods: [fp32]
cost: {{profiles: [bitops]}}
"""
    summary = qcard.run(write_config(text, "zoo.yaml"), progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    cards = [load_card(p) for p in cards_of(tmp_path / "runs" / "zoo")]
    assert {c.model.source for c in cards} == {"torchvision", "timm"}
    assert all(c.cost.macs > 0 and c.model.params > 0 for c in cards)


def test_python_model_and_imagefolder(write_config, tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "images" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    text = f"""\
experiment: folder
out: {tmp_path / 'runs'}
models: [{{ref: "python:torchvision.models:resnet18", num_classes: 2, kwargs: {{zero_init_residual: true}}}}]
dataset: {{ref: "imagefolder:{tmp_path / 'images'}", eval_split: val, batch_size: 4, calibration: {{size: 2}}}}
methods: [fp32]
cost: {{profiles: [bitops]}}
"""
    summary = qcard.run(write_config(text, "folder.yaml"), progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    card = load_card(cards_of(tmp_path / "runs" / "folder")[0])
    assert card.model.source == "python" and card.dataset.eval_size == 6


def test_workers_run_points_in_parallel_processes_with_the_same_cards(write_config, tmp_path):
    """--workers 2: every point runs in a worker process and writes the same results as a sequential run;
    the summary keeps the config's order; a rerun skips the finished points."""
    methods = "  - fp32\n  - {name: user_methods:ScaleWeights, params: {factor: [1.0, 0.5, 0.25]}}\n"
    seq = make(write_config, tmp_path / "seq", methods, name="w", fname="seq.yaml")
    par = make(write_config, tmp_path / "par", methods, name="w", fname="par.yaml")
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = qcard.run(seq, progress=False)
    finally:
        torch.set_num_threads(threads)
    lines = []
    from qcard.runner import run as run_exp
    b = run_exp(par, progress=False, workers=2, log=lines.append)
    assert a.ok and b.ok and len(b.outcomes) == len(a.outcomes) == 4
    assert any("2 worker processes" in l for l in lines)
    ra = {o.point.id: o.card["results"]["quantized"] for o in a.outcomes}
    rb = {o.point.id: o.card["results"]["quantized"] for o in b.outcomes}
    assert ra == rb
    assert [o.point.id for o in b.outcomes] == [o.point.id for o in a.outcomes]     # config order
    for o in b.outcomes:
        assert (o.folder / "card.json").is_file() and (o.folder / "card.md").is_file()
    again = run_exp(par, progress=False, workers=2, log=lines.append)
    assert [o.status for o in again.outcomes] == ["skipped"] * 4


def test_a_card_that_cannot_be_rendered_keeps_its_results(write_config, tmp_path, monkeypatch):
    import qcard.cards.render as render
    def broken(card, fmt="md"):
        raise ValueError("template exploded")
    monkeypatch.setattr(render, "render_card", broken)
    lines = []
    from qcard.runner import run as run_exp
    summary = run_exp(make(write_config, tmp_path, "  - fp32\n"), progress=False, log=lines.append)
    assert summary.ok
    folder = summary.outcomes[0].folder
    assert json.loads((folder / "card.json").read_text())["status"] == "ok"
    assert "Rendering failed (ValueError: template exploded)" in (folder / "card.md").read_text()
    assert any("could not be rendered" in l for l in lines)


def test_method_records_merge_by_name_and_unmatched_ones_are_reported(write_config, tmp_path):
    """A method's per-layer record joins the traced layer of the same name; one whose name matches no traced
    op is never appended to the cost (it has no shapes) and the card says so."""
    cfg = make(write_config, tmp_path, "  - {name: user_methods:ScaleWeights, params: {records: [[conv1, conv9]]}}\n")
    summary = qcard.run(cfg, progress=False)
    assert summary.ok
    card = load_card(cards_of(summary.out_dir)[0])
    layers = {layer.name: layer for layer in card.cost.layers}
    assert layers["conv1"].weight_bits == 8 and layers["conv2"].weight_bits == 32     # FP32 where not reported
    assert "conv9" not in layers
    assert any("conv9 (conv2d)" in w and "match no traced layer" in w for w in card.warnings)
