"""Cost fidelity on architectures nobody tuned for (random weights, small inputs): parameters that
never run in eval are counted apart (googlenet's auxiliary heads), and the cost is traced at the
shape that was evaluated, not at the model's default size."""
import json

import pytest
import torch
from click.testing import CliRunner

import qcard
from qcard.cards.schema import load_card
from qcard.commands.cost import cost
from qcard.cost import estimate, trace_layers
from qcard.cost.trace import trace_model

torchvision = pytest.importorskip("torchvision")


def _meta(ctor, **kw):
    with torch.device("meta"):
        m = ctor(weights=None, **kw)
    return m.eval()


def test_googlenet_params_are_those_of_its_inference_graph():
    traced = trace_model(_meta(torchvision.models.googlenet, aux_logits=True, init_weights=False), (3, 224, 224), device="meta")
    inference = _meta(torchvision.models.googlenet, aux_logits=False, init_weights=False)     # the same network without aux heads
    assert traced.params == sum(p.numel() for p in inference.parameters()) == 6_624_904
    assert traced.not_run == {"aux1": 3_188_968, "aux2": 3_191_016}
    out = estimate(traced.records, "bitops", total_params=traced.params, not_run=traced.not_run)
    assert out["params"] == 6_624_904 and out["params_not_run"] == 6_379_984
    assert any("aux1" in n and "never ran" in n for n in out["notes"])


def test_inception_v3_aux_logits_counted_apart():
    traced = trace_model(_meta(torchvision.models.inception_v3, aux_logits=True, init_weights=False), (3, 299, 299), device="meta")
    inference = _meta(torchvision.models.inception_v3, aux_logits=False, init_weights=False)
    assert traced.params == sum(p.numel() for p in inference.parameters())
    assert list(traced.not_run) == ["AuxLogits"]


def test_every_parameter_runs_in_resnet18_so_nothing_is_reported_apart():
    traced = trace_model(_meta(torchvision.models.resnet18), (3, 64, 64), device="meta")
    assert traced.not_run == {} and traced.params == 11_689_512
    assert "params_not_run" not in estimate(traced.records, "bitops", total_params=traced.params, not_run={})


def test_qcard_cost_counts_what_runs_and_says_where_the_shape_came_from():
    res = CliRunner().invoke(cost, ["torchvision:googlenet", "--json"], catch_exceptions=False)
    out = json.loads(res.output[res.output.index("{"):])
    assert out["total"]["params"] == 6_624_904 and out["total"]["params_not_run"] == 6_379_984
    assert "torchvision" in out["input_shape_source"]
    res = CliRunner().invoke(cost, ["torchvision:googlenet", "--input-shape", "3,64,64"], catch_exceptions=False)
    assert "input 3,64,64 (from --input-shape)" in res.output and "params_not_run" in res.output


def test_qcard_cost_of_a_timm_model_names_timms_pretrained_cfg():
    pytest.importorskip("timm")
    res = CliRunner().invoke(cost, ["timm:resnet10t", "--json"], catch_exceptions=False)
    out = json.loads(res.output)
    assert out["input_shape"] == [3, 176, 176] and "pretrained_cfg" in out["input_shape_source"]


CONFIG = """\
experiment: shape
out: {out}
models:
  - {{ref: {ref}, num_classes: 10}}
dataset: {{ref: synthetic, input_shape: [3, 64, 64], num_classes: 10, size: 4, batch_size: 4}}
methods: [fp32]
cost: {{profiles: [bitops]{extra}}}
"""


def _card(write_config, tmp_path, ref, extra=""):
    cfg = write_config(CONFIG.format(out=tmp_path / "runs", ref=ref, extra=extra), "shape.yaml")
    summary = qcard.run(cfg, progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    return load_card(next((tmp_path / "runs" / "shape").glob("*/card.json")))


def test_timm_model_is_costed_at_the_evaluated_shape_not_its_default(write_config, tmp_path):
    pytest.importorskip("timm")
    from qcard.zoo import load_model_with_info
    card = _card(write_config, tmp_path, "timm:resnet10t")
    model, info = load_model_with_info("timm:resnet10t", weights="random", num_classes=10)
    assert info.input_shape == (3, 176, 176)            # timm's default differs from the data
    assert card.model.input_shape == [3, 64, 64]
    assert card.cost.macs == sum(r.macs for r in trace_layers(model, (3, 64, 64)))
    assert card.cost.macs != sum(r.macs for r in trace_layers(model, (3, 176, 176)))


def test_explicit_cost_input_shape_still_wins(write_config, tmp_path):
    pytest.importorskip("timm")
    card = _card(write_config, tmp_path, "timm:resnet10t", extra=", input_shape: [3, 96, 96]")
    assert card.model.input_shape == [3, 96, 96]


def test_googlenet_card_counts_the_params_that_ran(write_config, tmp_path):
    card = _card(write_config, tmp_path, "torchvision:googlenet")
    assert card.model.params == card.cost.params
    assert card.cost.model_dump()["params_not_run"] > 0
    assert card.cost.params == sum(p.numel() for p in _meta(torchvision.models.googlenet, aux_logits=False,
                                                             init_weights=False, num_classes=10).parameters())
