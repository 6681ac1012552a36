"""Deploy check (issue 12): the simulated model exported as ONNX QDQ with qcard's own grids and run on
onnxruntime, beside the simulation, on the same images."""
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qcard.data import load_dataset
from qcard.deploy import NotDeployable, deploy_check, export_onnx
from qcard.deploy.runtime import make_session, run
from test_quant_support import bundled, one_thread, run_ptq


@pytest.fixture(scope="module")
def mnist_test():
    return load_dataset("qcard:mnist5k", "test")         # the 1,000 held-out images cards are scored on


def _check(sim, data, **kw):
    kw = {"batch_sizes": [1], "latency_runs": 1, "eval_batch_size": 500, **kw}
    return deploy_check(sim, data, **kw)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny", "lenet5", "mlp"])
def test_w8a8_bundled_models_hold_on_onnxruntime(name, granularity, mnist_test, tmp_path):
    with one_thread():
        sim = run_ptq(bundled(name), w_bits=8, a_bits=8, w_granularity=granularity, pipeline="minmax").model
        d = _check(sim, mnist_test)
    assert d["status"] == "ok", d.get("reason")
    assert d["eval_size"] == 1000
    assert abs(d["top1"] - d["top1_simulated"]) <= 0.3, d
    assert d["argmax_agreement"] >= 0.99, d
    # every conv/linear ran as an integer kernel: nothing compute-heavy was left in float
    assert sum(d["integer_ops"].values()) >= 3
    assert not {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"} & set(d["float_ops"]), d["float_ops"]
    assert d["export"]["weight_types"] == {"int8": d["export"]["weight_dq"]}
    assert d["export"]["output_scale"] > 0 and d["logit_diff_max_steps"] <= 8
    assert d["latency"][0]["int8_ms"] > 0 and d["latency"][0]["fp32_ms"] > 0


def test_graph_carries_exactly_qcards_grids(tmp_path):
    """Scales, zero points and integer weights in the ONNX file are qcard's own, by value."""
    with one_thread():
        sim = run_ptq(bundled("lenet5"), w_bits=8, a_bits=8, w_granularity="per_channel").model
        info = export_onnx(sim, torch.zeros(2, 1, 28, 28), tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dq) == info.weight_dq == 5
    layers = {li.name: li for li in sim.qcard_sim.gemm_layers()}
    for n in dq:
        layer = n.input[0].split("/")[1]
        wq = layers[layer].weight_quantizer
        q, s, z = (inits[i] for i in n.input)
        assert q.dtype == np.int8 and dict((a.name, a.i) for a in n.attribute)["axis"] == 0
        assert np.array_equal(s, wq.scale.numpy()) and not z.any()
        deq = torch.from_numpy((q.astype(np.float32) - z.reshape(-1, *[1] * (q.ndim - 1)))
                               * s.reshape(-1, *[1] * (q.ndim - 1)))
        assert torch.equal(deq, wq(layers[layer].module.weight.detach()))
    acts = {fq.qname: fq for fq in sim.qcard_sim.act_quantizers.values()}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == info.activation_qdq == len(acts)
    scales = sorted(float(inits[n.input[1]]) for n in qs)
    assert scales == sorted(float(fq.scale) for fq in acts.values())


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_two_layer_integer_outputs_element_by_element(mnist_test, tmp_path):
    """The runtime's integer logits against the simulation's, element by element.
    Tolerance: 1 output step. The simulation rounds float products of dequantized values; the runtime
    rounds an int32 accumulator times one float multiplier (s_in·s_w/s_out). The two agree except where a
    value lies within float error of a rounding tie (x.5 steps), where they may land on neighbouring
    integers: one step, and only at such ties."""
    torch.manual_seed(0)
    with one_thread():
        sim = run_ptq(TwoLayer().eval(), w_bits=8, a_bits=8, w_granularity="per_channel", pipeline="minmax").model
        info = export_onnx(sim, torch.zeros(2, 1, 28, 28), tmp_path / "two.onnx")
        session = make_session(tmp_path / "two.onnx", 1)
        x = torch.stack([mnist_test[i][0] for i in range(1000)]).float()
        with torch.no_grad():
            ref = sim(x)
        out = torch.from_numpy(run(session, x.numpy()))
    step = info.output_scale
    q_sim, q_rt = torch.round(ref / step), torch.round(out / step)       # integer outputs (zero point cancels)
    diff = (q_sim - q_rt).abs()
    assert diff.max() <= 1, diff.max()
    assert float((diff > 0).float().mean()) < 0.01                       # ties are rare: < 1 % of the logits
    assert torch.allclose(ref, out, atol=step * 1.0001, rtol=0)


def test_torchvision_resnet18_w8a8_exports_and_runs(tmp_path):
    import torchvision
    from qcard.quant.calibrate import calibrate_activations, set_weight_ranges
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    torch.manual_seed(0)
    with one_thread():
        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        x = torch.randn(16, 3, 64, 64)
        sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8), x[:2], log=lambda m: None)
        set_weight_ranges(sim)
        calibrate_activations(sim, [x[:8]])
        data = torch.utils.data.TensorDataset(x, torch.arange(16) % 10)
        d = _check(sim, data, eval_batch_size=8)
    assert d["status"] == "ok", d.get("reason")
    assert d["integer_ops"].get("QLinearConv", 0) == 20          # 17 convs + 3 downsample convs ... all integer
    assert d["argmax_agreement"] >= 0.8 and d["eval_size"] == 16


COMPUTE_IN_FLOAT = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def test_4bit_weights_run_as_int4_or_say_why(mnist_test):
    """By default 4-bit weights go in int8 containers (opset 13) and every conv/linear runs on an integer
    kernel; int4 (opset 21) only when asked, and then the card says which layers ran in float."""
    with one_thread():
        sim = run_ptq(bundled("lenet5"), w_bits=4, a_bits=8, w_granularity="per_channel", pipeline="minmax").model
        d = _check(sim, mnist_test)
        i4 = _check(sim, mnist_test, int4_weights=True)
    assert d["status"] == "ok", d.get("reason")
    assert d["opset"] == 13 and set(d["export"]["weight_types"]) == {"int8"}
    assert d["integer_ops"].get("QLinearConv") == 2 and not COMPUTE_IN_FLOAT & set(d["float_ops"]), d["float_ops"]
    assert d["integer_macs"]["share"] == 1.0 and d["integer_macs"]["float"] == 0
    assert abs(d["top1"] - d["top1_simulated"]) <= 0.5 and d["argmax_agreement"] >= 0.99
    assert i4["status"] == "ok" and i4["opset"] == 21 and set(i4["export"]["weight_types"]) == {"int4"}
    assert i4["argmax_agreement"] >= 0.99
    if i4["integer_macs"]["share"] < 1:          # the runtime has no int4 conv kernel: the card must say so
        assert set(i4["integer_macs"]["float_ops"]) & COMPUTE_IN_FLOAT
        assert any("int4 weights" in n and "in float" in n for n in i4["notes"]), i4["notes"]
    else:
        assert not COMPUTE_IN_FLOAT & set(i4["float_ops"])


def test_4bit_weights_in_int8_containers_at_opset_13(mnist_test):
    with one_thread():
        sim = run_ptq(bundled("mlp"), w_bits=4, a_bits=8, pipeline="minmax").model
        d = _check(sim, mnist_test, opset=13)
    assert d["status"] == "ok" and d["opset"] == 13 and set(d["export"]["weight_types"]) == {"int8"}
    assert any("fewer than 8 bits" in n for n in d["notes"])
    assert d["argmax_agreement"] >= 0.99


def test_w4a4_and_method_settings_are_not_deployable(mnist_test, tmp_path):
    with one_thread():
        sim = run_ptq(bundled("mlp"), w_bits=4, a_bits=4, pipeline="minmax").model
        d = _check(sim, mnist_test)
        assert d["status"] == "not_deployable" and "4-bit activations" in d["reason"]
        with pytest.raises(NotDeployable, match="4-bit activations"):
            export_onnx(sim, torch.zeros(1, 1, 28, 28), tmp_path / "x.onnx")
        for method, words in (("sparq", "SPARQ"), ("marvin", "fixed-point")):
            d = _check(bundled("mlp"), mnist_test, method=method)
            assert d["status"] == "not_deployable" and words in d["reason"], d
        d = _check(bundled("mlp"), mnist_test)                   # a model qcard.quant did not build
        assert d["status"] == "not_deployable" and "qcard.quant" in d["reason"]
        d = _check(bundled("mlp"), mnist_test, method="fp32")
        assert d["status"] == "not_deployable" and "nothing is quantized" in d["reason"]


def test_eager_fallback_exports_its_quantizers_exactly(mnist_test):
    """Eager placement quantizes layer inputs only (no output quantizers): the graph carries those Q/DQ
    pairs, the runtime computes exactly what the simulation does, and the card says no integer kernel ran."""
    from test_quant_support import Untraceable
    with one_thread():
        sim = run_ptq(Untraceable().eval(), w_bits=8, a_bits=8, pipeline="minmax").model
        assert sim.qcard_sim.graph_mode == "eager"
        d = _check(sim, torch.utils.data.Subset(mnist_test, range(200)))
    assert d["status"] == "ok" and d["export"]["activation_qdq"] == 3 and d["export"]["weight_dq"] == 3
    assert d["argmax_agreement"] == 1.0 and d["logit_diff_max_steps"] < 1e-3
    assert d["integer_ops"] == {} and any("no integer kernel ran" in n for n in d["notes"])
    assert any("not quantized" in n for n in d["notes"])


def test_missing_runtime_names_the_extra(monkeypatch):
    from qcard.deploy import check_extra
    from qcard.errors import QcardError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    check_extra(False)                                           # not asked for: nothing needed
    with pytest.raises(QcardError, match=r"pip install 'qcard\[deploy\]'"):
        check_extra(True)
