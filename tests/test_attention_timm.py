"""Attention honesty (issue 21 item 4): timm's fused F.scaled_dot_product_attention is written out in the
simulated copy (q·kᵀ·scale, softmax, ·v, checked equal to the fused kernel) so that P is quantized like any
matmul operand; a call that cannot be written out is recorded with P in FP32. Records match the cost
tracer's layers (LayerNorm, softmax), the headline mean A bits is the per-layer recomputation, and
identity-in-eval modules (stochastic depth) are not listed as left in FP32.

Random weights and tiny inputs: the claims checked are structural (records, bits, BOPs, names) and
numerical equalities that hold for any weights."""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from qcard.cost import estimate, merge_layer_records
from qcard.cost.trace import trace_model
from qcard.quant import attention
from qcard.quant.calibrate import calibrate_activations, quant_state, set_weight_ranges, sim_info
from qcard.quant.graph import build_simulated
from qcard.quant.report import layer_accounting, layer_records, quantization_block, reconcile_with_layers
from qcard.quant.scheme import SimScheme

timm = pytest.importorskip("timm")


def _deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()


def _calibrated(model: nn.Module, x: torch.Tensor, **scheme) -> nn.Module:
    sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8, **scheme), x[:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    return sim


def _card_records(model: nn.Module, sim: nn.Module, shape):
    """The card's per-layer records: the cost tracer's, the method's bits merged in by name."""
    traced = trace_model(model, shape).records
    warnings = merge_layer_records(traced, layer_records(sim))
    return traced, warnings


def _mean_a_bits_by_hand(records) -> float:
    """Mean activation bits over layers with MACs, weighted by input elements, FP32 counted as 32."""
    num = den = 0
    for r in records:
        if not r.macs:
            continue
        shapes = [r.input_shape] if r.weight_shape or not r.extra.get("input_shapes") else r.extra["input_shapes"]
        n = sum(math.prod(s) for s in shapes)
        num += n * (32 if r.activation_bits is None else r.activation_bits)
        den += n
    return num / den


# ---------------------------------------------------------------------------- the written-out form

class _SDPA(nn.Module):
    """Cross attention on slices of the input: L = 6 queries, S = 3 keys, E = 8, Ev = 4, explicit scale."""

    def forward(self, x):
        q, k, v = x[..., :8], x[..., :3, 8:16], x[..., :3, 16:20]
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def test_written_out_attention_equals_the_fused_kernel():
    gm = fx.symbolic_trace(_SDPA())
    x = torch.randn(2, 3, 6, 20)
    ShapeProp(gm).propagate(x)
    done, notes = attention.write_out_attention(gm, x)
    assert (done, notes) == (1, [])
    assert not [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(torch.matmul) == 2
    for seed in range(5):                         # other inputs than the one checked on
        torch.manual_seed(seed)
        y = torch.randn(2, 3, 6, 20) * (seed + 1)
        ref = F.scaled_dot_product_attention(y[..., :8], y[..., :3, 8:16], y[..., :3, 16:20], scale=0.3)
        torch.testing.assert_close(gm(y), ref, rtol=attention.RTOL,
                                   atol=attention.ATOL * (1 + float(ref.abs().max())))


def test_a_call_that_differs_from_the_fused_kernel_is_put_back(monkeypatch):
    write_out = attention._write_out

    def wrong_scale(graph, node):                       # a written-out form that is not the kernel's
        out, made = write_out(graph, node)
        mul = next(n for n in made if n.target is operator.mul)
        mul.args = (mul.args[0], mul.args[1] * 1.01)
        return out, made

    monkeypatch.setattr(attention, "_write_out", wrong_scale)
    gm = fx.symbolic_trace(_SDPA())
    x = torch.randn(2, 3, 6, 20)
    ShapeProp(gm).propagate(x)
    done, notes = attention.write_out_attention(gm, x)
    assert done == 0 and len(notes) == 1 and "differed from the fused kernel" in notes[0]
    assert [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert not [n for n in gm.graph.nodes if n.target is torch.matmul]
    torch.testing.assert_close(gm(x), _SDPA()(x))


def test_deit_attention_is_written_out_and_equal_before_quantization():
    model = _deit()
    x = torch.randn(3, 3, 32, 32)
    sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8), x[:1], log=lambda m: None)
    targets = [n.target for n in sim.graph.nodes]
    assert F.scaled_dot_product_attention not in targets
    assert targets.count(torch.matmul) == 24 and targets.count(torch.softmax) == 12
    assert [n for n in sim.graph.nodes if n.op == "placeholder"] == [next(iter(sim.graph.nodes))]
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-5)
    assert not sim_info(sim).warnings


# ---------------------------------------------------------------------------- records, bits, BOPs

def test_deit_w8a8_records_say_what_the_simulation_does():
    model = _deit()
    x = torch.randn(4, 3, 32, 32)
    sim = _calibrated(model, x)
    info = sim_info(sim)
    records, warnings = _card_records(model, sim, (3, 32, 32))
    assert warnings == []                                   # every method record matches a traced layer
    by = {r.name: r for r in records}
    for i in range(12):
        scores, softmax, context = (by[f"blocks.{i}.attn.{p}"] for p in ("matmul", "softmax", "matmul_1"))
        for r in (scores, context):
            assert r.op == "matmul" and r.activation_bits == 8 and r.weight_bits is None
            assert r.extra["operand_bits"] == [8, 8] and "written out" in r.extra["note"]
        assert softmax.activation_bits == 8 and softmax.output_bits == 8
        assert by[f"blocks.{i}.norm1"].activation_bits == 8 == by[f"blocks.{i}.norm2"].activation_bits
    assert by["norm"].op == "layernorm" and by["norm"].activation_bits == 8
    assert not [u for u in info.unquantized if "softmax" in u["name"] or "attention" in u["name"]]

    # P·v's first operand is the softmax output, on an 8-bit grid in the simulated model itself
    p_q = info.layer("blocks.3.attn.matmul_1").input_quantizers[0]
    seen = {}      # (the quantizer may write its output over its input: the input is copied first)
    h = p_q.register_forward_pre_hook(lambda m, a: seen.update(inp=a[0].clone()))
    h2 = p_q.register_forward_hook(lambda m, a, out: seen.update(out=out.clone()))
    with torch.no_grad():
        sim(x)
    h.remove()
    h2.remove()
    torch.testing.assert_close(seen["inp"].sum(-1), torch.ones(seen["inp"].shape[:-1]))   # rows of P
    steps = seen["out"] / p_q.scale
    assert p_q.bits == 8 and torch.allclose(steps, steps.round(), atol=1e-3) and steps.round().unique().numel() <= 256

    # headline = per-layer recomputation; BOPs of both attention matmuls at 8 × 8
    block, banner = reconcile_with_layers(quantization_block(sim), records)
    assert block["mixed_precision"]["mean_activation_bits"] == pytest.approx(_mean_a_bits_by_hand(records), abs=1e-4)
    assert block["mixed_precision"]["mean_activation_bits"] == 8.0 and banner == []
    rows = {r["name"]: r for r in estimate(records, "bitops")["layers"]}
    assert rows["blocks.0.attn.matmul_1"]["bops"] == by["blocks.0.attn.matmul_1"].macs * 64


class _MaskedAttention(nn.Module):
    """An attention with an additive float mask: its F.scaled_dot_product_attention call stays fused."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 10)
        self.register_buffer("mask", torch.triu(torch.full((5, 5), -1e4), diagonal=1))

    def forward(self, x):                                     # x: (N, 5, 16)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.proj(o.transpose(1, 2).flatten(2)).mean(1)


def test_attention_left_fused_records_p_as_fp32():
    torch.manual_seed(0)
    model = _MaskedAttention().eval()
    x = torch.randn(8, 5, 16)
    sim = _calibrated(model, x)
    info = sim_info(sim)
    assert any("left fused (it is called with an attention mask)" in w for w in info.warnings)
    assert not [q for q in info.act_quantizers if "mask" in q]           # the mask is not an operand
    records, warnings = _card_records(model, sim, (5, 16))
    assert warnings == []
    by = {r.name: r for r in records}
    scores, softmax, context = by["matmul"], by["softmax"], by["matmul_1"]
    assert scores.activation_bits == 8 and scores.extra["operand_bits"] == [8, 8]
    assert softmax.activation_bits is None and "fused" in softmax.reason
    # P·v: P is FP32 inside the kernel, v is on the 8-bit grid
    assert context.activation_bits is None and context.weight_bits == 8 and context.extra["operand_bits"] == [32, 8]
    rows = {r["name"]: r for r in estimate(records, "bitops")["layers"]}
    assert rows["matmul_1"]["bops"] == context.macs * 32 * 8 and rows["matmul"]["bops"] == scores.macs * 64
    block, banner = reconcile_with_layers(quantization_block(sim), records)
    assert block["mixed_precision"]["mean_activation_bits"] == pytest.approx(_mean_a_bits_by_hand(records), abs=1e-4)
    assert block["mixed_precision"]["mean_activation_bits"] > 8
    assert any("1 matmul(s) of two activations (attention) with an operand in FP32" in w for w in banner)
    assert layer_accounting(records)["fp32_matmuls"] == [context]


def test_deit_eager_records_attention_in_fp32_under_the_tracer_names():
    model = _deit()
    x = torch.randn(4, 3, 32, 32)
    sim = _calibrated(model, x, graph_mode="eager")
    info = sim_info(sim)
    records, warnings = _card_records(model, sim, (3, 32, 32))
    assert warnings == []
    by = {r.name: r for r in records}
    unq = {u["name"]: u["reason"] for u in info.unquantized}
    for p in ("matmul", "softmax", "matmul_1"):
        assert "scaled_dot_product_attention" in unq[f"blocks.0.attn.{p}"]
        assert by[f"blocks.0.attn.{p}"].activation_bits is None
    assert by["blocks.0.attn.qkv"].activation_bits == 8 and by["blocks.0.attn.qkv"].weight_bits == 8
    # timm's LayerNorm (a subclass of nn.LayerNorm): its input is quantized by its pre-hook, as nn.LayerNorm's
    assert by["blocks.0.norm1"].activation_bits == 8 and by["norm"].activation_bits == 8
    block, _ = reconcile_with_layers(quantization_block(sim), records)
    assert block["mixed_precision"]["mean_activation_bits"] == pytest.approx(_mean_a_bits_by_hand(records), abs=1e-4)


@pytest.mark.slow
def test_torchvision_vit_layernorm_rows_agree_with_deit():
    """vit_b_16 (nn.LayerNorm, nn.MultiheadAttention) and deit (timm's LayerNorm, fused attention): under
    W8A8 fx both say what the simulation does, A 8 on LayerNorm (its input is the quantized residual
    stream) and on both attention matmuls."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, 32, 32)
    sim = _calibrated(model, x)
    records, warnings = _card_records(model, sim, (3, 32, 32))
    assert warnings == []
    norms = [r for r in records if r.op == "layernorm"]
    assert len(norms) == 25 and all(r.activation_bits == 8 for r in norms)
    mm = [r for r in records if r.op == "matmul"]
    assert len(mm) == 24 and all(r.activation_bits == 8 and r.extra["operand_bits"] == [8, 8] for r in mm)
    assert all(len(r.extra["input_shapes"]) == 2 for r in mm)
    block, _ = reconcile_with_layers(quantization_block(sim), records)
    assert block["mixed_precision"]["mean_activation_bits"] == pytest.approx(_mean_a_bits_by_hand(records), abs=1e-4)


# ---------------------------------------------------------------------------- identity in eval, export

@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_stochastic_depth_is_not_left_in_fp32(mode):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    sim = build_simulated(model, SimScheme(w_bits=8, a_bits=8, graph_mode=mode), x[:1], log=lambda m: None)
    info = sim_info(sim)
    assert not [u for u in info.unquantized if "stochastic_depth" in u["name"] or "stochastic" in u["op"]]
    assert not [li for li in info.layers if "stochastic" in li.name]
    with quant_state(sim, weights=False, activations=False), torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-5)


def test_identity_in_eval_only_in_eval():
    from qcard.ops.kinds import identity_in_eval, module_kind
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.ops.StochasticDepth(0.2, "row")
    assert identity_in_eval(sd.eval()) and module_kind(sd)[0] == "pass"
    assert not identity_in_eval(sd.train()) and module_kind(sd)[0] != "pass"
    f = torchvision.ops.stochastic_depth
    assert identity_in_eval(f, (None, 0.2, "row", False)) and not identity_in_eval(f, (None, 0.2, "row", True))
    assert not identity_in_eval(f, (None, 0.2, "row"))                  # training defaults to True
    assert identity_in_eval(timm.layers.drop_path, (None, 0.1))          # training defaults to False
    assert not identity_in_eval(timm.layers.drop_path, (None, 0.1), {"training": True})


@pytest.mark.slow
def test_deit_exports_and_runs_on_onnxruntime():
    """Issue 21: deit_tiny's export failed (SDPA's is_causal a Tensor after FX). Written out, the attention
    exports as MatMul/Softmax with QDQ on every operand."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from qcard.deploy.export import export_onnx
    model = _deit()
    x = torch.randn(4, 3, 32, 32)
    sim = _calibrated(model, x)
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "deit.onnx")
        export_onnx(sim, x[:1], path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
        out = ort.InferenceSession(path).run(None, {"input": x.numpy()})[0]
    assert "MatMul" in ops and "Softmax" in ops and not any("Attention" in o for o in ops)
    with torch.no_grad():
        ref = sim(x).numpy()
    assert out.shape == ref.shape


@pytest.mark.slow
def test_deit_with_timm_explicit_attention_has_the_same_records():
    """timm's non-fused path (q·scale, q @ kᵀ, softmax, @ v): q·scale reads q in float, so the qkv tuple is
    not quantized as a whole; k and v are then quantized where they leave it, and the records (names,
    operand bits) are those of the written-out fused form."""
    x = torch.randn(4, 3, 32, 32)
    fused = _deit()
    explicit = _deit()
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    got = {}
    for name, model in (("fused", fused), ("explicit", explicit)):
        sim = _calibrated(model, x)
        records, warnings = _card_records(model, sim, (3, 32, 32))
        assert warnings == []
        got[name] = {r.name: (r.op, r.activation_bits, r.weight_bits, r.extra.get("operand_bits"))
                     for r in records if ".attn." in r.name}
    assert got["explicit"] == got["fused"]
    assert got["explicit"]["blocks.5.attn.matmul_1"] == ("matmul", 8, None, [8, 8])
