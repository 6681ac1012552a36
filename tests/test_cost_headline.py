"""The card's headline (mean bits, first/last layer, FP32 flags and warnings) comes from the same
per-layer records as its per-layer table: layers the simulation left alone count as FP32."""
import math

import pytest

import qcard
from qcard.cards.schema import load_card
from qcard.cost import trace_layers
from qcard.quant.report import layer_accounting, reconcile_with_layers
from qcard.records import LayerRecord


def _rec(name, w=None, a=None, wshape=(), macs=0, ishape=(1, 4), reason=None):
    return LayerRecord(name=name, op="linear" if wshape else "matmul", weight_shape=wshape,
                       params=math.prod(wshape) if wshape else 0, macs=macs, input_shape=ishape,
                       weight_bits=w, activation_bits=a, reason=reason)


def test_fp32_layers_count_as_32_and_the_last_layer_is_the_real_one():
    recs = [_rec("stem", 8, 8, (10, 10), 100), _rec("attn.in_proj", None, None, (30, 10), 300),
            _rec("attn.scores", None, None, (), 50, ishape=(1, 2, 4)), _rec("head", 8, 8, (5, 10), 50)]
    acc = layer_accounting(recs)
    assert acc["mean_weight_bits"] == round((100 * 8 + 300 * 32 + 50 * 8) / 450, 4)
    assert acc["mean_activation_bits"] == round((4 * 8 + 4 * 32 + 8 * 32 + 4 * 8) / 20, 4)
    assert acc["last_layer"]["name"] == "head" and acc["first_layer"]["name"] == "stem"
    block = {"mixed_precision": {"enabled": False, "mean_weight_bits": 8.0}, "hardware_unfriendly": [],
             "first_layer": {}, "last_layer": {"name": "stem", "weight_bits": 8}}
    out, warnings = reconcile_with_layers(block, recs)
    assert out["mixed_precision"]["mean_weight_bits"] == acc["mean_weight_bits"]
    assert out["last_layer"] == {"name": "head", "weight_bits": 8, "activation_bits": 8}
    assert out["hardware_unfriendly"] == ["1 conv/linear layer(s) left in FP32"]
    assert any("attn" in w and "FP32" in w for w in warnings) and len(warnings) == 2


def test_first_last_fp32_by_configuration_is_flagged_but_not_a_surprise():
    recs = [_rec("stem", None, None, (10, 10), 100, reason="first_layer: fp32"), _rec("mid", 4, 8, (10, 10), 100),
            _rec("head", None, None, (5, 10), 50, reason="last_layer: fp32")]
    out, warnings = reconcile_with_layers({"hardware_unfriendly": ["FP32 first layer"]}, recs)
    assert out["hardware_unfriendly"] == ["FP32 first layer", "FP32 last layer"] and warnings == []


CONFIG = """\
experiment: headline
out: {out}
models:
  - {model}
dataset: {{ref: synthetic, input_shape: [3, 32, 32], num_classes: 10, size: 8, batch_size: 8, calibration: {{size: 8}}}}
methods:
  - {{name: ptq, label: W4A8, params: {{w_bits: 4, a_bits: 8, pipeline: minmax{extra}}}}}
cost: {{profiles: [bitops]}}
"""


def _card(write_config, tmp_path, model, extra=""):
    text = CONFIG.format(out=tmp_path / "runs", model=model, extra=extra)
    summary = qcard.run(write_config(text, "h.yaml"), progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    return load_card(next((tmp_path / "runs" / "headline").glob("*/card.json")))


def _weighted_mean(card, model, shape=(3, 32, 32)):
    """The weight-count-weighted mean W bits over every traced layer with weights (FP32 = 32)."""
    bits = {l.name: l.weight_bits for l in card.cost.layers}
    recs = [r for r in trace_layers(model, shape) if r.weight_shape and r.params]
    n = [min(math.prod(r.weight_shape), r.params) for r in recs]
    return sum(k * (bits[r.name] if bits[r.name] is not None and bits[r.name] < 32 else 32)
               for k, r in zip(n, recs)) / sum(n), recs


VIT = "python:torchvision.models.vision_transformer:VisionTransformer"
VIT_KW = dict(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


@pytest.mark.parametrize("attention_fp32", [False, True])
def test_torchvision_vit_headline_counts_every_layer(write_config, tmp_path, attention_fp32):
    """torchvision's attention is quantized now (its projections split out); left in FP32 by an override,
    its weights count as 32 bits in the headline, as every layer of the per-layer table does."""
    pytest.importorskip("torchvision")
    from qcard.zoo import load_model_with_info
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in VIT_KW.items()) + "}"
    extra = ", overrides: [{pattern: '*self_attention*', fp32: true}]" if attention_fp32 else ""
    card = _card(write_config, tmp_path, f"{{ref: '{VIT}', num_classes: 10, kwargs: {kw}}}", extra)
    model, _ = load_model_with_info(VIT, weights="random", num_classes=10, **VIT_KW)
    mean, recs = _weighted_mean(card, model)
    q = card.quantization
    assert q.mixed_precision["mean_weight_bits"] == pytest.approx(mean, abs=1e-4)
    assert q.last_layer.name == recs[-1].name
    if attention_fp32:
        assert mean > 4.5
    else:
        assert mean == pytest.approx(4.0) and not any("self_attention" in w for w in card.warnings)


def test_timm_mobilenetv3_last_layer_is_the_classifier(write_config, tmp_path):
    pytest.importorskip("timm")
    from qcard.zoo import load_model_with_info
    card = _card(write_config, tmp_path, "{ref: timm:mobilenetv3_small_100, num_classes: 10}")
    model, _ = load_model_with_info("timm:mobilenetv3_small_100", weights="random", num_classes=10)
    mean, recs = _weighted_mean(card, model)
    q = card.quantization
    assert recs[-1].name == "classifier" and q.last_layer.name == "classifier"
    assert q.mixed_precision["mean_weight_bits"] == pytest.approx(mean, abs=1e-4)
    names = [l.name for l in card.cost.layers]
    assert len(names) == len(set(names)) and "classifier.linear" not in names    # no duplicate rows
