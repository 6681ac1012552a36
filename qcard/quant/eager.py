"""Module-level (eager) quantizer placement, for models torch.fx cannot trace.

What it can do without a graph: quantize the weights of every nn.Conv*/nn.Linear, quantize each
such layer's input (so activations are quantized where a matmul reads them), fold a batch norm that
directly consumes a conv's output (found by tensor identity in one forward pass), and quantize the
inputs of non-linearity modules (GELU, Softmax, LayerNorm, ...). What it cannot do: see functional
ops written in forward code (residual adds, torch.matmul, torch.cat, F.softmax). One forward pass under
a TorchFunctionMode finds those, and each is listed as unquantized with the reason, so the card says
exactly what eager mode left in FP32. Residual adds therefore read FP32 inputs (gemm_inputs_only).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .bn import bn_affine, can_fold, fold_bn
from .graph import _GEMM_OP, _NONLINEAR_MODULES, _gemm_type
from .modules import to_quant_module, weight_channel_axis
from .scheme import SimScheme
from .sim import LayerInfo, SimInfo, make_act_quantizer, make_weight_quantizer, match_override

__all__ = ["build_eager"]

_FUNC_OPS = {"add": "add", "__add__": "add", "__iadd__": "add", "__radd__": "add", "add_": "add",
             "mul": "mul", "__mul__": "mul", "__imul__": "mul", "__rmul__": "mul", "mul_": "mul",
             "cat": "concat", "concat": "concat", "matmul": "matmul", "__matmul__": "matmul", "bmm": "matmul",
             "scaled_dot_product_attention": "attention", "softmax": "softmax", "layer_norm": "layernorm",
             "gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid", "linear": "linear", "conv2d": "conv2d",
             "conv1d": "conv1d", "adaptive_avg_pool2d": "avgpool", "avg_pool2d": "avgpool"}


class _Discover(TorchFunctionMode):
    """One forward pass: module call order with tensor identities, and functional ops per module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.stack: List[Tuple[str, nn.Module, Dict[str, int]]] = []
        self.calls: List[Dict[str, Any]] = []          # leaf module calls in order
        self.functional: List[Tuple[str, str]] = []    # (name, op) of ops outside leaf modules
        self.keep: List[Any] = []                      # keep tensors alive so ids stay unique
        self.leaf = {id(m) for m in model.modules() if next(m.children(), None) is None}
        self.used: Dict[str, int] = {}
        self.params = {id(p) for p in model.parameters()}
        self.func_uses: Dict[int, int] = {}            # tensor id -> reads by functional ops in forward code

    def pre(self, path):
        def hook(module, args):
            self.stack.append((path, module, {}))
            if id(module) in self.leaf:
                ins = [a for a in args if isinstance(a, torch.Tensor)]
                self.keep.extend(ins)
                self.calls.append({"path": path, "module": module, "in": [id(t) for t in ins], "out": None,
                                   "in_numel": [t[0].numel() if t.dim() else 1 for t in ins]})
        return hook

    def post(self, module, args, output):
        if self.stack:
            self.stack.pop()
        if id(module) in self.leaf and self.calls and self.calls[-1]["module"] is module:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor):
                self.keep.append(out)
                self.calls[-1]["out"] = id(out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        op = _FUNC_OPS.get(name)
        inside_leaf = bool(self.stack) and id(self.stack[-1][1]) in self.leaf
        if not inside_leaf and name not in ("size", "dim", "__get__", "shape"):
            flat = list(args) + list(kwargs.values())
            if flat and isinstance(flat[0], (list, tuple)):
                flat = list(flat[0]) + flat[1:]
            for a in flat:
                if isinstance(a, torch.Tensor):
                    self.func_uses[id(a)] = self.func_uses.get(id(a), 0) + 1
        if op is not None and not inside_leaf:
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            if isinstance(args[0] if args else None, (list, tuple)):
                tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
            real = op not in ("add", "mul") or (len(tensors) >= 2 and all(t.numel() > 1 for t in tensors[:2]))
            if real:
                path, _, counts = self.stack[-1] if self.stack else ("", None, {})
                n = counts.get(op, 0)
                counts[op] = n + 1
                base = f"{path}.{op}" if path else op
                base = base if n == 0 else f"{base}_{n}"
                k = self.used.get(base)
                self.used[base] = 0 if k is None else k + 1
                self.functional.append((base if k is None else f"{base}_{k + 1}", op))
        return func(*args, **kwargs)


def _discover(model: nn.Module, example: torch.Tensor) -> _Discover:
    d = _Discover(model)
    handles = []
    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(d.pre(path)))
        handles.append(m.register_forward_hook(d.post))
    try:
        d.keep.append(example)
        with torch.no_grad(), d:
            model(example)
    finally:
        for h in handles:
            h.remove()
    return d


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)


def build_eager(model: nn.Module, cfg: SimScheme, example: torch.Tensor, reason: str, log=print) -> nn.Module:
    info = SimInfo(config=cfg, graph_mode="eager", graph_mode_reason=reason)
    d = _discover(model, example)
    producer: Dict[int, Dict[str, Any]] = {c["out"]: c for c in d.calls if c["out"] is not None}
    uses: Dict[int, int] = dict(d.func_uses)
    for c in d.calls:
        for t in c["in"]:
            uses[t] = uses.get(t, 0) + 1

    # batch norms that read a conv/linear output directly
    has_bn = False
    bn_of: Dict[str, Dict[str, Any]] = {}
    for c in d.calls:
        m = c["module"]
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        has_bn = True
        src = producer.get(c["in"][0]) if c["in"] else None
        why = None
        if src is None or _gemm_type(src["module"]) is None:
            why = "batch norm not directly after a conv/linear: cannot be folded, runs in FP32"
        elif uses.get(c["in"][0], 0) != 1:
            why = "the conv/linear output feeding this batch norm is also used elsewhere: not folded"
        else:
            why = can_fold(src["module"], m)
        if why:
            info.unquantized.append({"name": c["path"], "op": "batchnorm", "reason": why})
            continue
        beta, gamma = bn_affine(m)
        bn_of[src["path"]] = {"beta": beta, "gamma": gamma, "state": cfg.bn, "path": c["path"]}
        c["bn_of"] = src["path"]
        if cfg.bn == "folded":
            fold_bn(src["module"], m)
            _set_module(model, c["path"], nn.Identity())
    info.batch_norm = cfg.bn if has_bn else "none"

    # which activation follows each conv/linear (directly or after its batch norm)
    act_of: Dict[str, str] = {}
    for c in d.calls:
        m = c["module"]
        if not isinstance(m, (nn.ReLU, nn.ReLU6)) or not c["in"]:
            continue
        src = producer.get(c["in"][0])
        if src is not None and "bn_of" in src:
            act_of[src["bn_of"]] = "relu6" if isinstance(m, nn.ReLU6) else "relu"
        elif src is not None and _gemm_type(src["module"]) is not None:
            act_of[src["path"]] = "relu6" if isinstance(m, nn.ReLU6) else "relu"

    gemm_calls = [c for c in d.calls if _gemm_type(c["module"]) is not None]
    example_id = id(example)
    first = next((c for c in gemm_calls if example_id in c["in"]), gemm_calls[0] if gemm_calls else None)
    last = gemm_calls[-1] if gemm_calls else None
    model.qcard_eager = nn.ModuleDict()
    done = set()
    for c in gemm_calls:
        path = c["path"]
        if path in done:
            continue
        done.add(path)
        m = c["module"]
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
        o = match_override(path, cfg.overrides)
        if o is not None:
            if o.fp32:
                w_bits = a_bits = None
                fp32_reason = f"override '{o.pattern}': fp32"
            else:
                w_bits = o.w_bits if o.w_bits is not None else w_bits
                a_bits = o.a_bits if o.a_bits is not None else a_bits
        q = to_quant_module(m)
        q.qcard_bn = bn_of.get(path)
        q.qcard_act = act_of.get(path)
        if w_bits is not None:
            q.weight_quantizer = make_weight_quantizer(cfg, w_bits, weight_channel_axis(m), f"{path}.weight")
        in_bits = a_bits
        if c is first and cfg.input_bits is not None and a_bits is not None:
            in_bits = cfg.input_bits
        to = match_override(f"{path}.input", cfg.overrides)
        if to is not None:
            info.tensor_overrides[f"{path}.input"] = to.pattern
            in_bits = None if to.fp32 else (to.a_bits or in_bits)
        if in_bits is not None:
            axis = 1 if "conv" in _GEMM_OP[_gemm_type(m)] else -1
            fq = make_act_quantizer(cfg, in_bits, f"{path}.input", axis)
            fq.numel = c["in_numel"][0] if c["in_numel"] else 0
            q.input_quantizer = fq
            info.act_quantizers[fq.qname] = fq
            src = producer.get(c["in"][0]) if c["in"] else None
            if src is not None and isinstance(src["module"], (nn.ReLU, nn.ReLU6)) and src["in"]:
                src = producer.get(src["in"][0])
            if src is not None:
                head = src.get("bn_of") or src["path"]
                holder = _find_gemm(model, head)
                if holder is not None and hasattr(holder, "weight") and head in bn_of:
                    info.bn_sources[fq.qname] = (holder, act_of.get(head))
            if c is first:
                info.input_quantizer = fq
        _set_module(model, path, q)
        li = LayerInfo(name=path, op=_GEMM_OP[_gemm_type(m)], kind="gemm", module=q,
                       weight_quantizer=q.weight_quantizer, input_quantizers=[q.input_quantizer],
                       fused_act=q.qcard_act, bn=(q.qcard_bn or {}).get("state"), position=pos,
                       fp32_reason=fp32_reason, override=o.pattern if o else None)
        info.layers.append(li)
        if fp32_reason:
            info.unquantized.append({"name": path, "op": li.op, "reason": fp32_reason})
    # bn sources must point at the quantized twins (conv swapped for its twin later in the loop)
    _fix_bn_sources(model, info)

    _eager_pairs(d, producer, uses, bn_of, model, info)

    # non-linearity modules: quantize their input (their output is quantized where a conv reads it)
    if cfg.a_bits is not None and cfg.residual_add == "quant_all":
        for c in d.calls:
            m = c["module"]
            if type(m) in _NONLINEAR_MODULES and c["path"] not in done:
                done.add(c["path"])
                fq = make_act_quantizer(cfg, cfg.a_bits, f"{c['path']}.input", None)
                fq.numel = c["in_numel"][0] if c["in_numel"] else 0
                key = c["path"].replace(".", "_") + "_input"
                model.qcard_eager[key] = fq
                info.act_quantizers[fq.qname] = fq
                m.register_forward_pre_hook(fq.eager_pre_hook)
                info.layers.append(LayerInfo(name=c["path"], op=_NONLINEAR_MODULES[type(m)], kind="nonlinear",
                                             input_quantizers=[fq]))

    for name, op in d.functional:
        if op in ("linear", "conv1d", "conv2d"):
            reason = "functional op with a parameter operand (not an nn.Linear/nn.Conv module): weight stays FP32"
        else:
            reason = "eager mode cannot see functional ops in forward code: runs in FP32, inputs not quantized"
        info.unquantized.append({"name": name, "op": op, "reason": reason})
        if op == "add":
            info.has_add = True
        if op == "concat":
            info.has_concat = True
    info.residual_add = "gemm_inputs_only" if info.has_add else "not_present"
    if cfg.residual_add != "gemm_inputs_only" and info.has_add:
        info.warnings.append(f"residual_add: {cfg.residual_add} cannot be simulated in eager mode; residual adds "
                             "read FP32 inputs (gemm_inputs_only)")
    if cfg.quant_point == "before_activation":
        info.warnings.append("quant_point: before_activation cannot be simulated in eager mode; activations are "
                             "quantized where conv/linear layers read them (after the activation)")
    info.has_avgpool = any(isinstance(c["module"], (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for c in d.calls)
    for msg in info.warnings:
        log(f"qcard: {msg}")
    model.__dict__["qcard_sim"] = info
    return model


def _find_gemm(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _fix_bn_sources(model: nn.Module, info: SimInfo) -> None:
    """Point BN sources at the modules now in the model (a conv may have been swapped for its twin)."""
    for qname, (holder, act) in list(info.bn_sources.items()):
        for li in info.layers:
            if li.module is not None and li.module.weight is holder.weight:
                info.bn_sources[qname] = (li.module, act)
                break


def _eager_pairs(d: _Discover, producer, uses, bn_of, model: nn.Module, info: SimInfo) -> None:
    """Layer pairs for CLE and input producers for analytic bias correction, by tensor identity."""
    from .cle import pair_supported
    by_path = {li.name: li.module for li in info.layers if li.module is not None}
    for c in d.calls:
        if _gemm_type(c["module"]) is None or not c["in"]:
            continue
        src = producer.get(c["in"][0])
        act = None
        single = uses.get(c["in"][0], 0) == 1
        if src is not None and isinstance(src["module"], (nn.ReLU, nn.ReLU6)) and src["in"]:
            act = "relu6" if isinstance(src["module"], nn.ReLU6) else "relu"
            act_path = src["path"]
            single = single and uses.get(src["in"][0], 0) == 1
            src = producer.get(src["in"][0])
        else:
            act_path = None
        if src is None:
            continue
        head = src.get("bn_of") or (src["path"] if _gemm_type(src["module"]) is not None else None)
        if head is None or head not in by_path:
            continue
        if info.batch_norm != "kept":
            info.input_producers[c["path"]] = (by_path[head], act)
        m1, m2 = by_path[head], by_path.get(c["path"])
        if single and m2 is not None and m1 is not m2 and pair_supported(m1, m2) and info.batch_norm != "kept":
            info.cle_pairs.append({"name1": head, "name2": c["path"], "m1": m1, "m2": m2, "act": act,
                                   "act_node": None, "act_path": act_path})
