"""Module-level (eager) quantizer placement, for models torch.fx cannot trace.

What it can do without a graph: quantize the weights of every nn.Conv*/nn.Linear, quantize each
such layer's input (so activations are quantized where a matmul reads them), fold a batch norm that
directly consumes a conv's output (found by tensor identity in one traced forward pass, qcard.ops and
quant.bn), and quantize the inputs of non-linearity modules (GELU, Softmax, LayerNorm and its
subclasses such as timm's, ...). What it cannot do: quantize functional ops written in forward code
(residual adds, torch.matmul, torch.cat, F.softmax, F.scaled_dot_product_attention, whose q·kᵀ, softmax
and P·v stay FP32). The same traced pass finds those, and each is listed as unquantized with the reason, under
the name the cost tracer gives it, so the card says exactly what eager mode left in FP32. Residual adds
therefore read FP32 inputs (gemm_inputs_only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..ops.kinds import AVGPOOL_MODULES, GEMM_OP, RELU_MODULES, gemm_type, nonlinear_op
from ..ops.tracer import ModuleCall, OpTrace, trace_ops
from .bn import bn_affine, find_bn_folds, fold_bn
from .cle import pair_supported
from .modules import to_quant_module, weight_channel_axis
from .quantizer import FakeQuantize
from .scheme import SimScheme
from .sim import LayerInfo, SimInfo, make_act_quantizer, make_weight_quantizer, match_override

__all__ = ["build_eager"]


@dataclass
class _Flow:
    """The traced pass as the builder reads it: leaf-module calls, who produced each tensor, and the
    batch norms attached to each conv/linear."""
    trace: OpTrace
    calls: List[ModuleCall]
    producer: Dict[int, ModuleCall]
    bn_of: Dict[str, Dict[str, Any]] = field(default_factory=dict)    # layer path -> its batch norm
    bn_source: Dict[int, str] = field(default_factory=dict)           # id(bn call) -> its layer's path
    act_of: Dict[str, str] = field(default_factory=dict)              # layer path -> fused relu/relu6
    gemm_of: Dict[str, type] = field(default_factory=dict)            # layer path -> the conv/linear class it runs as

    def source(self, c: ModuleCall) -> Optional[ModuleCall]:
        """The leaf call that produced c's first input (None: the input or a functional op)."""
        return self.producer.get(c.inputs[0]) if c.inputs else None

    def single_use(self, tensor: int) -> bool:
        return self.trace.uses.get(tensor, 0) == 1

    def gemm(self, c: Optional[ModuleCall]) -> Optional[type]:
        return self.gemm_of.get(c.path) if c is not None else None


def _gemm_classes(trace: OpTrace) -> Dict[str, type]:
    """The conv/linear class each leaf module runs as: its own (gemm_type), or the base class of a
    subclass whose forward is the base's (timm's Linear: F.linear(x, self.weight, self.bias)). Such a
    subclass is recognised from the traced pass: every call ran one op of the base's kind, on the call's
    input, with the module's own weight, and returned its result. Its quantized twin then stands in for
    it under its own path, the name the cost tracer gives it. Padding or weight-computing subclasses
    (Conv2dSame, StdConv2d) fail the test and stay listed as unquantized."""
    ops: Dict[str, List[Any]] = {}
    for op in trace.ops:
        if op.in_leaf:
            ops.setdefault(op.path, []).append(op)
    out: Dict[str, type] = {}
    subclass: Dict[str, type] = {}
    plain: Dict[str, bool] = {}
    for c in trace.leaf_calls():
        base = gemm_type(c.module)
        if base is not None:
            out[c.path] = base
            continue
        base = next((b for b in GEMM_OP if isinstance(c.module, b)), None)
        if base is None:
            continue
        mine = ops.get(c.path, [])
        weight = f"{c.path}.weight" if c.path else "weight"
        same = (all(o.op == GEMM_OP[base] and o.weight == weight for o in mine)
                and any(o.output == c.output and o.inputs[:1] == c.inputs[:1] for o in mine))
        subclass[c.path] = base
        plain[c.path] = plain.get(c.path, True) and same
    out.update({path: subclass[path] for path, ok in plain.items() if ok})
    return out


def _quant_twin(m: nn.Module, base: type) -> nn.Module:
    """The quantized twin of m, also for a subclass of `base` whose forward is base's (see _gemm_classes)."""
    if type(m) is not base and gemm_type(m) is None:
        plain = base.__new__(base)
        plain.__dict__.update(m.__dict__)
        m = plain
    return to_quant_module(m)


def _relu_name(m: nn.Module) -> str:
    return "relu6" if isinstance(m, nn.ReLU6) else "relu"


def _per_sample_numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def build_eager(model: nn.Module, cfg: SimScheme, example: torch.Tensor, reason: str, log=print) -> nn.Module:
    """Place quantizers on `model` in place (module swaps and hooks) and attach its SimInfo."""
    info = SimInfo(config=cfg, graph_mode="eager", graph_mode_reason=reason)
    trace = trace_ops(model, example)
    flow = _Flow(trace=trace, calls=trace.leaf_calls(), producer=trace.producers(), gemm_of=_gemm_classes(trace))
    _batch_norms(model, cfg, flow, info)
    _fused_activations(flow)
    model.qcard_eager = nn.ModuleDict()
    done = _wrap_gemms(model, cfg, flow, info)
    _fix_bn_sources(info)
    _eager_pairs(flow, info)
    if cfg.a_bits is not None and cfg.residual_add == "quant_all":
        _quantize_nonlinear_inputs(model, cfg, flow, done, info)
    _list_functional_ops(trace, info)
    _settings_not_simulated(cfg, info)
    info.has_avgpool = any(isinstance(c.module, AVGPOOL_MODULES) for c in flow.calls)
    for msg in info.warnings:
        log(f"qcard: {msg}")
    model.__dict__["qcard_sim"] = info
    return model


def _batch_norms(model: nn.Module, cfg: SimScheme, flow: _Flow, info: SimInfo) -> None:
    """Fold (or keep, per cfg.bn) every batch norm that reads a conv/linear output directly."""
    calls = {id(c.module): c for c in flow.calls}
    has_bn = False
    for f in find_bn_folds(flow.trace):
        has_bn = True
        if f.reason:
            info.unquantized.append({"name": f.bn, "op": "batchnorm", "reason": f.reason})
            continue
        beta, gamma = bn_affine(f.bn_module)
        flow.bn_of[f.layer] = {"beta": beta, "gamma": gamma, "state": cfg.bn, "path": f.bn}
        flow.bn_source[id(calls[id(f.bn_module)])] = f.layer
        if cfg.bn == "folded":
            fold_bn(f.layer_module, f.bn_module)
            model.set_submodule(f.bn, nn.Identity())
    info.batch_norm = cfg.bn if has_bn else "none"


def _fused_activations(flow: _Flow) -> None:
    """Which ReLU/ReLU6 follows each conv/linear (directly or after its batch norm)."""
    for c in flow.calls:
        if not isinstance(c.module, RELU_MODULES) or not c.inputs:
            continue
        src = flow.source(c)
        if src is not None and id(src) in flow.bn_source:
            flow.act_of[flow.bn_source[id(src)]] = _relu_name(c.module)
        elif flow.gemm(src) is not None:
            flow.act_of[src.path] = _relu_name(c.module)


def _wrap_gemms(model: nn.Module, cfg: SimScheme, flow: _Flow, info: SimInfo) -> Set[str]:
    """Swap each conv/linear for its quantized twin with weight and input quantizers."""
    gemm_calls = [c for c in flow.calls if flow.gemm(c) is not None]
    first = next((c for c in gemm_calls if flow.trace.example in c.inputs), gemm_calls[0] if gemm_calls else None)
    last = gemm_calls[-1] if gemm_calls else None
    done: Set[str] = set()
    for c in gemm_calls:
        if c.path in done:
            continue
        done.add(c.path)
        w_bits, a_bits, fp32_reason, pos, o = _layer_bits(cfg, c, first, last)
        q = _quant_twin(c.module, flow.gemm(c))
        q.qcard_bn = flow.bn_of.get(c.path)
        q.qcard_act = flow.act_of.get(c.path)
        if w_bits is not None:
            q.weight_quantizer = make_weight_quantizer(cfg, w_bits, weight_channel_axis(c.module), f"{c.path}.weight")
        in_bits = cfg.input_bits if (c is first and cfg.input_bits is not None and a_bits is not None) else a_bits
        to = match_override(f"{c.path}.input", cfg.overrides)
        if to is not None:
            info.tensor_overrides[f"{c.path}.input"] = to.pattern
            in_bits = None if to.fp32 else (to.a_bits or in_bits)
        if in_bits is not None:
            q.input_quantizer = _input_quantizer(model, cfg, flow, info, c, in_bits)
            if c is first:
                info.input_quantizer = q.input_quantizer
        model.set_submodule(c.path, q)
        li = LayerInfo(name=c.path, op=GEMM_OP[flow.gemm(c)], kind="gemm", module=q,
                       weight_quantizer=q.weight_quantizer, input_quantizers=[q.input_quantizer],
                       fused_act=q.qcard_act, bn=(q.qcard_bn or {}).get("state"), position=pos,
                       fp32_reason=fp32_reason, override=o.pattern if o else None)
        info.layers.append(li)
        if fp32_reason:
            info.unquantized.append({"name": c.path, "op": li.op, "reason": fp32_reason})
    return done


def _layer_bits(cfg: SimScheme, c: ModuleCall, first, last):
    """(weight bits, input bits, FP32 reason, position, override) of one conv/linear."""
    w_bits, a_bits, fp32_reason, pos = cfg.w_bits, cfg.a_bits, None, None
    for side, call, setting in (("first", first, cfg.first_layer), ("last", last, cfg.last_layer)):
        if call is c:
            pos = side if pos is None else "first+last"
            if setting == "8bit":
                w_bits = 8 if w_bits is not None else None
                a_bits = 8
            elif setting == "fp32":
                w_bits = a_bits = None
                fp32_reason = f"{side}_layer: fp32"
    o = match_override(c.path, cfg.overrides)
    if o is not None:
        if o.fp32:
            w_bits = a_bits = None
            fp32_reason = f"override '{o.pattern}': fp32"
        else:
            w_bits = o.w_bits if o.w_bits is not None else w_bits
            a_bits = o.a_bits if o.a_bits is not None else a_bits
    return w_bits, a_bits, fp32_reason, pos, o


def _input_quantizer(model: nn.Module, cfg: SimScheme, flow: _Flow, info: SimInfo, c: ModuleCall,
                     bits: int) -> FakeQuantize:
    """The quantizer of a conv/linear's input; it reads a batch-normed layer's output (through a
    ReLU), its statistics source is that layer (bn_sources, for BN-based range setting)."""
    axis = 1 if "conv" in GEMM_OP[flow.gemm(c)] else -1
    fq = make_act_quantizer(cfg, bits, f"{c.path}.input", axis)
    fq.numel = _per_sample_numel(c.input_shapes[0]) if c.input_shapes else 0
    info.act_quantizers[fq.qname] = fq
    src = flow.source(c)
    if src is not None and isinstance(src.module, RELU_MODULES) and src.inputs:
        src = flow.source(src)
    if src is not None:
        head = flow.bn_source.get(id(src)) or src.path
        if head in flow.bn_of:
            holder = _find_module(model, head)
            if holder is not None and hasattr(holder, "weight"):
                info.bn_sources[fq.qname] = (holder, flow.act_of.get(head))
    return fq


def _find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _fix_bn_sources(info: SimInfo) -> None:
    """Point BN sources at the modules now in the model (a conv may have been swapped for its twin)."""
    for qname, (holder, act) in list(info.bn_sources.items()):
        for li in info.layers:
            if li.module is not None and li.module.weight is holder.weight:
                info.bn_sources[qname] = (li.module, act)
                break


def _eager_pairs(flow: _Flow, info: SimInfo) -> None:
    """Layer pairs for CLE and input producers for analytic bias correction, by tensor identity."""
    by_path = {li.name: li.module for li in info.layers if li.module is not None}
    for c in flow.calls:
        if flow.gemm(c) is None or not c.inputs:
            continue
        src = flow.source(c)
        act = act_path = None
        single = flow.single_use(c.inputs[0])
        if src is not None and isinstance(src.module, RELU_MODULES) and src.inputs:
            act, act_path = _relu_name(src.module), src.path
            single = single and flow.single_use(src.inputs[0])
            src = flow.source(src)
        if src is None:
            continue
        head = flow.bn_source.get(id(src)) or (src.path if flow.gemm(src) is not None else None)
        if head is None or head not in by_path:
            continue
        if info.batch_norm != "kept":
            info.input_producers[c.path] = (by_path[head], act)
        m1, m2 = by_path[head], by_path.get(c.path)
        if single and m2 is not None and m1 is not m2 and pair_supported(m1, m2) and info.batch_norm != "kept":
            info.cle_pairs.append({"name1": head, "name2": c.path, "m1": m1, "m2": m2, "act": act,
                                   "act_node": None, "act_path": act_path})


def _quantize_nonlinear_inputs(model: nn.Module, cfg: SimScheme, flow: _Flow, done: Set[str],
                               info: SimInfo) -> None:
    """Non-linearity modules: quantize their input (their output is quantized where a conv reads it)."""
    for c in flow.calls:
        m = c.module
        op = nonlinear_op(m)
        if op is None or c.path in done:
            continue
        done.add(c.path)
        fq = make_act_quantizer(cfg, cfg.a_bits, f"{c.path}.input", None)
        fq.numel = _per_sample_numel(c.input_shapes[0]) if c.input_shapes else 0
        model.qcard_eager[c.path.replace(".", "_") + "_input"] = fq
        info.act_quantizers[fq.qname] = fq
        m.register_forward_pre_hook(fq.eager_pre_hook)
        info.layers.append(LayerInfo(name=c.path, op=op, kind="nonlinear",
                                     input_quantizers=[fq]))


def _list_functional_ops(trace: OpTrace, info: SimInfo) -> None:
    """Ops that forward code runs outside leaf modules stay FP32 in eager mode: say so, one by one
    (max pools keep the grid and need nothing)."""
    for op in trace.ops:
        if op.in_leaf or op.op == "maxpool":
            continue
        if op.fused == "mha":
            reason = ("nn.MultiheadAttention is not simulated: its weights and internal activations stay FP32")
        elif op.fused == "sdpa":
            reason = ("F.scaled_dot_product_attention in forward code: eager mode runs it as it is (fused, FP32); "
                      "its matmuls' operands and the softmax are not quantized (graph_mode: fx quantizes them)")
        elif op.op == "linear" or op.op.startswith("conv"):
            reason = "functional op with a parameter operand (not an nn.Linear/nn.Conv module): weight stays FP32"
        else:
            reason = "eager mode cannot see functional ops in forward code: runs in FP32, inputs not quantized"
        info.unquantized.append({"name": op.name, "op": op.op, "reason": reason})
        info.has_add = info.has_add or op.op == "add"
        info.has_concat = info.has_concat or op.op == "concat"


def _settings_not_simulated(cfg: SimScheme, info: SimInfo) -> None:
    info.residual_add = "gemm_inputs_only" if info.has_add else "not_present"
    if cfg.residual_add != "gemm_inputs_only" and info.has_add:
        info.warnings.append(f"residual_add: {cfg.residual_add} cannot be simulated in eager mode; residual adds "
                             "read FP32 inputs (gemm_inputs_only)")
    if cfg.quant_point == "before_activation":
        info.warnings.append("quant_point: before_activation cannot be simulated in eager mode; activations are "
                             "quantized where conv/linear layers read them (after the activation)")
