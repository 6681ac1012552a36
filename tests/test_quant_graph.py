"""Quantizer placement: where integer hardware needs them, on fx graphs and in eager fallback."""
import pytest
import torch
from torch import nn

from qcard.quant.calibrate import calibrate_activations, quant_state, set_weight_ranges, sim_info
from qcard.quant.graph import build_simulated
from qcard.quant.quantizer import FakeQuantize
from qcard.quant.report import layer_records, quantization_block
from qcard.quant.scheme import SimScheme
from test_quant_support import Branchy, Untraceable, one_thread, randomize_bn, reestimate_bn


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _sim(model, x=None, **cfg):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28) if x is None else x
    sim = build_simulated(model, SimScheme(**cfg), x[:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    return sim, x


def _quant_calls(sim):
    return [n for n in sim.graph.nodes if n.op == "call_module" and str(n.target).startswith("qcard_act.")]


def _layer(sim, name):
    return sim_info(sim).layer(name)


def test_branchy_placement_quant_all():
    model = randomize_bn(Branchy()).eval()
    sim, x = _sim(model)
    info = sim_info(sim)
    assert info.graph_mode == "fx" and info.graph_mode_reason is None
    # every conv/linear has a weight quantizer; BN was folded away
    for li in info.gemm_layers():
        assert li.weight_quantizer is not None and li.weight_quantizer.calibrated
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sim.modules())
    assert info.batch_norm == "folded"
    # network input quantized to 8 bits
    assert info.input_quantizer is not None and info.input_quantizer.bits == 8
    # conv1 -> ReLU: one quantizer after the fused ReLU (absorbed), max-pool keeps that grid
    conv1 = _layer(sim, "conv1")
    assert conv1.fused_act == "relu" and conv1.output_quantizer.pre_act == "relu"
    pool = _layer(sim, "pool")
    assert pool.input_quantizers[0] is conv1.output_quantizer
    assert pool.output_quantizer is conv1.output_quantizer          # no requantization after max-pool
    pool_node = next(n for n in sim.graph.nodes if n.target == "pool")
    assert not any(str(u.target).startswith("qcard_act.") for u in pool_node.users)
    # concat: inputs quantized, output requantized
    cat = next(l for l in info.layers if l.op == "concat")
    assert all(q is not None for q in cat.input_quantizers) and cat.output_quantizer is not None
    # GELU (no hardware support): input and output quantized
    gelu = _layer(sim, "act")
    assert gelu.op == "gelu" and gelu.input_quantizers[0] is not None and gelu.output_quantizer is not None
    # residual add: both inputs and the output quantized; named like the cost tracer names it
    add = next(l for l in info.layers if l.op == "add")
    assert add.name == "add" and all(q is not None for q in add.input_quantizers)
    assert add.output_quantizer is not None
    # average pool requantizes; logits quantized (quant_all)
    assert _layer(sim, "avg").output_quantizer is not None
    assert _layer(sim, "fc").output_quantizer is not None
    # and the simulation is close to the FP model at 8 bits
    with torch.no_grad():
        y, yq = model(x), sim(x)
    assert float((y - yq).pow(2).mean() / y.pow(2).mean()) < 1e-3
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        assert torch.allclose(sim(x), y, atol=1e-5)          # BN folding preserves the function


def test_record_names_match_the_cost_tracer():
    from qcard.cost.trace import trace_layers
    model = randomize_bn(Branchy()).eval()
    sim, _ = _sim(model)
    traced = {r.name: r.op for r in trace_layers(model, (1, 28, 28))}
    mine = {r.name: r.op for r in layer_records(sim)}
    for name, op in traced.items():
        if op in ("conv2d", "linear", "add", "mul", "concat", "avgpool", "maxpool", "matmul"):
            assert name in mine, f"{name} ({op}) missing from the ptq records {sorted(mine)}"


def test_residual_policies():
    model = randomize_bn(Branchy()).eval()
    sim, _ = _sim(model, residual_add="gemm_inputs_only")
    info = sim_info(sim)
    add = next(l for l in info.layers if l.op == "add")
    assert all(q is None for q in add.input_quantizers)
    assert _layer(sim, "fc").output_quantizer is None              # logits stay FP32
    assert _layer(sim, "mix").input_quantizers[0] is not None      # GEMM inputs still quantized
    blk = quantization_block(sim)
    assert blk["residual_add"] == "gemm_inputs_only"
    assert any("unquantized residual adds" in f for f in blk["hardware_unfriendly"])
    sim, _ = _sim(model, residual_add="relu_only")
    info = sim_info(sim)
    # the max-pooled ReLU output is quantized where convs read it; the skip path into the add is not
    assert _layer(sim, "left").input_quantizers[0] is not None
    assert all(q is None for q in next(l for l in info.layers if l.op == "add").input_quantizers)
    assert _layer(sim, "left").output_quantizer is None            # not a ReLU output
    assert _layer(sim, "mix").input_quantizers[0] is None          # concat output: not a ReLU output


def test_shared_grid_concat_and_avgpool():
    model = randomize_bn(Branchy()).eval()
    sim, x = _sim(model, concat="shared_grid", avg_pool="shared_grid")
    info = sim_info(sim)
    cat = next(l for l in info.layers if l.op == "concat")
    assert cat.input_quantizers[0] is cat.input_quantizers[1]        # one grid for all inputs
    avg = _layer(sim, "avg")
    avg_node = next(n for n in sim.graph.nodes if n.target == "avg")
    tied = [u for u in avg_node.users if str(u.target).startswith("qcard_act.")]
    assert len(tied) == 1 and sim.get_submodule(str(tied[0].target)).source is avg.input_quantizers[0]
    with torch.no_grad():
        assert torch.isfinite(sim(x)).all()


def test_bn_kept_and_before_activation():
    model = randomize_bn(Branchy()).eval()
    sim, x = _sim(model, bn="kept", quant_point="before_activation")
    info = sim_info(sim)
    assert info.batch_norm == "kept"
    assert any(isinstance(m, nn.BatchNorm2d) for m in sim.modules())
    # the weight quantizer sees the unfolded weight
    assert torch.equal(_layer(sim, "conv1").module.weight, model.conv1.weight)
    # before_activation: the quantizer reads the BN output and the ReLU runs after it
    relu = next(n for n in sim.graph.nodes if n.target == "relu")
    assert str(relu.args[0].target).startswith("qcard_act.")
    q = sim.get_submodule(str(relu.args[0].target))
    assert q.pre_act is None and float(q.range()[0]) < 0           # a grid with negative values
    assert quantization_block(sim)["activations"]["quant_point"] == "before_activation"


def test_first_last_layer_and_overrides():
    model = randomize_bn(Branchy()).eval()
    sim, _ = _sim(model, w_bits=4, a_bits=4, first_layer="8bit", last_layer="fp32",
                  overrides=[{"pattern": "l*t", "w_bits": 2, "a_bits": None, "fp32": False},
                             {"pattern": "gate", "fp32": True, "w_bits": None, "a_bits": None}])
    info = sim_info(sim)
    assert _layer(sim, "conv1").weight_quantizer.bits == 8
    assert _layer(sim, "fc").weight_quantizer is None and _layer(sim, "fc").input_quantizers[0] is None
    assert _layer(sim, "left").weight_quantizer.bits == 2 and _layer(sim, "left").override == "l*t"
    assert _layer(sim, "right").weight_quantizer.bits == 4
    assert _layer(sim, "gate").weight_quantizer is None
    reasons = {u["name"]: u["reason"] for u in info.unquantized}
    assert reasons["fc"] == "last_layer: fp32" and "gate" in reasons and "override" in reasons["gate"]
    blk = quantization_block(sim)
    assert blk["first_layer"] == {"weight_bits": 8, "activation_bits": 8, "name": "conv1"}
    assert blk["last_layer"] == {"weight_bits": None, "activation_bits": None, "name": "fc"}
    assert "FP32 last layer" in blk["hardware_unfriendly"]
    # a tensor can be named too: "<layer>.output"
    sim, _ = _sim(model, overrides=[{"pattern": "mix.output", "a_bits": 4, "w_bits": None, "fp32": False}])
    assert _layer(sim, "mix").output_quantizer.bits == 4
    assert sim_info(sim).tensor_overrides == {"mix.output": "mix.output"}


def test_weight_only_dynamic_and_per_channel_activations():
    model = randomize_bn(Branchy()).eval()
    sim, x = _sim(model, a_bits=None, input_bits=None)
    assert not sim_info(sim).act_quantizers
    blk = quantization_block(sim)
    assert blk["activations"]["bits"] is None and blk["weights"]["bits"] == 8
    sim, x = _sim(model, dynamic_activations=True)
    qs = list(sim_info(sim).act_quantizers.values())
    assert qs and all(q.dynamic for q in qs)
    assert quantization_block(sim)["activations"]["dynamic"] is True
    sim, x = _sim(model, a_granularity="per_channel")
    q = _layer(sim, "left").input_quantizers[0]
    assert q.spec.granularity == "per_channel" and q.scale.numel() == 8
    assert any("per-channel activations" in f for f in quantization_block(sim)["hardware_unfriendly"])


def test_eager_fallback_records_why_and_what():
    model = randomize_bn(Untraceable()).eval()
    msgs = []
    x = torch.randn(8, 1, 28, 28)
    sim = build_simulated(model, SimScheme(), x[:1], log=msgs.append)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    info = sim_info(sim)
    assert info.graph_mode == "eager" and "torch.fx could not trace" in info.graph_mode_reason
    assert any("falling back to eager" in m for m in msgs)
    assert {l.name for l in info.gemm_layers()} == {"conv", "conv2", "fc"}
    assert all(l.weight_quantizer is not None and l.input_quantizers[0] is not None for l in info.gemm_layers())
    assert info.batch_norm == "folded" and isinstance(sim.bn, nn.Identity)
    unq = {u["name"]: u for u in info.unquantized}
    assert "add" in unq and "eager mode" in unq["add"]["reason"]
    blk = quantization_block(sim)
    assert blk["graph_mode"] == "eager" and blk["graph_mode_reason"] == info.graph_mode_reason
    assert blk["residual_add"] == "gemm_inputs_only"
    with torch.no_grad():
        y, yq = model(x), sim(x)
    assert float((y - yq).pow(2).mean() / y.pow(2).mean()) < 1e-3
    # forcing eager on a traceable model works too, and forcing fx on an untraceable one is an error
    sim2 = build_simulated(randomize_bn(Branchy()).eval(), SimScheme(graph_mode="eager"), x[:1], log=lambda m: None)
    assert sim_info(sim2).graph_mode_reason == "graph_mode: eager was requested"
    from qcard.errors import QcardError
    with pytest.raises(QcardError, match="graph_mode: fx"):
        build_simulated(model, SimScheme(graph_mode="fx"), x[:1], log=lambda m: None)


class WithAttention(nn.Module):
    def __init__(self, masked=False):
        super().__init__()
        self.proj = nn.Linear(28, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)
        self.register_buffer("mask", torch.triu(torch.ones(28, 28, dtype=torch.bool), 1) if masked else None)

    def forward(self, x):
        t = self.proj(x[:, 0])
        t = self.mha(t, t, t, need_weights=False, attn_mask=self.mask)[0]
        return self.head(t.mean(1))


def test_unsimulated_modules_are_listed():
    """A masked nn.MultiheadAttention is not rewritten: listed as FP32, and the warning says how to swap it."""
    sim, x = _sim(WithAttention(masked=True).eval())
    unq = {u["name"]: u["reason"] for u in sim_info(sim).unquantized}
    assert "mha" in unq and "not simulated" in unq["mha"]
    assert sim_info(sim).layer("proj").weight_quantizer is not None
    assert any(r.name == "mha" and not r.quantized for r in layer_records(sim))
    assert any("'mha' stays FP32" in w and "mask" in w and "SplitMultiheadAttention" in w
               for w in sim_info(sim).warnings)


def _attention_layers(info, path):
    return {li.name[len(path) + 1:]: li for li in info.layers if li.name.startswith(path + ".")}


def test_multihead_attention_is_quantized_like_timm_attention():
    """Issue 16 item 3: nn.MultiheadAttention's projections and both attention matmuls are quantized."""
    model = WithAttention().eval()
    sim, x = _sim(model)
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-5)
    info = sim_info(sim)
    parts = _attention_layers(info, "mha")
    assert sorted(parts) == ["in_proj", "matmul", "matmul_1", "out_proj", "softmax"]
    assert parts["in_proj"].weight_quantizer is not None and parts["out_proj"].weight_quantizer is not None
    assert all(q is not None for p in ("matmul", "matmul_1") for q in parts[p].input_quantizers)
    assert not [u for u in info.unquantized if u["name"].startswith("mha")] and not info.warnings
    assert model.mha.in_proj_weight is not None          # the user's model is not changed


@pytest.mark.parametrize("batch_first,kdim,cross", [(False, None, False), (True, None, True), (True, 12, True)])
def test_split_attention_equals_multihead_attention(batch_first, kdim, cross):
    from qcard.quant.modules import SplitMultiheadAttention
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    split = SplitMultiheadAttention(mha).eval()
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, kdim or 16) if batch_first else torch.randn(7, 2, 16)
    k, v = (kv, kv.flip(1)) if cross else (q, q)
    with torch.no_grad():
        for avg in (True, False):
            out, w = mha(q, k, v, average_attn_weights=avg)
            out2, w2 = split(q, k, v, average_attn_weights=avg)
            torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(w2, w, rtol=1e-4, atol=1e-5)


def test_torchvision_vit_attention_is_quantized():
    """torchvision vit_b_16 (random weights, 32x32 input): its nn.MultiheadAttention modules are rewritten,
    exact before quantization; after W8A8 the projections have weight quantizers and the matmuls
    quantized inputs, under the cost tracer's layer names."""
    torchvision = pytest.importorskip("torchvision")
    from qcard.cost.trace import trace_layers
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)      # zero-initialised: the outputs would all be 0
    x = torch.rand(2, 3, 32, 32)
    sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8), x[:1], log=lambda m: None)
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-4)
    info = sim_info(sim)
    traced = {r.name for r in trace_layers(model, (3, 32, 32))}
    for i in (0, 11):
        path = f"encoder.layers.encoder_layer_{i}.self_attention"
        parts = _attention_layers(info, path)
        assert parts["in_proj"].weight_quantizer is not None and parts["out_proj"].weight_quantizer is not None
        assert all(q is not None for p in ("matmul", "matmul_1") for q in parts[p].input_quantizers)
        assert {f"{path}.{p}" for p in ("in_proj", "matmul", "matmul_1", "out_proj")} <= traced
    assert not [u for u in info.unquantized if "self_attention" in u["name"]]


def test_timm_linear_subclass_is_quantized():
    """timm mobilenetv3_small_100's classifier (timm's Linear, which calls F.linear itself) is quantized."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8), x[:1], log=lambda m: None)
    info = sim_info(sim)
    assert not info.unquantized
    assert info.layer("classifier").weight_quantizer is not None and info.gemm_layers()[-1].name == "classifier"
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-5)


def _bundled(name):
    from qcard.zoo import load_model
    try:
        return load_model(f"qcard:{name}")
    except Exception as exc:   # weights are produced by `qcard zoo train`
        pytest.skip(f"bundled model {name} unavailable: {exc}")


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny", "lenet5", "mlp", "vit_tiny"])
def test_bundled_models_flow_through_fx(name):
    from qcard.cost.trace import trace_layers
    model = _bundled(name)
    sim, x = _sim(model)
    info = sim_info(sim)
    assert info.graph_mode == "fx"
    n_gemm = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(info.gemm_layers()) == n_gemm
    traced = {r.name for r in trace_layers(model, (1, 28, 28))}
    recs = {r.name for r in layer_records(sim)}
    assert traced <= recs | {u["name"] for u in info.unquantized}, sorted(traced - recs)
    if name == "vit_tiny":
        mm = [l for l in info.layers if l.op == "matmul"]
        assert len(mm) == 8 and all(all(q is not None for q in l.input_quantizers) for l in mm)
        sm = [l for l in info.layers if l.op == "softmax"]
        assert sm and all(l.input_quantizers[0] is not None and l.output_quantizer is not None for l in sm)


@pytest.mark.parametrize("ref", ["torchvision:resnet18", "torchvision:mobilenet_v2", "timm:efficientnet_b0",
                                 "timm:vit_tiny_patch16_224"])
def test_non_bundled_architectures_random_weights(ref):
    source, name = ref.split(":")
    shape = (3, 64, 64)
    if source == "torchvision":
        import torchvision
        model = getattr(torchvision.models, name)(weights=None)
    else:
        import timm
        kw = {"img_size": 64} if "vit" in name else {}
        model = timm.create_model(name, pretrained=False, **kw)
    torch.manual_seed(0)
    model = reestimate_bn(model, shape)
    x = torch.randn(4, *shape)
    # at 16 bits the simulation must reproduce the model almost exactly (placement and folding are
    # right); at 8 bits random-init nets amplify rounding noise, so only sanity is checked there
    sim16 = build_simulated(model, SimScheme(w_bits=16, a_bits=16, input_bits=16), x[:1], log=lambda m: None)
    set_weight_ranges(sim16)
    calibrate_activations(sim16, [x])
    sim = build_simulated(model, SimScheme(), x[:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    info = sim_info(sim)
    assert info.graph_mode == "fx"
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len({id(l.module) for l in info.gemm_layers()}) == len(convs)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        assert info.batch_norm == "folded"
        assert not [u for u in info.unquantized if u["op"] == "batchnorm"]
    with torch.no_grad():
        y, yq, y16 = model(x), sim(x), sim16(x)
    assert float((y - y16).pow(2).mean() / y.pow(2).mean()) < 1e-4
    assert float((y - yq).pow(2).mean() / y.pow(2).mean()) < 0.5
    blk = quantization_block(sim)
    assert blk["weights"]["bits"] == 8 and blk["activations"]["bits"] == 8


def test_inference_cache_and_prescale_match_the_plain_path():
    """The eval fast paths (cached fake-quant weights, 1/s folded into the producing conv) give the
    same numbers as the training path up to float rounding."""
    model = randomize_bn(Branchy()).eval()
    sim, x = _sim(model)
    assert any(q.prescaled_input for q in sim_info(sim).act_quantizers.values())
    with torch.no_grad():
        fast = sim(x)
    slow = sim(x.clone().requires_grad_(True)).detach()
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)
    # changing a weight in place is seen (cache keyed on the tensor version)
    with torch.no_grad():
        sim.get_submodule("fc").weight.mul_(2)
        again = sim(x)
    assert not torch.allclose(again, fast)


def test_quantizer_without_calibration_fails_loudly():
    model = randomize_bn(Branchy()).eval()
    x = torch.randn(2, 1, 28, 28)
    sim = build_simulated(model, SimScheme(), x[:1], log=lambda m: None)
    with pytest.raises(RuntimeError, match="before its range"):
        sim(x)
    assert isinstance(sim_info(sim).input_quantizer, FakeQuantize)
