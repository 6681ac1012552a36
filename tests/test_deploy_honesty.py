"""Deploy honesty (issue 21): what ran on integer kernels (by share of the MACs), agreement that says
nothing on outputs that do not vary, latency with its spread, and export beyond the bundled models."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qcard.cards.compare import runtime_cell as _runtime_cell, runtime_gaps as _runtime_gaps
from qcard.cards.render import render_card
from qcard.cards.schema import card_from_dict
from qcard.data import load_dataset
from qcard.deploy import deploy_check
from qcard.deploy.check import _latency_notes, latency_row
from qcard.deploy.runtime import SPREAD_SMALL, latency
from qcard.runner import run
from test_quant_support import one_thread, run_ptq

CONFIG = """
experiment: deploy_honesty
seeds: [0]
models: [qcard:resnet8]
dataset: {ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {size: 64, seed: 0}}
methods:
  - {name: ptq, label: W4A8, params: {w_bits: 4, a_bits: 8, w_granularity: per_channel, pipeline: minmax},
     deploy: {batch_sizes: [1], latency_runs: 3, latency_budget_s: 0.5}}
  - {name: ptq, label: eager, params: {w_bits: 8, a_bits: 8, pipeline: minmax, graph_mode: eager},
     deploy: {batch_sizes: [1], latency_runs: 3, latency_budget_s: 0.5}}
cost: {profiles: [bitops]}
"""
FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    root = tmp_path_factory.mktemp("honesty")
    (root / "c.yaml").write_text(CONFIG)
    with one_thread():
        summary = run(str(root / "c.yaml"), out=str(root / "runs"), progress=False, log=lambda m: None)
    assert summary.ok
    return {o.point.method_label: json.loads((o.folder / "card.json").read_text()) for o in summary.outcomes}


def test_resnet8_w4a8_default_deploy_runs_every_conv_on_integer_kernels(cards):
    """The acceptance of issue 21: no int4 at opset 21 unless asked, so QLinearConv x9 and no float conv/gemm."""
    d = cards["W4A8"]["deployment"]
    assert d["status"] == "ok" and d["opset"] == 13 and set(d["export"]["weight_types"]) == {"int8"}
    assert d["integer_ops"]["QLinearConv"] == 9 and d["integer_ops"]["QGemm"] == 1
    assert not FLOAT_COMPUTE & set(d["float_ops"]), d["float_ops"]
    macs = d["integer_macs"]
    assert macs["share"] == 1.0 and macs["float"] == 0 and macs["float_ops"] == []
    # resnet8 at 1x28x28: the MACs are the cost model's, counted here from the runtime's shapes
    assert macs["integer"] == cards["W4A8"]["cost"]["macs"]
    md = render_card(cards["W4A8"], "md")
    assert "| int8 ms |" in md.replace("  ", " ") or "int8 ms" in md
    assert "Deployment: on onnxruntime" not in md          # nothing ran in float: nothing for the banner


def test_eager_placement_reports_its_mixed_kernels(cards):
    d = cards["eager"]["deployment"]
    macs = d["integer_macs"]
    assert d["status"] == "ok" and d["integer_ops"].get("QLinearConv", 0) >= 1
    assert 0 < macs["share"] < 1 and macs["integer"] + macs["float"] == cards["eager"]["cost"]["macs"]
    assert set(macs["float_ops"]) <= FLOAT_COMPUTE and macs["float_ops"]
    assert sum(macs["float_op_counts"].values()) == len(macs["float_layers"])
    md = render_card(cards["eager"], "md")
    banner = md[:md.index("Deployment on onnxruntime: accuracy")]
    pct = f"{100 * macs['share']:.1f} % of the conv/gemm/matmul MACs ran on integer kernels (QLinearConv"
    assert pct in banner and "in float: " in banner and "not an int8 latency" in banner
    assert "QDQ graph ms" in md and "int8 ms" not in md       # the latency row is not labelled int8
    for fmt in ("html", "tex"):
        assert "not an int8 latency" in render_card(cards["eager"], fmt)


def test_eager_integer_share_is_what_the_runtime_ran(tmp_path):
    """The card's split of conv/gemm MACs into integer and float kernels (matched to the exported graph by
    name) equals the one read from onnxruntime's own profile of the optimized graph (the conformance
    matrix's independent count, which takes pre-packed int8 weights' dims from the graph)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from conformance_checks import runtime_mac_share
    from qcard.deploy.runtime import make_session
    from test_quant_support import bundled
    data = torch.utils.data.Subset(load_dataset("qcard:mnist5k", "test"), range(64))
    with one_thread():
        sim = run_ptq(bundled("resnet8").eval(), w_bits=8, a_bits=8, pipeline="minmax", graph_mode="eager").model
        d = deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1,
                         keep=str(tmp_path / "qdq.onnx"))
        make_session(tmp_path / "qdq.onnx", 1, tmp_path / "opt.onnx")
        x = torch.stack([data[i][0] for i in range(1)]).float().numpy()
        rt = runtime_mac_share(str(tmp_path / "opt.onnx"), x)
    macs = d["integer_macs"]
    assert d["status"] == "ok" and rt["integer"] > 0 and rt["float"] > 0, rt
    assert (macs["integer"], macs["float"]) == (rt["integer"], rt["float"]), (macs, rt)
    assert macs["float_op_counts"] == rt["float_ops"]
    assert sum(rt["integer_ops"].values()) + sum(rt["float_ops"].values()) == 10   # 9 convs + the classifier


class FusedAttention(nn.Module):
    """timm-style attention in forward code (F.scaled_dot_product_attention): rows of the image as tokens."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(28, 48)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        q, k, v = self.qkv(x.flatten(1, 2)).unsqueeze(1).chunk(3, dim=-1)
        return self.head(nn.functional.scaled_dot_product_attention(q, k, v).mean(dim=(1, 2)))


def test_eager_fused_attention_exports_at_the_opset_it_needs():
    """ONNX has scaled_dot_product_attention's ops from opset 14: with no opset asked the export takes the
    lowest that has every op and the card says why; an asked opset that is too low names the op."""
    torch.manual_seed(0)
    data = torch.utils.data.Subset(load_dataset("qcard:mnist5k", "test"), range(32))
    with one_thread():
        sim = run_ptq(FusedAttention().eval(), w_bits=8, a_bits=8, pipeline="minmax", graph_mode="eager").model
        d = deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1)
        low = deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1, opset=13)
    assert d["status"] == "ok" and d["opset"] == 14, d.get("reason")
    assert any(n.startswith("exported at opset 14 (default 13): the graph has aten::scaled_dot_product_attention")
               for n in d["notes"]), d["notes"]
    assert d["argmax_agreement"] == 1.0
    assert low["status"] == "failed" and "deploy.opset 13" in low["reason"] and "from opset 14" in low["reason"]


class TwoLayer(nn.Module):
    def __init__(self, w_scale: float, bias_class: int, bias: float):
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 10)
        with torch.no_grad():
            self.fc2.weight.mul_(w_scale)
            self.fc2.bias.zero_()
            self.fc2.bias[bias_class] = bias

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("w_scale, words", [(0.0, "the same for all 100 images"),
                                            (0.05, "predicts class 3 for all 100 images")])
def test_degenerate_outputs_make_agreement_not_informative(w_scale, words, cards):
    torch.manual_seed(0)
    data = torch.utils.data.Subset(load_dataset("qcard:mnist5k", "test"), range(100))
    with one_thread():
        sim = run_ptq(TwoLayer(w_scale, 3, 4.0).eval(), w_bits=8, a_bits=8, pipeline="minmax").model
        d = deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1)
    assert d["status"] == "ok" and d["argmax_agreement"] == 1.0
    assert d["agreement_informative"] is False and words in d["agreement_note"], d["agreement_note"]
    assert d["simulated_outputs"]["argmax_classes"] == 1 and d["simulated_outputs"]["constant"] == (w_scale == 0)
    if w_scale == 0:      # all-zero weights: float-eps scale; the runtime's int32 bias fits only after the fit
        assert any("whose weights are all zero got a weight scale" in n for n in d["notes"]), d["notes"]
    # on the card (row, note, banner) and in compare's runtime cell and differences
    card = json.loads(json.dumps(cards["W4A8"]))
    card["deployment"] = d
    md = render_card(card, "md")
    assert "(not informative: see the note)" in md and md.count(words) >= 2
    c = card_from_dict(card)
    assert _runtime_cell(c).endswith("; agreement not informative)")
    assert any("runtime agreement not informative: B" in t for t in _runtime_gaps([c], ["B"]))
    # a model whose outputs vary is informative
    assert cards["W4A8"]["deployment"]["agreement_informative"] is True
    assert cards["W4A8"]["deployment"]["simulated_outputs"]["argmax_classes"] == 10


def test_bias_out_of_int32_range_is_named(tmp_path):
    """Nonzero weights at a tiny scale cannot be rescaled (the simulation's weights would change): the
    runtime saturates the int32 bias, and the card says which layer."""
    torch.manual_seed(0)
    data = torch.utils.data.Subset(load_dataset("qcard:mnist5k", "test"), range(50))
    with one_thread():
        sim = run_ptq(TwoLayer(1e-4, 3, 1000.0).eval(), w_bits=8, a_bits=8, pipeline="minmax").model
        d = deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1)
    assert d["status"] == "ok"
    assert any(n.startswith("bias out of int32 range") and "/fc2/Gemm" in n for n in d["notes"]), d["notes"]
    assert d["argmax_agreement"] < 1.0                # the runtime saturated the bias that decides the class


class _Clock:
    """A clock that moves only when a stand-in session runs (timings independent of the machine's load)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Session:
    """A stand-in session whose call takes the next of `ms` (cycled) on `clock`."""

    def __init__(self, clock, ms):
        self.clock, self.ms, self.i = clock, ms, 0

    def get_inputs(self):
        return [type("I", (), {"name": "input"})()]

    def run(self, _outputs, _feed):
        self.clock.t += self.ms[self.i % len(self.ms)] / 1000.0
        self.i += 1
        return [None]


def test_latency_stops_early_when_steady_and_flags_a_large_spread():
    x = torch.zeros(1, 1).numpy()
    c = _Clock()
    steady = latency([_Session(c, [4.0]), _Session(c, [8.0, 8.2])], x, min_runs=5, budget_s=5.0, clock=c)
    assert len(steady.times[0]) == 5 and steady.spread() <= SPREAD_SMALL      # stopped at the minimum
    row = latency_row(1, steady)
    assert row["speedup"] == pytest.approx(2.025, abs=0.03) and row["large_spread"] is False and row["runs"] == 5
    c = _Clock()
    noisy = latency([_Session(c, [1.0, 2.0, 4.0, 9.0]), _Session(c, [8.0])], x, min_runs=3, budget_s=0.4, clock=c)
    assert len(noisy.times[0]) > 3 and noisy.seconds >= 0.4 and noisy.spread() > SPREAD_SMALL
    assert noisy.seconds < 0.4 + 0.02                                        # stopped when the budget ended
    row = latency_row(1, noisy)
    assert row["large_spread"] is True and row["runs"] == len(noisy.times[0])
    assert row["speedup_iqr"][0] < row["speedup"] < row["speedup_iqr"][1]
    assert row["int8_ms_iqr"][0] < row["int8_ms"] < row["int8_ms_iqr"][1] and row["fp32_ms_iqr"] == [8.0, 8.0]
    notes = _latency_notes([row])
    assert any("large spread" in n and f"over {row['runs']} runs" in n for n in notes)


def test_speedup_above_the_arithmetic_ratio_is_explained():
    row = {"batch_size": 1, "speedup": 5.3, "large_spread": False}
    (note,) = _latency_notes([row])
    assert "5.30× is above 4×" in note and "kernel" in note
    assert _latency_notes([{**row, "speedup": 3.9}]) == []
    noisy = _latency_notes([{**row, "large_spread": True, "speedup_iqr": [0.1, 20.0], "runs": 50, "seconds": 5.0}])
    assert len(noisy) == 2 and "large spread" in noisy[0] and "load on the machine" in noisy[1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_export_beyond_resnets(arch):
    """Export works regardless of weights: random ones, 3x64x64 inputs (mobilenet_v3_small used to raise
    RecursionError copying the model). Every conv/gemm MAC runs on an integer kernel at W8A8."""
    import torchvision
    from qcard.quant.calibrate import calibrate_activations, set_weight_ranges
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    torch.manual_seed(0)
    with one_thread():
        model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
        x = torch.randn(8, 3, 64, 64)
        sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8), x[:2], log=lambda m: None)
        set_weight_ranges(sim)
        calibrate_activations(sim, [x])
        d = deploy_check(sim, torch.utils.data.TensorDataset(x, torch.arange(8)), batch_sizes=[1],
                         latency_runs=1, latency_budget_s=0.1, eval_batch_size=8)
    assert d["status"] == "ok", d.get("reason")
    assert d["integer_macs"]["share"] == 1.0 and d["integer_macs"]["integer"] > 1e6
    assert not FLOAT_COMPUTE & set(d["float_ops"])
    # random weights: the outputs carry no information, and the card says so rather than "100 % identical"
    if d["simulated_outputs"]["argmax_classes"] <= 1:
        assert d["agreement_informative"] is False and d["agreement_note"].startswith("not informative")


ID_CONFIG = {"experiment": "ids", "models": ["qcard:mlp"], "dataset": {"ref": "qcard:mnist5k", "eval_split": "test"},
             "methods": [{"name": "ptq", "params": {"w_bits": 4, "a_bits": 8},
                          "deploy": {"batch_sizes": [1], "latency_runs": 5}}]}
# the id qcard gave this point before the deploy block gained int4_weights and latency_budget_s
ID_BEFORE = "6dc6aa48f38019d2f96798fbce759a424b4fd965faa265577e40b7329ca2c6d8"


def _point(**deploy):
    from qcard.config import config_from_dict
    cfg = json.loads(json.dumps(ID_CONFIG))
    cfg["methods"][0]["deploy"].update(deploy)
    return config_from_dict(cfg).points()[0]


def test_new_deploy_fields_keep_point_ids_unless_set():
    from qcard.errors import ConfigError
    assert _point().id == ID_BEFORE
    assert _point(int4_weights=False, latency_budget_s=5.0).id == ID_BEFORE        # defaults written out
    asked = _point(int4_weights=True)
    assert asked.id != ID_BEFORE and asked.deploy.int4_weights and asked.deploy.canonical()["int4_weights"]
    assert _point(latency_budget_s=2).id not in (ID_BEFORE, asked.id)
    with pytest.raises(ConfigError, match="int4_weights needs opset 21"):
        _point(int4_weights=True, opset=13)
