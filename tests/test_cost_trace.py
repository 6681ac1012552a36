"""Layer tracing (torch side) against known answers: torchvision, timm, bundled and user models."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qcard.cost import apply_bits, count_params, estimate, trace_layers
from qcard.errors import QcardError

torch.set_num_threads(2)

# specs/cost.md: torchvision architectures, 224×224, batch 1; MACs of conv and linear layers,
# params of the whole model (BN included)
KNOWN = {
    "resnet18": (1_814_073_344, 11_689_512),
    "resnet50": (4_089_184_256, 25_557_032),
    "mobilenet_v2": (300_774_272, 3_504_872),
}


def meta_model(ctor):
    """Built on the meta device: shapes only, no weight initialisation (fast)."""
    with torch.device("meta"):
        return ctor().eval()


@pytest.fixture(scope="module")
def resnet18_records():
    return trace_layers(meta_model(torchvision.models.resnet18), (3, 224, 224), device="meta")


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_torchvision_macs_and_params(name):
    model = meta_model(getattr(torchvision.models, name))
    recs = trace_layers(model, (3, 224, 224), device="meta")
    macs, params = KNOWN[name]
    assert sum(r.macs for r in recs if r.op in ("conv2d", "linear")) == macs
    assert count_params(model) == params
    out = estimate(recs, "bitops", total_params=count_params(model))
    assert out["macs"] == macs and out["params"] == params


def test_cpu_trace_equals_meta_trace(resnet18_records):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    cpu = trace_layers(model, (3, 224, 224))
    assert [r.to_dict() for r in cpu] == [r.to_dict() for r in resnet18_records]


def test_resnet18_3x3_layer(resnet18_records):
    by_name = {r.name: r for r in resnet18_records}
    layer = by_name["layer1.0.conv1"]
    assert layer.macs == 115_605_504
    assert (layer.input_shape, layer.output_shape) == ((1, 64, 56, 56), (1, 64, 56, 56))
    assert layer.weight_shape == (64, 64, 3, 3) and layer.kernel_size == (3, 3)
    assert layer.stride == (1, 1) and layer.padding == (1, 1) and layer.groups == 1
    assert layer.params == 36_864
    assert layer.weight_bits is None and layer.activation_bits is None      # tracer leaves FP32


def test_resnet18_names_and_functional_ops(resnet18_records):
    names = [r.name for r in resnet18_records]
    assert len(names) == len(set(names))
    assert names[:5] == ["conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.add"]
    assert names[-2:] == ["avgpool", "fc"]
    ops = {r.name: r.op for r in resnet18_records}
    assert ops["layer1.0.add"] == "add" and ops["maxpool"] == "maxpool" and ops["fc"] == "linear"
    adds = [r for r in resnet18_records if r.op == "add"]
    assert len(adds) == 8 and adds[0].extra["input_shapes"] == [(1, 64, 56, 56)] * 2


def test_resnet18_bops(resnet18_records):
    w8 = estimate(apply_bits(resnet18_records, 8, 8), "bitops")
    assert w8["bops"] == 64 * 1_814_073_344 == 116_100_694_016          # "about 116.1 G"
    assert estimate(apply_bits(resnet18_records, 4, 4), "bitops")["bops"] == 16 * 1_814_073_344
    assert estimate(apply_bits(resnet18_records, 16, 16), "bitops")["speedup_vs_fp32"] == 2.0


def test_mobilenet_v2_depthwise_groups():
    recs = trace_layers(meta_model(torchvision.models.mobilenet_v2), (3, 224, 224), device="meta")
    dw = next(r for r in recs if r.groups > 1)
    assert dw.name == "features.1.conv.0.0" and dw.groups == 32 and dw.weight_shape == (32, 1, 3, 3)
    assert dw.macs == 112 * 112 * 32 * 9
    assert sum(r.op == "add" for r in recs) == 10


def test_flop_counter_counts_two_flops_per_mac():
    """torch.utils.flop_counter counts a multiply-add as 2 FLOPs (fvcore counts 1): pinned here
    so that nobody compares qcard's MACs with FlopCounterMode's numbers without halving them."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        conv(torch.zeros(1, 64, 56, 56))
    assert counter.get_total_flops() == 2 * 115_605_504


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit_b_16"])
def test_macs_of_all_ops_equal_half_the_flop_counter(name):
    model = meta_model(getattr(torchvision.models, name))
    recs = trace_layers(model, (3, 224, 224), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert 2 * sum(r.macs for r in recs) == counter.get_total_flops()


def test_torchvision_vit_attention_is_expanded():
    recs = trace_layers(meta_model(torchvision.models.vit_b_16), (3, 224, 224), device="meta")
    by_name = {r.name: r for r in recs}
    att = "encoder.layers.encoder_layer_0.self_attention"
    assert by_name[f"{att}.in_proj"].op == "linear" and by_name[f"{att}.in_proj"].params == 3 * 768 * 768 + 3 * 768
    assert by_name[f"{att}.out_proj"].params == 768 * 768 + 768
    assert by_name[f"{att}.matmul"].macs == 12 * 197 * 197 * 64
    assert by_name[f"{att}.matmul_1"].output_shape == (1, 12, 197, 64)
    assert by_name["encoder.layers.encoder_layer_0.add"].op == "add"
    assert sum(r.params for r in recs) + 768 + 197 * 768 + 2 * 768 * 25 == count_params(
        meta_model(torchvision.models.vit_b_16))                     # cls token, pos embedding, layernorms


def test_timm_models_flow_through():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        res = timm.create_model("resnet18").eval()
        vit = timm.create_model("vit_tiny_patch16_224").eval()
    recs = trace_layers(res, (3, 224, 224), device="meta")
    assert sum(r.macs for r in recs) == KNOWN["resnet18"][0]
    recs = trace_layers(vit, (3, 224, 224), device="meta")
    by_name = {r.name: r for r in recs}
    # timm's fused F.scaled_dot_product_attention: recorded as the ops an integer runtime runs
    assert not [r for r in recs if r.op == "attention"]
    scores, softmax, context = (by_name[f"blocks.0.attn.{p}"] for p in ("matmul", "softmax", "matmul_1"))
    assert scores.op == context.op == "matmul" and softmax.op == "softmax"
    assert scores.macs == context.macs == 3 * 197 * 197 * 64
    assert scores.extra["input_shapes"] == [(1, 3, 197, 64), (1, 3, 197, 64)] and scores.output_shape == (1, 3, 197, 197)
    assert context.extra["input_shapes"] == [(1, 3, 197, 197), (1, 3, 197, 64)]
    assert softmax.input_shape == (1, 3, 197, 197)
    assert sum(r.op == "matmul" for r in recs) == 24 and sum(r.op == "softmax" for r in recs) == 12
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit(torch.zeros(1, 3, 224, 224, device="meta"))
    assert 2 * sum(r.macs for r in recs) == counter.get_total_flops()
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "head"} <= {r.name for r in recs}


def test_bundled_model_flows_through():
    from qcard.zoo import load_model_with_info
    model, info = load_model_with_info("qcard:lenet5", weights="random")
    recs = trace_layers(model, info.input_shape)
    assert sum(r.params for r in recs) == info.params == count_params(model)
    assert [r.op for r in recs if r.macs] and all(r.name for r in recs)


class UserNet(nn.Module):
    """Functional ops on the model's own parameters, a weight used twice, a concat."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.shared = nn.Linear(16, 16)
        self.proj = nn.Parameter(torch.randn(16, 4))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.relu(self.bn(F.conv2d(x, self.w, padding=1, stride=2)))      # (1, 8, 4, 4)
        y = y.flatten(2)                                                    # (1, 8, 16)
        y = self.shared(self.shared(y)) * 0.5                               # scalar mul: not recorded
        z = torch.cat([y, y], dim=1)                                        # (1, 16, 16)
        return (z @ self.proj).sum()


def test_user_model_functional_ops_and_shared_weights():
    model = UserNet()
    model.train()
    recs = trace_layers(model, (3, 8, 8))
    assert model.training                                   # mode restored
    names = [r.name for r in recs]
    assert names == ["w", "shared", "shared_1", "concat", "proj"]
    conv, lin, lin2, cat, mm = recs
    assert conv.op == "conv2d" and conv.stride == (2, 2) and conv.padding == (1, 1) and conv.params == 8 * 27
    assert conv.macs == 4 * 4 * 8 * 27
    assert lin.params == 16 * 16 + 16 and lin2.params == 0       # shared weight counted once
    assert lin.macs == lin2.macs == 8 * 16 * 16
    assert cat.op == "concat" and cat.extra["input_shapes"] == [(1, 8, 16), (1, 8, 16)]
    assert mm.op == "matmul" and mm.params == 64 and mm.weight_shape == (16, 4) and mm.macs == 16 * 4 * 16
    total = count_params(model)
    assert total == sum(r.params for r in recs) + 16         # + BN weight and bias
    out = estimate(apply_bits(recs, 8, 8), "bitops", total_params=total)
    assert out["params_outside_layers"] == 16


def test_bad_input_shape_and_failing_forward():
    with pytest.raises(QcardError, match="input shape"):
        trace_layers(nn.Linear(4, 2), (0, 4))
    with pytest.raises(QcardError, match=r"could not trace the model with input shape \(5,\)"):
        trace_layers(nn.Linear(4, 2), (5,))


class FakeQuantConv(nn.Conv2d):
    """A simulated-quantization layer: the weight reaching F.conv2d is computed, not a parameter."""

    def forward(self, x):
        w = torch.round(self.weight * 8) / 8
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_computed_weights_are_named_by_their_module():
    model = nn.Sequential(FakeQuantConv(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(FakeQuantConv(4, 4, 1)), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    recs = trace_layers(model, (3, 8, 8))
    assert [r.name for r in recs] == ["0", "2.0", "4"]
    assert recs[0].params == 4 * 27 + 4 and recs[0].macs == 8 * 8 * 4 * 27
