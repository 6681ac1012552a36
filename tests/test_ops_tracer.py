"""The op tracer (qcard.ops): names, kinds, data flow; the BN-fold helper on top of it; merging
method records into traced records by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcard.cost import merge_layer_records, trace_layers
from qcard.ops import LayerNamer, gemm_type, trace_ops
from qcard.quant.bn import NOT_AFTER_GEMM, RUNS_TWICE, SHARED_OUTPUT, find_bn_folds, fold_batch_norms
from qcard.records import LayerRecord
from tests.test_quant_support import Branchy, randomize_bn


class Gelu(nn.Module):
    """Functional ops in forward code: a residual add, F.gelu, a scalar multiply (not an op)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = F.gelu(self.fc(x)) * 0.5
        return y + x


def test_names_kinds_and_module_calls():
    model = Branchy().eval()
    x = torch.randn(1, 1, 28, 28)
    trace = trace_ops(model, x)
    cost_ops = [(o.name, o.op) for o in trace.ops if o.cost_op]
    assert cost_ops == [(r.name, r.op) for r in trace_layers(model, (1, 28, 28))]
    by_name = {o.name: o for o in trace.ops}
    assert by_name["conv1"].in_leaf and by_name["conv1"].weight == "conv1.weight"
    add = by_name["add"]
    assert add.op == "add" and not add.in_leaf and add.module is model and len(add.inputs) == 2
    # sigmoid is discovered (the eager builder lists it) but is not a cost layer
    assert by_name["sigmoid"].op == "sigmoid" and not by_name["sigmoid"].cost_op
    # module calls carry tensor identity: bn1 reads what conv1 returned
    calls = {c.path: c for c in trace.calls}
    assert calls["bn1"].inputs[0] == calls["conv1"].output
    assert trace.producers()[calls["bn1"].inputs[0]] is calls["conv1"]
    assert calls["conv1"].inputs[0] == trace.example and calls[""].leaf is False
    assert trace.uses[calls["conv1"].output] == 1
    assert model.training is False


def test_mode_restored_and_no_hooks_left():
    model = Branchy().train()
    trace_ops(model, torch.randn(2, 1, 28, 28))
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_namer_rules():
    names = LayerNamer()
    assert [names.unique("a") for _ in range(3)] == ["a", "a_1", "a_2"]
    counts = {}
    assert [names.scoped(counts, "blk", "add") for _ in range(2)] == ["blk.add", "blk.add_1"]
    assert names.scoped({}, "", "add") == "add"
    # the first op of a leaf module takes the module's name; a second op does not
    leaf = {}
    assert names.op_name(leaf, "pool", "maxpool", in_leaf=True) == "pool"
    assert names.op_name(leaf, "pool", "softmax", in_leaf=True) == "pool.softmax"
    assert names.op_name({}, "x", "linear", owner="head") == "head"


def test_gemm_type_exact_class_or_quantized_twin():
    from qcard.quant.modules import to_quant_module

    class MyConv(nn.Conv2d):
        pass
    conv = nn.Conv2d(1, 2, 3)
    assert gemm_type(conv) is nn.Conv2d and gemm_type(to_quant_module(conv)) is nn.Conv2d
    assert gemm_type(MyConv(1, 2, 3)) is None and gemm_type(nn.ReLU()) is None


class Shared(nn.Module):
    """conv_a's output feeds bn_a and a skip path; bn_b runs after a ReLU; conv_c/bn_c fold."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.bn_b = nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv_a(x)
        y = self.bn_b(self.relu(self.bn_a(a))) + a
        return self.bn_c(self.conv_c(y))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


def test_find_bn_folds_reasons():
    model = randomize_bn(Shared()).eval()
    folds = {f.bn: f for f in find_bn_folds(trace_ops(model, torch.randn(1, 2, 6, 6)))}
    assert folds["bn_a"].layer == "conv_a" and folds["bn_a"].reason == SHARED_OUTPUT
    assert folds["bn_b"].layer == "relu" and folds["bn_b"].reason == NOT_AFTER_GEMM
    assert folds["bn_c"].layer == "conv_c" and folds["bn_c"].reason is None
    twice = find_bn_folds(trace_ops(Twice().eval(), torch.randn(1, 2, 3, 3)))
    assert [f.reason for f in twice] == [RUNS_TWICE, RUNS_TWICE]


def test_fold_batch_norms_keeps_the_function():
    model = randomize_bn(Shared()).eval()
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        ref = model(x)
    folded, kept = fold_batch_norms(model, x[:1])
    assert folded == [("conv_c", "bn_c")] and isinstance(model.bn_c, nn.Identity)
    assert sorted(k.bn for k in kept) == ["bn_a", "bn_b"]
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_eager_lists_functional_ops_under_the_cost_names():
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    model = Gelu().eval()
    sim = build_simulated(model, SimScheme(graph_mode="eager"), torch.randn(1, 8), log=lambda m: None)
    unq = {u["name"]: u["op"] for u in sim.qcard_sim.unquantized}
    assert unq == {"gelu": "gelu", "add": "add"}
    assert "add" in {r.name for r in trace_layers(model, (8,))}


def test_merge_layer_records_by_name_and_warns_on_strangers():
    traced = [LayerRecord(name="conv1", op="conv2d", macs=10, extra={"fan_in": 9}),
              LayerRecord(name="add", op="add")]
    mine = [LayerRecord(name="conv1", op="conv2d", weight_bits=4, activation_bits=8, extra={"kind": "gemm"}),
            LayerRecord(name="blocks.0.mystery", op="conv2d", weight_bits=4),
            LayerRecord(name="bn1", op="batchnorm", quantized=False, reason="kept")]
    warnings = merge_layer_records(traced, mine)
    assert len(traced) == 2                                   # nothing appended
    assert traced[0].weight_bits == 4 and traced[0].macs == 10 and traced[0].extra == {"fan_in": 9, "kind": "gemm"}
    assert traced[1].weight_bits is None
    # a conv the tracer does not know is a naming problem; a batch norm is simply not a cost layer
    assert len(warnings) == 1 and "blocks.0.mystery (conv2d)" in warnings[0] and "bn1" not in warnings[0]
    assert merge_layer_records(traced, mine[:1]) == []


def test_cost_package_stays_torch_free():
    import subprocess
    import sys
    code = "import sys, qcard.cost; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_private_imports_between_builders():
    import inspect

    import qcard.quant.eager as eager
    src = inspect.getsource(eager)
    assert "from .graph import" not in src
    with pytest.raises(AttributeError):
        getattr(__import__("qcard.quant.graph", fromlist=["_GEMM_OP"]), "_GEMM_OP")


class FusedAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention, in a module with children (not a leaf)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):                          # x: (N, L, 8), 2 heads of 4
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_sdpa_is_traced_as_its_two_matmuls_and_softmax():
    model = FusedAttention().eval()
    x = torch.randn(1, 5, 8)
    trace = trace_ops(model, x)
    parts = [(o.name, o.op, o.part, o.fused) for o in trace.ops if o.fused]
    assert parts == [("matmul", "matmul", "scores", "sdpa"), ("softmax", "softmax", "softmax", "sdpa"),
                     ("matmul_1", "matmul", "context", "sdpa")]
    context = trace.ops[-1]
    out = model(x)
    assert context.output_shape == (1, 2, 5, 4) and context.part == "context"
    recs = {r.name: r for r in trace_layers(model, (5, 8))}
    assert recs["matmul"].macs == recs["matmul_1"].macs == 2 * 5 * 5 * 4
    assert recs["matmul"].extra["input_shapes"] == [(1, 2, 5, 4), (1, 2, 5, 4)]
    assert recs["matmul_1"].extra["input_shapes"] == [(1, 2, 5, 5), (1, 2, 5, 4)]
    assert recs["softmax"].input_shape == (1, 2, 5, 5) and out.shape == (1, 5, 8)
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)       # on meta: the CPU kernel's flops are not registered
    with torch.device("meta"):
        meta = FusedAttention().eval()
    with counter, torch.no_grad():
        meta(torch.zeros(1, 5, 8, device="meta"))
    assert 2 * sum(r.macs for r in recs.values()) == counter.get_total_flops()


class OwnNorm(nn.Module):
    """A norm outside torch.nn that calls F.layer_norm itself (as timm's LayerNorm does): a leaf module
    for the op tracer, traced through by torch.fx."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = OwnNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return self.head(self.norm(y + x))


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_a_leaf_modules_functional_op_has_the_tracers_name(mode):
    from qcard.quant.graph import build_simulated
    from qcard.quant.report import layer_records
    from qcard.quant.scheme import SimScheme
    from qcard.quant.calibrate import calibrate_activations, set_weight_ranges
    model = NormNet().eval()
    x = torch.randn(4, 8)
    sim = build_simulated(model, SimScheme(graph_mode=mode), x[:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    traced = trace_layers(model, (8,))
    assert "norm" in {r.name for r in traced}
    mine = layer_records(sim)
    # fx quantizes the norm's input under its module path; eager does not see F.layer_norm inside a leaf
    assert ("norm" in {r.name for r in mine}) == (mode == "fx")
    assert merge_layer_records(traced, mine) == []
    assert {r.name: r.activation_bits for r in traced}["norm"] == (8 if mode == "fx" else None)
