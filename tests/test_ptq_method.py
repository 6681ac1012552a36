"""The ptq method end to end: QuantResult fields in the card's vocabulary, read from the simulated model."""
import pytest
import torch

from qcard.methods import resolve_method
from qcard.quant.calibrate import sim_info
from test_quant_support import Branchy, bundled, one_thread, randomize_bn, run_ptq

BLOCK_KEYS = {"preset", "graph_mode", "weights", "activations", "first_layer", "last_layer", "batch_norm",
              "residual_add", "concat", "avg_pool", "bias_bits", "accumulator_bits", "cross_layer_equalization",
              "bias_correction", "mixed_precision", "overrides", "unquantized_layers", "hardware_unfriendly"}
WEIGHT_KEYS = {"bits", "granularity", "group_size", "symmetric", "signed", "scale_format", "range_setting", "rounding"}
ACT_KEYS = {"bits", "granularity", "symmetric", "signed", "range_setting", "dynamic", "quant_point"}
MP_KEYS = {"enabled", "granularity", "allowed_bits", "mean_weight_bits", "mean_activation_bits",
           "max_activation_map_bits"}


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _check_block(block):
    from qcard.cards.schema import Quantization
    assert BLOCK_KEYS <= set(block) and set(block) <= BLOCK_KEYS | {"graph_mode_reason"}
    assert WEIGHT_KEYS <= set(block["weights"]) and ACT_KEYS <= set(block["activations"])
    assert MP_KEYS <= set(block["mixed_precision"])
    assert set(block["cross_layer_equalization"]) >= {"applied", "bias_absorption"}
    Quantization.model_validate(block)             # the card's own schema accepts it


def test_registered_and_minmax_result():
    assert resolve_method("ptq").name == "ptq"
    model = bundled("resnet8")
    r = run_ptq(model, pipeline="minmax")
    b = r.quantization
    _check_block(b)
    assert b["graph_mode"] == "fx" and "graph_mode_reason" not in b
    assert b["weights"] == {"bits": 8, "granularity": "per_channel", "group_size": None, "symmetric": True,
                            "signed": True, "scale_format": "float", "range_setting": "minmax", "rounding": "nearest"}
    assert b["activations"]["bits"] == 8 and b["activations"]["symmetric"] is False
    assert b["activations"]["quant_point"] == "after_activation" and b["activations"]["dynamic"] is False
    assert b["batch_norm"] == "folded" and b["residual_add"] == "quant_all"
    assert b["avg_pool"] == "requantized" and b["concat"] == "not_present"
    assert b["first_layer"]["weight_bits"] == 8 and b["first_layer"]["name"] == "conv1"
    assert b["last_layer"]["name"] == "fc"
    assert b["bias_bits"] == 32 and b["accumulator_bits"] == 32
    assert b["cross_layer_equalization"] == {"applied": False, "bias_absorption": False}
    assert b["bias_correction"] == "none" and b["unquantized_layers"] == []
    assert b["mixed_precision"]["enabled"] is False and b["mixed_precision"]["mean_weight_bits"] == 8
    assert r.pipeline == ["weight_ranges", "activation_ranges"]
    assert r.calibration == {"split": "train", "size": 256, "seed": 0, "labels_used": False}
    # records: module paths for conv/linear, "<scope>.add" for the residual adds, bits filled in
    recs = {x.name: x for x in r.layers}
    assert recs["conv1"].op == "conv2d" and recs["conv1"].weight_bits == 8 and recs["conv1"].activation_bits == 8
    assert recs["layer1.add"].op == "add" and recs["layer1.add"].activation_bits == 8
    assert recs["fc"].weight_granularity == "per_channel" and recs["fc"].activation_symmetric is False
    assert recs["pool"].op == "avgpool" and recs["pool"].output_bits == 8
    # the original model is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_standard_pipeline_reports_what_ran():
    model = bundled("mobilenet_tiny")
    r = run_ptq(model, calibration_size=64)
    b = r.quantization
    _check_block(b)
    assert r.pipeline == ["cle", "bias_absorption", "weight_ranges", "bias_correction", "activation_ranges"]
    assert b["cross_layer_equalization"]["applied"] is True
    assert b["bias_correction"] == "empirical"
    assert b["weights"]["range_setting"] == "mse"
    assert b["activations"]["range_setting"] == "mse (cross_entropy on 1)"
    assert r.stats["cle"]["pairs"] > 0 and r.stats["cle"]["relu6_replaced_by_relu"] > 0
    assert r.calibration["size"] == 64


def test_settings_show_up_as_done():
    model = randomize_bn(Branchy()).eval()
    r = run_ptq(model, pipeline="minmax", w_bits=4, a_bits=6, w_granularity="per_tensor", w_symmetric=False,
                a_symmetric=True, first_layer="8bit", last_layer="fp32", residual_add="gemm_inputs_only",
                concat="shared_grid", bn="kept", scale_format="power_of_two", calibration_size=32)
    b = r.quantization
    _check_block(b)
    assert b["weights"]["bits"] == 4 and b["weights"]["granularity"] == "per_tensor"
    assert b["weights"]["symmetric"] is False and b["weights"]["scale_format"] == "power_of_two"
    assert b["activations"]["bits"] == 6 and b["activations"]["symmetric"] is True
    assert b["first_layer"]["weight_bits"] == 8 and b["last_layer"]["weight_bits"] is None
    assert b["batch_norm"] == "kept" and b["residual_add"] == "gemm_inputs_only"
    flags = " | ".join(b["hardware_unfriendly"])
    assert "FP32 last layer" in flags and "unquantized residual adds" in flags and "batch norm kept" in flags
    assert "bit widths outside {2, 4, 8, 16}: [6]" in flags
    assert {"name": "fc", "op": "linear", "reason": "last_layer: fp32"} in b["unquantized_layers"]
    sim = r.model
    for q in sim_info(sim).act_quantizers.values():     # power-of-two scales really are
        s = float(q.scale)
        assert s == 2.0 ** round(torch.log2(torch.tensor(s)).item())


def test_eager_fallback_card():
    from test_quant_support import Untraceable
    r = run_ptq(randomize_bn(Untraceable()).eval(), pipeline="minmax", calibration_size=32)
    b = r.quantization
    _check_block(b)
    assert b["graph_mode"] == "eager" and "torch.fx could not trace" in b["graph_mode_reason"]
    assert b["residual_add"] == "gemm_inputs_only"
    assert any(u["op"] == "add" for u in b["unquantized_layers"])
    assert any(x.name == "add" and not x.quantized for x in r.layers)


def test_overrides_are_reported_with_matches():
    model = bundled("resnet8")
    r = run_ptq(model, pipeline="minmax", calibration_size=32,
                overrides=[{"pattern": "layer1.*", "w_bits": 4}, {"pattern": "nothing*", "a_bits": 4}])
    ov = r.quantization["overrides"]
    assert ov[0]["pattern"] == "layer1.*" and "layer1.conv1" in ov[0]["matched"]
    assert ov[1]["matched"] == [] and any("matched no layer" in w for w in r.warnings)
    recs = {x.name: x for x in r.layers}
    assert recs["layer1.conv1"].weight_bits == 4 and recs["layer2.conv1"].weight_bits == 8
    assert r.quantization["weights"]["bits"] == 8 and r.quantization["weights"]["bits_detail"] == "mixed: [4, 8]"


def test_sensitivity_table():
    model = bundled("lenet5")
    r = run_ptq(model, pipeline="minmax", w_bits=3, sensitivity="sqnr", calibration_size=64)
    sens = r.stats["sensitivity"]
    assert sens["metric"] == "output_sqnr_db"
    names = [row["name"] for row in sens["layers"]]
    assert names == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(row["value"] > 0 for row in sens["layers"]) and len(sens["most_sensitive"]) == 3
    r2 = run_ptq(model, pipeline="minmax", w_bits=3, sensitivity="accuracy", labels="fp32_model",
                 calibration_size=64)
    s2 = r2.stats["sensitivity"]
    assert s2["metric"] == "top1" and s2["fp32_reference"] == 100.0     # FP32 model labels: 100% by definition
    assert r2.calibration["labels_used"] == "fp32_model"
    assert r2.pipeline[-1] == "sensitivity"


def test_mixed_precision_meets_both_budgets():
    model = bundled("lenet5")
    budget_w, peak = 5.0, 6 * 28 * 28 * 6           # conv1's output map at 6 bits on average is too big
    r = run_ptq(model, pipeline="minmax", mixed_precision=True, mp_allowed_bits=[4, 8], mp_weight_bits=budget_w,
                mp_max_activation_map_bits=peak, calibration_size=64)
    mp = r.quantization["mixed_precision"]
    assert mp["enabled"] is True and mp["allowed_bits"] == [4, 8] and mp["granularity"] == "layer"
    assert mp["mean_weight_bits"] <= budget_w + 1e-6
    assert mp["max_activation_map_bits"] <= peak
    bits = {x.weight_bits for x in r.layers if x.op in ("conv2d", "linear")}
    assert bits == {4, 8}                             # really mixed, read from the model
    with pytest.raises(ValueError, match="cannot be met"):
        run_ptq(model, pipeline="minmax", mixed_precision=True, mp_allowed_bits=[4, 8], mp_weight_bits=3.0,
                calibration_size=32)
