"""The sparq method: the simulated layers against a direct integer computation, the card blocks,
the negative-activation rule, statistics, and a run end to end through qcard.run."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcard
from qcard.cards.schema import load_card
from qcard.data import load_dataset
from qcard.methods.base import PointData, RunContext
from qcard.methods.sparq import (SPARQ, SparqConv2d, SparqError, SparqKernel, SparqLinear, WINDOW_SETS)

torch.set_num_threads(1)


class Tiny(nn.Module):
    """stem conv (FP32 first layer) -> BN -> ReLU -> mid conv -> ReLU -> pool -> hidden fc -> ReLU -> head."""

    def __init__(self, relu_after_stem: bool = True, bn: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.act = nn.ReLU() if relu_after_stem else nn.Identity()
        self.mid = nn.Conv2d(6, 5, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(20, 8)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.pool(self.act2(self.mid(x)))
        return self.head(self.act3(self.hidden(self.flat(x))))


def tiny_data(size=64, cal=48):
    train = load_dataset("synthetic", "train", input_shape=(1, 8, 8), num_classes=3, size=size, seed=0)
    return PointData(train, train, 3, (1, 8, 8), batch_size=16, calibration_size=cal)


def apply(model, data=None, **params):
    torch.manual_seed(0)
    msgs = []
    res = SPARQ().apply(model, data or tiny_data(), SPARQ.Params(calibration_batch_size=16, **params),
                        RunContext(seed=0, progress=False, log=msgs.append))
    res.messages = msgs
    return res


def tiny(**kw):
    torch.manual_seed(1)
    return Tiny(**kw).eval()


# ---------------------------------------------------------------- the integer computation

def integer_reference(layer, x, variant, bits, options, rounding, divisor):
    """codes_x (*) codes_w accumulated in int64, rescaled by dx * dw[c], plus the bias (float64)."""
    dx = layer.dx
    q = torch.clamp(torch.round(x / dx), 0, 255).long()              # the spec: round half to even
    if variant in ("sparq", "bsparq", "vsparq"):
        s = SparqKernel(variant, bits, options if variant != "vsparq" else None, rounding,
                        dim=1 if x.dim() == 4 else -1)(q)
    elif variant == "a4":
        s = torch.clamp(torch.round(x / (16 * dx)), 0, 15).long() * 16
    else:
        s = q
    w = layer.weight.detach().double()
    dw = w.reshape(w.shape[0], -1).abs().amax(1) / divisor
    wq = torch.clamp(torch.round(w / dw.view((-1,) + (1,) * (w.dim() - 1))), -128, 127).long()
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(s.double(), layer.kernel_size, padding=layer.padding, stride=layer.stride).long()
        acc = wq.reshape(wq.shape[0], -1) @ cols                       # int64: (C_out, L) per sample
        out = acc.double() * (dx * dw).view(1, -1, 1)
        out = out + layer.bias.detach().double().view(1, -1, 1)
        h = (x.shape[2] + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
        return out.view(x.shape[0], -1, h, out.shape[-1] // h)
    acc = s @ wq.t()
    return acc.double() * (dx * dw) + layer.bias.detach().double()


@pytest.mark.parametrize("variant,bits,options,rounding", [
    ("sparq", 4, 5, "round"), ("sparq", 3, None, "raw"), ("sparq", 2, None, "round"),
    ("bsparq", 4, 2, "raw"), ("vsparq", 4, None, "round"), ("a4", 4, None, "round"), ("a8", 4, None, "round")])
@pytest.mark.parametrize("base", ["paper", "qcard"])
def test_simulated_layers_equal_integer_computation(variant, bits, options, rounding, base):
    res = apply(tiny(), variant=variant, bits=bits, options=options, rounding=rounding, base=base,
                first_last="fp32")
    m = res.model
    assert isinstance(m.mid, SparqConv2d) and isinstance(m.hidden, SparqLinear)
    assert type(m.stem) is nn.Conv2d and type(m.head) is nn.Linear        # first/last stay FP32
    divisor = 127.5 if base == "paper" else 127.0
    opts = options if options is not None or variant not in ("sparq", "bsparq") else {4: 5, 3: 6, 2: 7}[bits]
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(2, 6, 8, 8, generator=g)) * 1.5
    x[0, 2] = 0                                                        # whole zero channels: partners
    with torch.no_grad():
        got = m.mid(x)
    want = integer_reference(m.mid, x, variant, bits, opts, rounding, divisor)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    xl = torch.relu(torch.randn(4, 20, generator=g))
    with torch.no_grad():
        got = m.hidden(xl)
    torch.testing.assert_close(got.double(), integer_reference(m.hidden, xl, variant, bits, opts, rounding, divisor),
                               rtol=1e-6, atol=1e-6)


def test_weight_codes_follow_the_paper_formula_at_the_extremes():
    model = tiny()
    with torch.no_grad():
        model.mid.weight[0].fill_(0.01)
        model.mid.weight[0, 0, 0, 0] = -0.5        # -max|w| -> -127.5 -> -128 (half to even)
        model.mid.weight[1].zero_()                # an all-zero channel must not divide by zero
    m = apply(model, variant="a8").model
    assert m.mid.w_codes[0].min().item() == -128
    assert m.mid.w_codes[0, 0, 0, 1].item() == round(0.01 / (2 * 0.5 / 255))
    assert torch.count_nonzero(m.mid.w_codes[1]) == 0
    assert torch.isfinite(m.mid.out_scale).all()


def test_a4_equals_plain_4bit_per_tensor_fake_quant_on_the_16dx_grid():
    m = apply(tiny(), variant="a4").model
    dx = m.mid.dx
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(4, 6, 8, 8, generator=g)) * 3 + 0.001
    got = m.mid.fake_quant_input(x)
    want = torch.fake_quantize_per_tensor_affine(x, 16 * dx, 0, 0, 15)
    assert torch.equal(got, want)
    assert got.max().item() == pytest.approx(240 * dx)                # saturates at 15 * 16 * dx
    # and the layer computes with exactly that input
    ref = F.conv2d(want.double(), (m.mid.w_codes * m.mid.dw.view(-1, 1, 1, 1)).double(), m.mid.bias.double(), padding=1)
    torch.testing.assert_close(m.mid(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_plain_a3_a2_grids_and_params_resolution():
    p = SPARQ.Params(variant="a3")
    assert p.bits == 3 and p.options is None
    assert SPARQ.Params().options == 5 and SPARQ.Params(bits=3).options == 6 and SPARQ.Params(bits=2).options == 7
    m = apply(tiny(), variant="a2").model
    x = torch.rand(2, 6, 4, 4) * 300 * m.mid.dx
    codes = m.mid.input_codes(x)
    assert set(codes.unique().tolist()) <= {0.0, 64.0, 128.0, 192.0}


@pytest.mark.parametrize("params,match", [
    (dict(bits=4, options=6), "options"),
    (dict(variant="vsparq", bits=3), "bits must be 4"),
    (dict(variant="a4", rounding="raw"), "rounding"),
    (dict(variant="a4", options=5), "options"),
    (dict(variant="a3", bits=2), "3-bit"),
    (dict(variant="sparq3"), "variant"),
    (dict(negatives="ignore"), "negatives"),
    (dict(unknown=1), "unknown|extra"),
])
def test_params_are_validated(params, match):
    with pytest.raises(ValueError, match=match):
        SPARQ.Params(**params)


# ---------------------------------------------------------------- negatives

def test_negative_inputs_raise_naming_the_layer():
    with pytest.raises(SparqError, match=r"'mid'.*negatives: exclude"):
        apply(tiny(relu_after_stem=False))


def test_negative_inputs_excluded_run_signed_8bit_and_are_recorded():
    res = apply(tiny(relu_after_stem=False), negatives="exclude")
    m = res.model
    assert m.mid.sparq_role == "s8" and m.hidden.sparq_role == "sparq"
    st = res.stats["sparq"]
    assert [e["name"] for e in st["excluded_layers"]] == ["mid"] and st["excluded_layers"][0]["min_input"] < 0
    assert [o["name"] for o in res.quantization["overrides"]] == ["mid"]
    assert any("mid" in w for w in res.warnings) and any("mid" in msg for msg in res.messages)
    rec = {r.name: r for r in res.layers}["mid"]
    assert rec.activation_symmetric is True and rec.activation_bits == 8 and rec.activation_bits_distribution is None
    assert rec.extra["sparq"] is False
    # signed 8-bit grid: negative inputs survive (not clamped to zero)
    x = torch.randn(2, 6, 8, 8)
    xq = m.mid.fake_quant_input(x)
    assert (xq < 0).any()
    assert (xq - x).abs().max().item() <= m.mid.dx * 0.5 + 1e-6 or (x.abs().max() > 127 * m.mid.dx)


def test_mobilenet_tiny_signed_input_is_named():
    model = qcard.zoo.load_model("qcard:mobilenet_tiny").eval()
    train = load_dataset("qcard:mnist5k", "train")
    data = PointData(train, train, 10, (1, 28, 28), batch_size=32, calibration_size=32)
    with pytest.raises(SparqError, match="block3.dw.0"):
        SPARQ().apply(model, data, SPARQ.Params(calibration_batch_size=32), RunContext(seed=0, progress=False))


# ---------------------------------------------------------------- statistics and records

def test_stats_keys_present_and_sane():
    res = apply(tiny(), stats_size=32)
    st = res.stats["sparq"]
    assert st["variant"] == "sparq" and st["window_tops"] == list(WINDOW_SETS[(4, 5)])
    assert set(st["layers"]) == {"mid", "hidden"} and st["stats_images"] == 32
    assert "calibration set" in st["stats_source"]
    for name, ls in st["layers"].items():
        assert 0 <= ls["zero_fraction"] <= 1 and 0 <= ls["zero_partner_fraction"] <= 1
        assert ls["zero_partner_fraction"] >= ls["zero_fraction"] / 2 - 1e-12
        assert sum(ls["window_hist"].values()) == ls["values"] > 0
        assert ls["window_hist"]["zero"] == ls["values"] - ls["nonzero"]
        assert sum(ls["bits_distribution"].values()) == pytest.approx(1.0)
        assert set(ls["bits_distribution"]) <= {"0", "4", "8"}
        assert 0 < ls["mean_bits"] <= 8 and ls["mse"] >= 0
        assert ls["mse_real"] == pytest.approx(ls["mse"] * ls["dx"] ** 2)
    assert 0 < st["mean_effective_bits"] <= 4 + 1e-9          # pairs share 8 bits
    json.dumps(res.stats, allow_nan=False)                     # card-safe: no NaN, plain keys
    # records carry the measured distribution; first/last are FP32 with a reason
    recs = {r.name: r for r in res.layers}
    assert recs["mid"].weight_bits == 8 and recs["mid"].activation_bits == 8
    assert recs["mid"].effective_activation_bits == pytest.approx(st["layers"]["mid"]["mean_bits"])
    assert recs["stem"].weight_bits is None and recs["stem"].quantized is False and "first" in recs["stem"].reason
    assert recs["head"].activation_bits is None and "last" in recs["head"].reason
    # stats collection is off for the runner's evaluation
    assert not res.model.mid.collect_stats and not res.model.mid.kernel.track_stats


def test_cost_comparison_orders_the_pe_modes():
    res = apply(tiny(), first_last="int8")
    cc = res.stats["sparq"]["cost_comparison"]
    a8, a4, sp = cc["a8w8"], cc["a4w8"], cc["sparq"]
    assert a8["speedup_vs_a8w8"] == pytest.approx(1.0)
    assert sp["speedup_vs_a8w8"] > 1.0 and a4["speedup_vs_a8w8"] > 1.0
    assert sp["quantized_layers_cycles"] < a8["quantized_layers_cycles"]
    assert sp["activation_traffic_bits"] == a8["activation_traffic_bits"]     # SPARQ keeps 8-bit activations
    assert a4["activation_traffic_bits"] < a8["activation_traffic_bits"]
    assert sp["bops"] < a8["bops"]                                             # expected bits < 8
    assert cc["this_run"]["pe_mode"] == "sparq" and res.stats["sparq"]["speedup_vs_a8w8"] == sp["speedup_vs_a8w8"]
    own = apply(tiny(), variant="a2", first_last="int8").stats["sparq"]["cost_comparison"]["this_run"]
    assert own["pe_mode"] == "bit_scalable" and own["bops"] < cc["a4w8"]["bops"]


def test_quantization_block_paper_base():
    res = apply(tiny())
    q = res.quantization
    assert q["weights"] == {"bits": 8, "granularity": "per_channel", "group_size": None, "symmetric": True,
                            "signed": True, "scale_format": "float", "range_setting": "max_abs_255",
                            "rounding": "nearest"}
    a = q["activations"]
    assert (a["bits"], a["granularity"], a["symmetric"], a["signed"], a["range_setting"], a["dynamic"],
            a["storage_bits"]) == (4, "per_tensor", False, False, "max_mean", False, 8)
    assert q["first_layer"]["weight_bits"] is None and q["last_layer"]["activation_bits"] is None
    assert q["batch_norm"] == "kept" and q["residual_add"] == "not_present"
    assert "first/last layers FP32" in q["hardware_unfriendly"]
    assert {u["name"] for u in q["unquantized_layers"]} == {"stem", "head"}
    assert any("BN recalibration" in s for s in res.pipeline)


def test_qcard_base_folds_bn_and_quantizes_first_last_at_8bit():
    model = tiny()
    res = apply(model, base="qcard")
    m, q = res.model, res.quantization
    assert isinstance(m.bn, nn.Identity) and q["batch_norm"] == "folded"
    assert q["weights"]["range_setting"] == "max_abs_127" and q["activations"]["range_setting"] == "minmax"
    assert q["first_layer"]["weight_bits"] == 8 and isinstance(m.stem, SparqConv2d) and m.stem.sparq_role == "s8"
    assert m.head.sparq_role == "u8" and m.mid.sparq_role == "sparq"
    assert res.stats["sparq"]["folded_batch_norms"] == [{"layer": "stem", "batch_norm": "bn"}]
    assert not any("BN recalibration" in s for s in res.pipeline)


def test_hidden_linear_fp32_and_layers_not_conv_linear():
    res = apply(tiny(), hidden_linear="fp32")
    assert type(res.model.hidden) is nn.Linear
    u = {x["name"]: x["reason"] for x in res.quantization["unquantized_layers"]}
    assert "hidden_linear" in u["hidden"]


def test_bn_statistics_are_the_cumulative_average_of_the_calibration_batches():
    model = tiny()
    data = tiny_data(size=64, cal=48)
    ref = copy.deepcopy(model)
    res = apply(model, data, variant="a8")
    loader = data.loader(data.calibration_set(), batch_size=16)
    means = []
    with torch.no_grad():
        for x, _ in loader:
            means.append(ref.stem(x).mean(dim=(0, 2, 3)))           # BN follows the FP32 first conv
    torch.testing.assert_close(res.model.bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert res.model.bn.momentum == 0.1                             # restored after the passes
    assert not res.model.training


def test_no_conv_or_linear_is_an_error():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(SparqError, match="no Conv2d or Linear"):
        apply(model)


# ---------------------------------------------------------------- end to end

CONFIG = """\
experiment: sparq_e2e
out: {out}
models: [{model}]
dataset: {{ref: qcard:mnist5k, eval_size: {eval_size}, batch_size: 200, calibration: {{size: {cal}}}}}
methods:
  - {{name: "qcard.methods.sparq:SPARQ", label: SPARQ, params: {{variant: [sparq, a8], stats_size: 64}}}}
cost: {{profiles: [bitops]}}
"""


def run_cards(write_config, tmp_path, model, eval_size, cal):
    cfg = write_config(CONFIG.format(out=tmp_path / "runs", model=model, eval_size=eval_size, cal=cal))
    summary = qcard.run(cfg, progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    cards = [load_card(p).model_dump(mode="json") for p in sorted((tmp_path / "runs" / "sparq_e2e").glob("*/card.json"))]
    return {c["method"]["params"]["variant"]: c for c in cards}


def test_end_to_end_lenet5_through_qcard_run(write_config, tmp_path):
    cards = run_cards(write_config, tmp_path, "qcard:lenet5", 200, 64)
    sp, a8 = cards["sparq"], cards["a8"]
    assert sp["method"]["name"] == "sparq" and sp["method"]["family"] == "sparsity_aware_ptq"
    assert sp["method"]["params"]["options"] == 5                        # defaults expanded
    assert sp["dataset"]["calibration"] == {"split": "train", "size": 64, "seed": 0, "labels_used": False,
                                            "used_for": None, "range_init": None}
    assert abs(sp["results"]["quantized"] - sp["results"]["fp32"]) < 3
    assert set(sp["method_stats"]["sparq"]["layers"]) == {"conv2", "fc1", "fc2"}
    layers = {l["name"]: l for l in sp["cost"]["layers"]}
    assert layers["conv2"]["weight_bits"] == 8 and layers["conv2"]["activation_bits"] == 8
    assert layers["conv2"]["effective_activation_bits"] < 8                # expected cost from the distribution
    assert layers["conv1"]["weight_bits"] == 32                            # FP32 first layer
    assert sp["cost"]["expected_cost"] is True and a8["cost"]["expected_cost"] is False
    assert sp["cost"]["bops"] < a8["cost"]["bops"]
    assert sp["quantization"]["activations"]["bits"] == 4 and a8["quantization"]["activations"]["bits"] == 8


@pytest.mark.slow
def test_end_to_end_resnet8_sparq_within_one_point_of_a8(write_config, tmp_path):
    cards = run_cards(write_config, tmp_path, "qcard:resnet8", 1000, 512)
    sp, a8 = cards["sparq"], cards["a8"]
    assert abs(sp["results"]["quantized"] - a8["results"]["quantized"]) <= 1.0
    assert sp["quantization"]["residual_add"] == "gemm_inputs_only"
    assert sp["quantization"]["batch_norm"] == "kept"
