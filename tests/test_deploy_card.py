"""Deploy check through the runner, the card (md/html/tex) and `qcard export`."""
import json
import sys

import onnx
import pytest
from click.testing import CliRunner

from qcard.cards.render import render_card
from qcard.cli import main
from qcard.runner import run
from test_latex import compile_doc, needs_pdflatex

CONFIG = """
experiment: deploy_small
seeds: [0]
models: [qcard:mlp]
dataset: {ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {size: 64, seed: 0}}
methods:
  - {name: ptq, label: W8A8, params: {w_bits: 8, a_bits: 8, pipeline: minmax},
     deploy: {runtime: onnxruntime, threads: 1, batch_sizes: [1, 4], latency_runs: 2, latency_budget_s: 0.5}}
  - {name: ptq, label: W4A4, params: {w_bits: 4, a_bits: 4, pipeline: minmax},
     deploy: {threads: 1, batch_sizes: [1], latency_runs: 1}}
cost: {profiles: [bitops]}
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    cfg = root / "c.yaml"
    cfg.write_text(CONFIG)
    summary = run(str(cfg), out=str(root / "runs"), progress=False, log=lambda m: None)
    assert summary.ok
    cards = {o.point.method_label: json.loads((o.folder / "card.json").read_text()) for o in summary.outcomes}
    return cfg, {k: (summary.outcomes[i].folder, c) for i, (k, c) in enumerate(cards.items())}


def test_runner_puts_the_deployment_on_the_card(ran):
    _, cards = ran
    d = cards["W8A8"][1]["deployment"]
    assert d["status"] == "ok" and d["eval_size"] == 200 and d["threads"] == 1
    assert d["top1_simulated"] == cards["W8A8"][1]["results"]["quantized"]   # the same images, the same model
    assert abs(d["top1"] - d["top1_simulated"]) <= 0.5
    assert [r["batch_size"] for r in d["latency"]] == [1, 4] and all(r["runs"] >= 2 for r in d["latency"])
    for r in d["latency"]:       # the spread: quartiles, and a flag when it stayed large to the end of the budget
        assert r["speedup_iqr"][0] <= r["speedup_iqr"][1] and r["seconds"] > 0
        assert r["large_spread"] == (r["spread"] > 0.10) and (r["runs"] == 2 or r["large_spread"]
                                                                or r["seconds"] >= 0.5 or r["spread"] <= 0.10)
    assert d["integer_macs"]["share"] == 1.0 and d["agreement_informative"] is True
    assert d["simulated_speedup"] == cards["W8A8"][1]["cost"]["speedup_vs_fp32"]
    w4 = cards["W4A4"][1]["deployment"]
    assert w4["status"] == "not_deployable" and "4-bit activations" in w4["reason"]
    assert cards["W4A4"][1]["status"] == "ok"                              # the simulation's card stands


def test_card_renders_the_deployment(ran, tmp_path):
    _, cards = ran
    ok, nd = cards["W8A8"][1], cards["W4A4"][1]
    md = render_card(ok, "md")
    assert "Deployment on onnxruntime: accuracy" in md and "Runtime latency" in md and "QGemm" in md
    assert "identical argmax" in md and "simulated speedup" in md
    assert "not deployable on onnxruntime: " in render_card(nd, "md")
    html = render_card(ok, "html")
    assert "Runtime latency" in html and "top-1 on the runtime" in html
    tex = render_card(ok, "tex") + "\n" + render_card(nd, "tex")
    assert "Runtime latency" in tex
    if needs_pdflatex.args[0]:          # no pdflatex here: test_latex reports that (and fails in CI)
        return
    compile_doc(tmp_path, tex)


def test_export_command_writes_the_cards_model(ran, tmp_path):
    _, cards = ran
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", str(cards["W8A8"][0]), "--format", "onnx", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "ONNX QDQ, opset 13" in r.output
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Gemm"} <= ops
    r = CliRunner().invoke(main, ["export", str(cards["W4A4"][0] / "card.json"), "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "not deployable on onnxruntime: " in r.output and "4-bit activations" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "no card here" in r.output


def test_run_without_the_runtime_exits_2_before_any_point(ran, tmp_path, monkeypatch):
    cfg, _ = ran
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = CliRunner().invoke(main, ["run", str(cfg), "--out", str(tmp_path / "runs"), "--force"])
    assert r.exit_code == 2 and "pip install 'qcard[deploy]'" in r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("card.json"))
