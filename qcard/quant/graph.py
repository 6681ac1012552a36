"""Place quantizers where integer hardware needs them, on a torch.fx graph (eager fallback: quant/eager.py).

Nodes are classified with the op tables of qcard.ops.kinds and named by the layer-naming rules of
qcard.ops.naming, so records match the cost tracer's. Rules:
  - weights are quantized inside each conv/linear (QConv2d, QLinear, ...), after BN folding;
  - an activation is quantized once, at its producer, after the fused activation (ReLU/ReLU6 are
    absorbed into the quantizer when the grid makes them redundant), and that quantized tensor
    feeds every consumer that needs integer input;
  - which consumers need integer input is the policy: every conv/linear/matmul input always;
    adds, concats, average pools, unsupported non-linearities (GELU, softmax, LayerNorm, ...)
    and the network output under residual_add=quant_all; only conv/linear/matmul inputs under
    gemm_inputs_only; only ReLU outputs feeding conv/linear under relu_only;
  - max-pool and shape ops (flatten, view, permute, getitem, dropout, and stochastic depth /
    DropPath, the identity in eval) keep the grid: no requantization; average pool and concat
    requantize (or share the input grid, per policy);
  - F.scaled_dot_product_attention is written out (q·kᵀ·scale, softmax, ·v; quant/attention.py), so
    both attention matmuls read quantized operands, the softmax output P included, as on an integer
    runtime; a call left fused is recorded as its parts with P in FP32;
  - the network input is quantized to input_bits (8) unless that is null; the forward's optional
    arguments are fixed at their defaults (the simulated model is called with the input alone).
A layer or op that cannot be simulated is listed in SimInfo.unquantized with the reason.
"""
from __future__ import annotations

import copy
import operator
import re
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import QcardError
from ..ops.kinds import (GEMM_OP, AVGPOOL_FUNCS, BINARY_FUNCS, BINARY_METHODS, CAT_FUNCS, FUNCTIONAL_GEMM, MATMUL_FUNCS,
                         MATMUL_METHODS, MAXPOOL_FUNCS, NONLINEAR_FUNCS, NONLINEAR_METHODS, PASS_FUNCS, PASS_METHODS,
                         RELU_FUNCS, RELU_METHODS, identity_in_eval, module_kind)
from ..ops.naming import LayerNamer
from ..ops.opnames import COST_OPS
from .attention import PART_KEY, TOLERANCE_TEXT, sdpa_args, write_out_attention
from .bn import bn_affine, fold_bn, fold_reason
from .cle import pair_supported
from .eager import build_eager
from .modules import SplitMultiheadAttention, split_attention_reason, to_quant_module, weight_channel_axis
from .quantizer import FakeQuantize, fake_quantize
from .scheme import SimScheme
from .sim import LayerInfo, SimInfo, make_act_quantizer, make_weight_quantizer, match_override

__all__ = ["build_simulated", "classify_node"]

# --------------------------------------------------------------------------------------------
# node classification (op tables: qcard.ops.kinds)

def _tm(node: Any):
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _is_float_tensor(node: Any) -> bool:
    tm = _tm(node)
    return tm is not None and hasattr(tm, "dtype") and tm.dtype.is_floating_point


def _numel(node: Any) -> int:
    tm = _tm(node)
    if tm is None or not hasattr(tm, "shape"):
        return 0
    n = 1
    for s in tm.shape:
        n *= int(s)
    return n


def _rank(node: Any) -> int:
    tm = _tm(node)
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else 0


def _real_users(node: fx.Node) -> List[fx.Node]:
    """Users that read the values (shape queries such as x.shape / x.size() / x.ndim do not)."""
    out = []
    for u in node.users:
        if u.op == "call_function" and u.target is getattr:
            continue
        if u.op == "call_method" and u.target in ("size", "dim"):
            continue
        out.append(u)
    return out


def classify_node(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[str, str]:
    """(kind, op) of a graph node. Kinds: input output get_attr gemm bn relu nonlinear add mul concat
    avgpool maxpool matmul attention pass scalar fgemm unsimulated other nontensor."""
    if node.op == "placeholder":
        return "input", "input"
    if node.op == "output":
        return "output", "output"
    if node.op == "get_attr":
        return ("get_attr", "constant") if _is_float_tensor(node) else ("nontensor", "constant")
    if not _is_float_tensor(node) and not isinstance(_tm(node), (tuple, list)):
        return "nontensor", str(node.target)
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op == "call_function":
        return _function_kind(node)
    if node.op == "call_method":
        return _method_kind(node)
    return "other", str(node.target)


def _function_kind(node: fx.Node) -> Tuple[str, str]:
    target = node.target
    if target is F.batch_norm:
        return "bn", "batchnorm"
    if target in RELU_FUNCS:
        return "relu", RELU_FUNCS[target]
    if target is F.hardtanh and _hardtanh_is_relu6(node):
        return "relu", "relu6"
    if target in NONLINEAR_FUNCS:
        return "nonlinear", NONLINEAR_FUNCS[target]
    if target in BINARY_FUNCS:
        return _binary_kind(node, BINARY_FUNCS[target])
    if target in CAT_FUNCS:
        return "concat", CAT_FUNCS[target]
    if target in MATMUL_FUNCS:
        return _matmul_kind(node)
    if target is F.scaled_dot_product_attention:
        return "attention", "attention"
    if target in AVGPOOL_FUNCS:
        return "avgpool", AVGPOOL_FUNCS[target]
    if target in MAXPOOL_FUNCS:
        return "maxpool", "maxpool"
    if target in PASS_FUNCS:
        return "pass", getattr(target, "__name__", str(target))
    if target in FUNCTIONAL_GEMM:
        return "fgemm", FUNCTIONAL_GEMM[target]
    if identity_in_eval(target, node.args, node.kwargs):      # stochastic depth / DropPath in eval
        return "pass", getattr(target, "__name__", str(target))
    if target is torch.clamp or target is torch.clip:
        return _clamp_kind(node)
    if target is F.pad and node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") == "constant" \
            and not (node.kwargs.get("value") or (node.args[3] if len(node.args) > 3 else 0)):
        return "pass", "pad"                 # zero padding keeps the grid (zero is on it)
    if target is F.interpolate and node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") \
            == "nearest":
        return "pass", "upsample_nearest"
    return "other", getattr(target, "__name__", str(target))


def _method_kind(node: fx.Node) -> Tuple[str, str]:
    target = node.target
    if target in RELU_METHODS:
        return "relu", "relu"
    if target in NONLINEAR_METHODS:
        return "nonlinear", NONLINEAR_METHODS[target]
    if target in BINARY_METHODS:
        return _binary_kind(node, BINARY_METHODS[target])
    if target in MATMUL_METHODS:
        return _matmul_kind(node)
    if target == "mean":
        return "avgpool", "mean"
    if target in PASS_METHODS:
        return "pass", target
    if target in ("clamp", "clip", "clamp_"):
        return _clamp_kind(node)
    return "other", str(target)


def _hardtanh_is_relu6(node: fx.Node) -> bool:
    args = list(node.args[1:]) + [node.kwargs.get("min_val"), node.kwargs.get("max_val")]
    vals = [a for a in args if isinstance(a, (int, float))]
    return vals[:2] == [0.0, 6.0] or vals[:2] == [0, 6]


def _clamp_kind(node: fx.Node) -> Tuple[str, str]:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if lo == 0 and hi is None:
        return "relu", "relu"
    if lo == 0 and hi == 6:
        return "relu", "relu6"
    return "other", "clamp"


def _binary_kind(node: fx.Node, op: str) -> Tuple[str, str]:
    a = node.args[0] if node.args else None
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if _is_float_tensor(a) and _is_float_tensor(b) and _numel(a) > 1 and _numel(b) > 1 and op in ("add", "mul", "sub"):
        return ("mul" if op == "mul" else "add"), op
    return "scalar", op


def _matmul_kind(node: fx.Node) -> Tuple[str, str]:
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if any(a.op == "get_attr" for a in args):
        return "fgemm", "matmul"
    return "matmul", "matmul"


# --------------------------------------------------------------------------------------------
# the builder

def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name) or "q"


class _FxBuilder:
    def __init__(self, gm: fx.GraphModule, cfg: SimScheme, leaf_paths: Optional[Set[str]] = None):
        self.gm = gm
        # module paths (in the traced model) with no child modules: the op tracer's leaves
        self.leaf_paths = leaf_paths if leaf_paths is not None else set()
        self.attn_parts: Dict[fx.Node, List[str]] = {}    # fused attention call -> its parts' names
        self.cfg = cfg
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.info = SimInfo(config=cfg, graph_mode="fx", residual_add=cfg.residual_add)
        self.kind: Dict[fx.Node, str] = {}
        self.opname: Dict[fx.Node, str] = {}
        self.rname: Dict[fx.Node, str] = {}
        self.fused: Dict[fx.Node, fx.Node] = {}        # act node -> group head
        self.group_out: Dict[fx.Node, fx.Node] = {}    # head -> node whose output is the group's tensor
        self.layer_w: Dict[fx.Node, Optional[int]] = {}
        self.layer_a: Dict[fx.Node, Optional[int]] = {}
        self.fp32_reason: Dict[fx.Node, str] = {}
        self.override_of: Dict[fx.Node, str] = {}
        self.root_q: Dict[fx.Node, Tuple[fx.Node, FakeQuantize]] = {}
        self.qnodes: Dict[fx.Node, FakeQuantize] = {}
        self.shared_cat_q: Dict[fx.Node, FakeQuantize] = {}
        self.position: Dict[fx.Node, str] = {}
        self.gm.qcard_act = nn.ModuleDict()
        self._qnames: Set[str] = set()

    # -- step 1: classify and name ----------------------------------------------------------
    def classify(self) -> None:
        """Kind and op of every node, and its layer name by the tracer's rules (qcard.ops.naming):
        modules by path, functional ops "<innermost module>.<op>" counted per module, the first cost op
        run inside a leaf module (timm's LayerNorm calling F.layer_norm) by that module's path, and a
        fused attention call left as it is by the names the tracer gives its parts (matmul, softmax,
        matmul_1)."""
        counters: Dict[str, Dict[str, int]] = {}
        cost_ops: Dict[str, int] = {}                 # cost ops named so far per scope (the leaf rule)
        names = LayerNamer()

        def name_op(key: str, path: str, op: str) -> str:
            first = cost_ops.get(key, 0) == 0
            if op in COST_OPS:
                cost_ops[key] = cost_ops.get(key, 0) + 1
            name = names.scoped(counters.setdefault(key, {}), path, op)
            if path and first and op in COST_OPS and path in self.leaf_paths:
                name = path
            return names.unique(name)

        for node in self.graph.nodes:
            kind, op = classify_node(node, self.modules)
            self.kind[node], self.opname[node] = kind, op
            if node.op == "call_module":
                self.rname[node] = names.unique(str(node.target))
            elif node.op in ("call_function", "call_method") and kind not in ("pass", "nontensor"):
                if kind == "scalar":      # x * c: not a layer (the tracer skips it); counted apart
                    op = f"scalar_{op}"
                stack = node.meta.get("nn_module_stack") or {}
                key, path = "", ""
                if stack:
                    key = list(stack.keys())[-1]
                    val = stack[key]
                    path = val[0] if isinstance(val, tuple) else str(val)
                if kind == "attention":
                    self.attn_parts[node] = [name_op(key, path, o) for o in ("matmul", "softmax", "matmul")]
                    self.rname[node] = self.attn_parts[node][-1]
                else:
                    self.rname[node] = name_op(key, path, op)
            else:
                self.rname[node] = node.name

    # -- step 2: batch norm --------------------------------------------------------------------
    def handle_bn(self) -> None:
        has_bn = False
        for node in list(self.graph.nodes):
            if self.kind.get(node) != "bn":
                continue
            has_bn = True
            bn, why = self._bn_module(node)
            src = node.args[0] if node.args else None
            gemm = isinstance(src, fx.Node) and self.kind.get(src) == "gemm"
            reason = why or fold_reason(self.modules[src.target] if gemm else None, bn,
                                        gemm and len(_real_users(src)) == 1)
            if reason is not None:
                self.info.unquantized.append({"name": self.rname[node], "op": "batchnorm", "reason": reason})
                continue
            layer = self.modules[src.target]
            beta, gamma = bn_affine(bn)
            if self.cfg.bn == "folded":
                fold_bn(layer, bn)
                node.replace_all_uses_with(src)
                inputs = list(node.all_input_nodes)
                self.graph.erase_node(node)
                for a in inputs:             # functional batch norm: its get_attr inputs go too
                    if a.op == "get_attr" and not a.users:
                        self.graph.erase_node(a)
                layer.__dict__["_qcard_bn_pending"] = {"beta": beta, "gamma": gamma, "state": "folded",
                                                       "path": str(node.target)}
            else:
                layer.__dict__["_qcard_bn_pending"] = {"beta": beta, "gamma": gamma, "state": "kept",
                                                       "path": str(node.target)}
                self.fused[node] = src          # kept BN is part of its conv's group
        self.info.batch_norm = self.cfg.bn if has_bn else "none"

    def _bn_module(self, node: fx.Node):
        """(batch-norm module, None) for nn.BatchNorm nodes and F.batch_norm calls whose tensors are
        attributes of the model (timm's BatchNormAct2d), else (None, reason)."""
        if node.op == "call_module":
            return self.modules[node.target], None
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, node.args))
        a.update(node.kwargs)
        if a.get("training"):
            return None, "batch norm in training mode (batch statistics): cannot be folded"
        vals = {}
        for k in ("running_mean", "running_var", "weight", "bias"):
            v = a.get(k)
            if isinstance(v, fx.Node):
                if v.op != "get_attr":
                    return None, f"functional batch norm whose {k} is computed: cannot be folded"
                obj = self.gm
                for part in str(v.target).split("."):
                    obj = getattr(obj, part)
                v = obj
            vals[k] = v
        if vals.get("running_mean") is None or vals.get("running_var") is None:
            return None, "batch norm without running statistics: cannot be folded"
        bn = nn.BatchNorm1d(int(vals["running_mean"].numel()), eps=float(a.get("eps", 1e-5)),
                            affine=vals.get("weight") is not None)
        with torch.no_grad():
            bn.running_mean.copy_(vals["running_mean"])
            bn.running_var.copy_(vals["running_var"])
            if vals.get("weight") is not None:
                bn.weight.copy_(vals["weight"])
                bn.bias.copy_(vals["bias"] if vals.get("bias") is not None else torch.zeros_like(vals["weight"]))
        return bn, None

    # -- step 3: conv/linear -> quantized twins ------------------------------------------------
    def wrap_gemms(self) -> None:
        done: Dict[int, nn.Module] = {}
        for node in self.graph.nodes:
            if self.kind[node] != "gemm":
                continue
            m = self.modules[node.target]
            if id(m) not in done:
                q = to_quant_module(m)
                pending = m.__dict__.pop("_qcard_bn_pending", None)
                q.__dict__.pop("_qcard_bn_pending", None)
                q.qcard_bn = pending
                done[id(m)] = q
            q = done[id(m)]
            self.gm.set_submodule(node.target, q)
            self.modules[node.target] = q

    # -- step 4: groups (producer + BN kept + fused activation) -------------------------------
    def find_groups(self) -> None:
        for node in self.graph.nodes:
            k = self.kind[node]
            if k not in ("gemm", "add"):
                continue
            out = node
            if k == "gemm" and len(_real_users(out)) == 1:
                u = _real_users(out)[0]
                if self.kind.get(u) == "bn" and self.fused.get(u) is node:
                    out = u
            act = None
            if len(_real_users(out)) == 1:
                u = _real_users(out)[0]
                if self.kind.get(u) == "relu" and u.args and u.args[0] is out:
                    act = u
            if act is not None:
                self.fused[act] = node
                if self.cfg.quant_point == "after_activation":
                    out = act
            self.group_out[node] = out
            if k == "gemm":
                m = self.modules[node.target]
                m.qcard_act = self.opname[act] if act is not None else None

    # -- step 5: bits per layer ------------------------------------------------------------------
    def _passthrough(self, node: fx.Node) -> bool:
        k = self.kind.get(node)
        if k in ("pass", "maxpool"):
            return True
        return k == "relu" and self.cfg.quant_point == "before_activation"

    def _data_source(self, node: Any) -> Any:
        """Walk back through grid-keeping ops to the node that produced the values."""
        while isinstance(node, fx.Node) and self._passthrough(node) and node.args:
            node = node.args[0]
        return node

    def plan(self) -> None:
        cfg = self.cfg
        gemms = [n for n in self.graph.nodes if self.kind[n] == "gemm"]
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        first = None
        for g in gemms:
            if self._data_source(g.args[0]) in placeholders:
                first = g
                break
        if first is None and gemms:
            first = gemms[0]
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        feeding = self._nodes_reaching(out_node)
        last = None
        for g in gemms:
            if g in feeding:
                last = g
        if first is not None:
            self.position[first] = "first"
        if last is not None:
            self.position[last] = "last" if last is not first else "first+last"

        for node in self.graph.nodes:
            k = self.kind[node]
            if k not in ("gemm", "matmul", "attention", "add", "mul", "concat", "avgpool", "nonlinear"):
                continue
            w = cfg.w_bits if k == "gemm" else None
            a = cfg.a_bits
            pos = self.position.get(node, "")
            for side in ("first", "last"):
                if side in pos:
                    setting = cfg.first_layer if side == "first" else cfg.last_layer
                    if setting == "8bit":
                        w = 8 if w is not None or cfg.w_bits is not None else None
                        a = 8
                    elif setting == "fp32":
                        w, a = None, None
                        self.fp32_reason[node] = f"{side}_layer: fp32"
            o = match_override(self.rname[node], cfg.overrides)
            if o is not None:
                self.override_of[node] = o.pattern
                if o.fp32:
                    w, a = None, None
                    self.fp32_reason[node] = f"override '{o.pattern}': fp32"
                else:
                    if o.w_bits is not None and k == "gemm":
                        w = o.w_bits
                    if o.a_bits is not None:
                        a = o.a_bits
            self.layer_w[node] = w
            self.layer_a[node] = a

    def _nodes_reaching(self, target: fx.Node) -> Set[fx.Node]:
        seen: Set[fx.Node] = set()
        stack = [target]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return seen

    def find_pairs_and_producers(self) -> None:
        acts = {head: a for a, head in self.fused.items() if self.kind.get(a) == "relu"}
        for g1 in self.graph.nodes:
            if self.kind[g1] != "gemm" or self.info.batch_norm == "kept":
                continue
            act = acts.get(g1)
            end = act if act is not None else g1
            if len(_real_users(end)) != 1:
                continue
            g2 = _real_users(end)[0]
            if self.kind.get(g2) != "gemm" or not g2.args or g2.args[0] is not end:
                continue
            m1, m2 = self.modules[g1.target], self.modules[g2.target]
            if m1 is m2 or not pair_supported(m1, m2):
                continue
            self.info.cle_pairs.append({
                "name1": self.rname[g1], "name2": self.rname[g2], "m1": m1, "m2": m2,
                "act": self.opname[act] if act is not None else None,
                # the node's name, not the node: a node drags its whole graph into every deep copy of the info
                "act_node": act.name if act is not None else None,
                "act_path": str(act.target) if act is not None and act.op == "call_module" else None})
        for g in self.graph.nodes:
            if self.kind[g] != "gemm" or not g.args:
                continue
            src = g.args[0]
            while isinstance(src, fx.Node) and self.kind.get(src) == "pass" and src.args:
                src = src.args[0]
            if not isinstance(src, fx.Node):
                continue
            act = None
            if self.kind.get(src) == "relu" and src in self.fused:
                act, src = self.opname[src], self.fused[src]
            if self.kind.get(src) == "gemm" and self.info.batch_norm != "kept":
                self.info.input_producers[self.rname[g]] = (self.modules[src.target], act)

    # -- step 6: which edges want integer input ----------------------------------------------
    def _edge_request(self, user: fx.Node, src: fx.Node) -> Optional[int]:
        k = self.kind.get(user)
        policy = self.cfg.residual_add
        if k == "gemm":
            return self.layer_a.get(user) if user.args and user.args[0] is src else None
        if k == "matmul":
            return self.layer_a.get(user)
        if k == "attention":           # q, k, v (not a mask)
            return self.layer_a.get(user) if src in list(_attention_qkv(user)) else None
        if policy != "quant_all":
            return None
        if k in ("add", "mul", "avgpool"):
            return self.layer_a.get(user)
        if k == "concat":
            return None if self.cfg.concat == "shared_grid" else self.layer_a.get(user)
        if k == "nonlinear":
            return self.layer_a.get(user) if user.args and user.args[0] is src else None
        if k == "output":
            head = self._head_of(src)
            if head is not None and self.kind.get(head) == "gemm":
                return self.layer_a.get(head) if "last" in self.position.get(head, "") else self.cfg.a_bits
            return self.cfg.a_bits
        return None

    def _head_of(self, node: fx.Node) -> Optional[fx.Node]:
        node = self._data_source(node)
        if node in self.fused:
            node = self.fused[node]
            if node in self.fused:
                node = self.fused[node]
        return node if isinstance(node, fx.Node) else None

    def compute_wants(self) -> Dict[fx.Node, Optional[int]]:
        """Bits each node's output must be quantized to for its consumers (None: FP32 is fine).

        A grid-keeping op (max-pool, reshape, ...) passes its consumers' request up to its input only
        when every consumer wants integer input; otherwise it is quantized itself, for the consumers
        that want it, and the others read FP32 (e.g. the skip path under gemm_inputs_only)."""
        want: Dict[fx.Node, Optional[int]] = {}
        self.forwards: Dict[fx.Node, bool] = {}
        for node in reversed(list(self.graph.nodes)):
            reqs, all_want = [], True
            for u in _real_users(node):
                if self._passthrough(u):
                    r = want.get(u) if (u.args and u.args[0] is node and self.forwards.get(u)) else None
                else:
                    r = self._edge_request(u, node)
                if r is not None:
                    reqs.append(r)
                else:
                    all_want = False
            want[node] = max(reqs) if reqs else None
            self.forwards[node] = bool(reqs) and all_want
        # a tuple (unbind, chunk, split) cannot be quantized: an element that forwarded its request to a
        # tuple that does not forward it (q·scale reads q in float, k and v go to matmuls) is quantized
        # itself, else k and v would reach their matmuls in FP32
        for node in self.graph.nodes:
            src = node.args[0] if node.args else None
            if self.forwards.get(node) and self._passthrough(node) and isinstance(src, fx.Node) \
                    and self._passthrough(src) and not self.forwards.get(src) and not _is_float_tensor(src):
                self.forwards[node] = False
        return want

    # -- step 7: insert quantizers --------------------------------------------------------------
    def _new_quantizer(self, display: str, bits: int, ref: fx.Node, range_setting: Optional[str] = None) -> Tuple[str, FakeQuantize]:
        head = self._head_of(ref)
        axis = None
        if self.cfg.a_granularity == "per_channel":
            conv_like = head is not None and self.kind.get(head) == "gemm" and self.opname[head].startswith("conv")
            rank = _rank(ref)
            axis = 1 if (conv_like or rank == 4) and rank >= 2 else (rank - 1 if rank >= 2 else None)
        key = _sanitize(display)
        base, i = key, 1
        while key in self._qnames:
            key = f"{base}_{i}"
            i += 1
        self._qnames.add(key)
        fq = make_act_quantizer(self.cfg, bits, display, axis, range_setting)
        tm = _tm(ref)
        fq.numel = _numel(ref) // max(1, int(tm.shape[0])) if tm is not None and len(tm.shape) else _numel(ref)
        self.gm.qcard_act[key] = fq
        self.info.act_quantizers[display if display not in self.info.act_quantizers else key] = fq
        return f"qcard_act.{key}", fq

    def _insert_after(self, node: fx.Node, target: str, fq: FakeQuantize, arg: Optional[fx.Node] = None) -> fx.Node:
        with self.graph.inserting_after(node):
            qn = self.graph.call_module(target, (arg if arg is not None else node,))
        if "tensor_meta" in node.meta:
            qn.meta["tensor_meta"] = node.meta["tensor_meta"]
        self.kind[qn], self.opname[qn] = "quant", "quant"
        self.qnodes[qn] = fq
        return qn

    def _display_name(self, root: fx.Node) -> str:
        if root.op == "placeholder":
            return "input" if root.name in ("x", "input") else f"input.{root.name}"
        if self._passthrough(root):
            return f"{self.rname.get(root, root.name)}.output"
        head = self._head_of(root)
        if head is not None and head in self.group_out and head in self.rname:
            return f"{self.rname[head]}.output"
        return f"{self.rname.get(root, root.name)}.output"

    def insert_quantizers(self) -> None:
        cfg = self.cfg
        want = self.compute_wants()
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        logits_roots = {self._data_source(a) for a in out_node.all_input_nodes}
        for node in list(self.graph.nodes):
            k = self.kind.get(node)
            if node in self.qnodes or k in ("output", "nontensor") or not _is_float_tensor(node):
                continue
            if self._passthrough(node) and (self.forwards.get(node) or want.get(node) is None):
                continue
            # concat with a shared grid: one quantizer on every input, output already on grid
            if k == "concat" and cfg.residual_add == "quant_all" and cfg.concat == "shared_grid" \
                    and self.layer_a.get(node) is not None:
                self._shared_concat(node)
                continue
            bits = want.get(node)
            if node.op == "placeholder":
                bits = cfg.input_bits if bits is not None else None
            if bits is None:
                continue
            if cfg.residual_add == "relu_only" and node.op != "placeholder" and k != "relu" \
                    and self.kind.get(self._data_source(node)) != "relu":
                continue
            if k == "avgpool" and cfg.avg_pool == "shared_grid":
                src_q = self._edge_quantizer(node.args[0])
                if src_q is not None:
                    qn = self._insert_after(node, self._tied_target(node, src_q), src_q)
                    self._rewire(node, qn, want)
                    self.root_q[node] = (qn, src_q)
                    continue
            rs = None
            if node in logits_roots and cfg.logits_range == "cross_entropy" and not cfg.dynamic_activations:
                rs = "cross_entropy"
            display = self._display_name(node)
            # a tensor named in an override (the network input follows input_bits only)
            o = match_override(display, cfg.overrides) if node.op != "placeholder" else None
            if o is not None:
                self.info.tensor_overrides[display] = o.pattern
                if o.fp32:
                    self.info.unquantized.append({"name": display, "op": "activation",
                                                  "reason": f"override '{o.pattern}': fp32"})
                    continue
                if o.a_bits is not None:
                    bits = o.a_bits
            target, fq = self._new_quantizer(display, bits, node, rs)
            if node.op == "placeholder":
                self.info.input_quantizer = fq
            head = self._head_of(node)
            if head is not None and self.kind.get(head) == "gemm":
                act = self.opname[node] if (self.kind.get(node) == "relu" and node in self.fused) else None
                self.info.bn_sources[fq.qname] = (self.modules[head.target], act)
            qn = self._insert_after(node, target, fq)
            self._rewire(node, qn, want)
            self.root_q[node] = (qn, fq)

    def _tied_target(self, node: fx.Node, src_q: FakeQuantize) -> str:
        # the same quantizer module called a second time: same scale and zero point, but it must
        # not observe the pooled values, so it is wrapped
        key = _sanitize(f"{self.rname.get(node, node.name)}.tied")
        self.gm.qcard_act[key] = _Tied(src_q)
        return f"qcard_act.{key}"

    def _rewire(self, node: fx.Node, qn: fx.Node, want) -> None:
        for u in list(node.users):
            if u is qn:
                continue
            wants = (bool(self.forwards.get(u)) and u.args and u.args[0] is node) if self._passthrough(u) \
                else self._edge_request(u, node) is not None
            if wants:
                u.replace_input_with(node, qn)

    def _shared_concat(self, node: fx.Node) -> None:
        bits = self.layer_a[node]
        target, fq = self._new_quantizer(f"{self.rname[node]}.shared_input", bits, node)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        new_list = []
        for t in tensors:
            if isinstance(t, fx.Node) and _is_float_tensor(t):
                with self.graph.inserting_before(node):
                    qn = self.graph.call_module(target, (t,))
                qn.meta["tensor_meta"] = t.meta.get("tensor_meta")
                self.kind[qn], self.opname[qn] = "quant", "quant"
                self.qnodes[qn] = fq
                new_list.append(qn)
            else:
                new_list.append(t)
        node.args = (type(tensors)(new_list),) + tuple(node.args[1:]) if node.args else node.args
        if not node.args:
            node.kwargs = dict(node.kwargs, tensors=type(tensors)(new_list))
        self.shared_cat_q[node] = fq
        # the output is on the shared grid: consumers read it as it is
        self.root_q[node] = (node, fq)

    def _edge_quantizer(self, node: Any) -> Optional[FakeQuantize]:
        """The quantizer whose grid a value is on when it reaches a consumer (None: FP32)."""
        while isinstance(node, fx.Node):
            if node in self.qnodes:
                return self.qnodes[node]
            if node in self.shared_cat_q:
                return self.shared_cat_q[node]
            if node.op == "call_module" and str(node.target).startswith("qcard_act."):
                m = self.gm.get_submodule(str(node.target))
                return m.source if isinstance(m, _Tied) else m
            if self._passthrough(node) and node.args:
                node = node.args[0]
                continue
            return None
        return None

    # -- step 8: let quantizers absorb the ReLU they follow -----------------------------------
    def absorb_activations(self) -> None:
        self.absorbed: Dict[fx.Node, FakeQuantize] = {}
        for qn, fq in list(self.qnodes.items()):
            src = qn.args[0]
            if not isinstance(src, fx.Node) or self.kind.get(src) != "relu" or len(src.users) != 1:
                continue      # (shape queries of the ReLU output would lose their input: keep it)
            if src.op == "call_function" and src.target is F.hardtanh:
                continue
            if not src.args or not isinstance(src.args[0], fx.Node):
                continue
            fq.pre_act = self.opname[src]
            self.absorbed[src] = fq
            qn.args = (src.args[0],) + tuple(qn.args[1:])
            self.graph.erase_node(src)
        # ops that return a new tensor (not a view or their input): the quantizer may overwrite it
        fresh = {"gemm", "add", "mul", "matmul", "attention", "concat", "nonlinear", "bn"}
        for qn, fq in self.qnodes.items():
            src = qn.args[0]
            if not isinstance(src, fx.Node) or len(src.users) != 1 or src.op in ("placeholder", "get_attr"):
                continue
            if src.op == "call_function" and src.target in (operator.iadd, operator.isub, operator.imul):
                continue
            if src.op == "call_method" and str(src.target).endswith("_"):
                continue
            if src.kwargs.get("inplace") or (src.op == "call_module" and
                                             getattr(self.gm.get_submodule(str(src.target)), "inplace", False)):
                continue
            if self.kind.get(src) in fresh:
                fq.inplace = True
            # a conv/linear read only by this quantizer folds 1/s into its weights at inference
            if self.kind.get(src) == "gemm" and src.op == "call_module" and fq.spec.granularity == "per_tensor" \
                    and not fq.dynamic:
                m = self.gm.get_submodule(str(src.target))
                if "out_prescale" not in m.__dict__ and not isinstance(m, nn.modules.conv._ConvTransposeNd) \
                        and sum(1 for n in self.graph.nodes if n.op == "call_module" and n.target == src.target) == 1:
                    m.__dict__["out_prescale"] = fq
                    fq.prescaled_input = True

    # -- step 9: describe --------------------------------------------------------------------------
    def describe(self) -> None:
        info = self.info
        kinds_listed = ("gemm", "matmul", "attention", "add", "mul", "concat", "avgpool", "maxpool", "nonlinear")
        for node in self.graph.nodes:
            k = self.kind.get(node)
            if k is None or node in self.qnodes:
                continue
            name = self.rname.get(node, node.name)
            if k == "add":
                info.has_add = True
            if k == "concat":
                info.has_concat = True
            if k == "avgpool":
                info.has_avgpool = True
            if k == "attention":
                self._describe_fused_attention(node)
            elif k in kinds_listed:
                li = LayerInfo(name=name, op=self.opname[node], kind=k)
                if k == "gemm":
                    m = self.gm.get_submodule(str(node.target))
                    li.module = m
                    li.weight_quantizer = m.weight_quantizer
                    li.input_quantizers = [self._edge_quantizer(node.args[0])]
                    li.fused_act = m.qcard_act
                    li.bn = (m.qcard_bn or {}).get("state")
                else:
                    ins = [a for a in _flat_args(node.args) if isinstance(a, fx.Node) and _is_float_tensor(a)]
                    if k == "nonlinear":
                        ins = ins[:1]
                    li.input_quantizers = [self._edge_quantizer(a) for a in ins]
                out = self.group_out.get(node, node)
                rq = self.root_q.get(out) or self.root_q.get(node)
                li.output_quantizer = rq[1] if rq is not None else self._absorbed_output(node)
                if k == "maxpool":
                    li.output_quantizer = li.input_quantizers[0] if li.input_quantizers else None
                li.position = self.position.get(node)
                li.fp32_reason = self.fp32_reason.get(node)
                li.override = self.override_of.get(node)
                if node.meta.get(PART_KEY) in ("scores", "context"):
                    li.note = ("F.scaled_dot_product_attention written out (q·kᵀ·scale, softmax, ·v), equal to the "
                               f"fused kernel on the example ({TOLERANCE_TEXT})")
                info.layers.append(li)
            elif k == "unsimulated":
                info.unquantized.append({"name": name, "op": self.opname[node],
                                         "reason": f"nn.{self.opname[node]} is not simulated: its weights and "
                                                   "internal activations stay FP32"})
            elif k == "fgemm":
                info.unquantized.append({"name": name, "op": self.opname[node],
                                         "reason": "functional op with a parameter operand (not an nn.Linear/"
                                                   "nn.Conv module): its weight stays FP32"})
            elif k == "other":
                info.unquantized.append({"name": name, "op": self.opname[node],
                                         "reason": f"no integer simulation for '{self.opname[node]}': it runs in "
                                                   "FP32 and is requantized where a quantized layer reads it"})
        for li in info.layers:
            if li.kind == "gemm" and li.fp32_reason:
                info.unquantized.append({"name": li.name, "op": li.op, "reason": li.fp32_reason})
        if info.has_add is False:
            info.residual_add = "not_present"

    def _describe_fused_attention(self, node: fx.Node) -> None:
        """A fused F.scaled_dot_product_attention call left as it is (quant/attention.py says why): its
        parts as the tracer records them. q·kᵀ reads q and k as they arrive; the softmax runs in FP32
        inside the kernel, so P·v's first operand, P, is FP32 whatever v is."""
        scores, softmax, context = self.attn_parts[node]
        q, k, v = (self._edge_quantizer(a) for a in _attention_qkv(node))
        rq = self.root_q.get(node)
        fused = "inside the fused scaled_dot_product_attention kernel"
        self.info.layers.append(LayerInfo(name=scores, op="matmul", kind="matmul", input_quantizers=[q, k],
                                          override=self.override_of.get(node), note=f"q·kᵀ {fused}"))
        self.info.unquantized.append({"name": softmax, "op": "softmax", "reason": f"softmax {fused} runs in FP32"})
        self.info.layers.append(LayerInfo(
            name=context, op="matmul", kind="matmul", input_quantizers=[None, v],
            output_quantizer=rq[1] if rq is not None else self._absorbed_output(node),
            override=self.override_of.get(node), note=f"P·v {fused}: P, the softmax output, is FP32"))

    def _absorbed_output(self, node: fx.Node) -> Optional[FakeQuantize]:
        for u in node.users:
            if u in self.qnodes:
                return self.qnodes[u]
        return None

    def build(self) -> nn.Module:
        self.classify()
        self.handle_bn()
        self.wrap_gemms()
        self.find_groups()
        self.plan()
        self.find_pairs_and_producers()
        self.make_weight_quantizers()
        self.insert_quantizers()
        self.absorb_activations()
        absorbed = {node.name: fq for node, fq in self.absorbed.items()}
        for p in self.info.cle_pairs:
            p["act_fq"] = absorbed.get(p.get("act_node"))
        self.describe()
        self.graph.lint()
        self.gm.delete_all_unused_submodules()     # folded batch norms, absorbed ReLUs
        self.gm.recompile()
        self.gm.__dict__["qcard_sim"] = self.info
        return self.gm

    def make_weight_quantizers(self) -> None:
        done: Set[int] = set()
        for node in self.graph.nodes:
            if self.kind[node] != "gemm":
                continue
            m = self.modules[node.target]
            if id(m) in done:
                continue
            done.add(id(m))
            bits = self.layer_w.get(node)
            if bits is None:
                m.weight_quantizer = None
                continue
            m.weight_quantizer = make_weight_quantizer(self.cfg, bits, weight_channel_axis(m),
                                                       f"{self.rname[node]}.weight")


class _Tied(nn.Module):
    """Applies another quantizer's grid without observing (average pool on its input's grid)."""

    def __init__(self, source: FakeQuantize):
        super().__init__()
        self.__dict__["source"] = source      # not a submodule: the source is owned elsewhere

    def forward(self, x):
        s = self.source
        if s.observing or not s.enabled:
            return x
        if s.dynamic:
            return s._dynamic(x)
        return fake_quantize(x, s.scale, s.zero_point, s.qmin, s.qmax, s.axis)


def _attention_qkv(node: fx.Node) -> List[Any]:
    """query, key and value of an F.scaled_dot_product_attention node."""
    a = sdpa_args(node)
    return [a.get("query"), a.get("key"), a.get("value")]


def _flat_args(args) -> List[Any]:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat_args(a))
        else:
            out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# entry point

def _leaves(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    return []


def _gemm_subclass_base(m: nn.Module) -> Optional[type]:
    """The conv/linear class m subclasses without being it (timm's Linear, ...), else None."""
    for base in GEMM_OP:
        if isinstance(m, base) and type(m) is not base and not hasattr(type(m), "quantized_weight"):
            return base
    return None


@torch.no_grad()
def _make_traceable(model: nn.Module, example: torch.Tensor) -> Tuple[Dict[str, nn.Module], List[str]]:
    """Rewrite, in place, the modules fx would otherwise leave in FP32, when they compute the same thing:
      - nn.MultiheadAttention -> SplitMultiheadAttention (linear projections + matmuls + softmax);
      - a subclass of nn.Linear/nn.Conv (timm's Linear calls F.linear itself, which fx sees as a
        functional op on a parameter) -> the plain class, sharing its parameters, when the plain
        class's forward gives the same output on the example.
    One forward pass on the example finds the calls; the rewritten model's output must equal the
    original's to float tolerance, or nothing is rewritten. Returns ({rewritten path: its original
    module}, warnings: the attention modules kept as they are, why, and how to swap them by hand)."""
    cands = {n: m for n, m in model.named_modules() if n and (isinstance(m, nn.MultiheadAttention)
                                                             or _gemm_subclass_base(m) is not None)}
    if not cands:
        return {}, []
    calls: Dict[str, List[Any]] = {n: [] for n in cands}
    hooks = [m.register_forward_hook(lambda mod, a, kw, out, n=n: calls[n].append((a, kw, out)), with_kwargs=True)
             for n, m in cands.items()]
    try:
        ref = _leaves(model(example))
    finally:
        for h in hooks:
            h.remove()
    swaps, kept = {}, []
    for name, m in cands.items():
        if not calls[name]:
            continue
        if isinstance(m, nn.MultiheadAttention):
            why = next((r for r in (split_attention_reason(m, a, kw) for a, kw, _ in calls[name]) if r), None)
            if why is None:
                swaps[name] = SplitMultiheadAttention(m).train(m.training)
            else:
                kept.append(f"nn.MultiheadAttention '{name}' stays FP32 (its projections and attention matmuls): "
                            f"{why}; to quantize it, replace it with nn.Linear projections + torch.matmul + "
                            "softmax (qcard.quant.modules.SplitMultiheadAttention does this for the unmasked case)")
            continue
        base = _gemm_subclass_base(m)
        plain = base.__new__(base)
        plain.__dict__.update(m.__dict__)
        if all(torch.equal(base.forward(plain, *a, **kw), out) for a, kw, out in calls[name]
               if isinstance(out, torch.Tensor)):
            swaps[name] = plain
    if not swaps:
        return {}, kept
    originals = {n: model.get_submodule(n) for n in swaps}
    for n, new in swaps.items():
        model.set_submodule(n, new)
    try:
        out = _leaves(model(example))
    except Exception:  # noqa: BLE001 - a rewrite that does not run is undone like one that differs
        out = []
    if len(out) != len(ref) or not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (
            1.0 + float(b.abs().max()) if b.numel() else 1.0)) for a, b in zip(out, ref)):
        for n, m in originals.items():
            model.set_submodule(n, m)
        return {}, kept + [f"rewriting {', '.join(sorted(swaps))} for quantization changed the outputs: "
                           "left as they are"]
    return originals, kept


def _defaults(model: nn.Module) -> Dict[str, Any]:
    """The forward's optional arguments after the input, at their defaults: the simulated model is only
    ever called with the input, so they are constants. Traced as inputs, a mask that is None would reach
    F.scaled_dot_product_attention as a graph input (and `is_causal` as a tensor in ONNX export)."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def _drop_specialised_inputs(gm: fx.GraphModule) -> None:
    """Remove the inputs fx kept for the specialised arguments, with the checks it wrote on them (only
    those read them): the simulated model's forward takes the input alone (ONNX export traces it so)."""
    graph = gm.graph
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        reached, stack = set(), [ph]
        while stack:
            for u in stack.pop().users:
                if u not in reached:
                    reached.add(u)
                    stack.append(u)
        if any(u.op == "output" or _is_float_tensor(u) for u in reached):
            continue
        for n in reversed(list(graph.nodes)):
            if n in reached:
                graph.erase_node(n)
        graph.erase_node(ph)
    gm.recompile()


def build_simulated(model: nn.Module, cfg: SimScheme, example_input: torch.Tensor, log=print) -> nn.Module:
    """A simulated copy of `model` (the original is not changed), with quantizers placed but not yet
    calibrated. The result carries `qcard_sim` (SimInfo). Tries torch.fx first; if the model does not
    trace (or cfg.graph_mode is 'eager'), falls back to module-level (eager) placement and records why."""
    model = copy.deepcopy(model).eval()
    if cfg.graph_mode not in ("auto", "fx", "eager"):
        raise QcardError(f"graph_mode must be auto, fx or eager, not '{cfg.graph_mode}'")
    if cfg.graph_mode == "eager":
        return build_eager(model, cfg, example_input, "graph_mode: eager was requested", log)
    try:
        originals, kept = _make_traceable(model, example_input)
    except Exception:  # noqa: BLE001 - a model that does not run on the example fails below, with the reason
        originals, kept = {}, []
    try:
        gm = fx.symbolic_trace(model, concrete_args=_defaults(model) or None)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        _drop_specialised_inputs(gm)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"torch.fx could not trace the model ({type(exc).__name__}: {msg[:200]})"
        if cfg.graph_mode == "fx":
            raise QcardError(f"graph_mode: fx was requested but {reason}; use graph_mode: auto or eager") from exc
        for path, m in originals.items():       # the eager builder works on the modules as they were
            model.set_submodule(path, m)
        log(f"qcard: {reason}; falling back to eager (module-level) quantizer placement")
        return build_eager(model, cfg, example_input, reason, log)
    _, fused = write_out_attention(gm, example_input)      # q·kᵀ, softmax, ·v: P quantized like any operand
    leaves = {n for n, m in model.named_modules() if n and next(m.children(), None) is None}
    sim = _FxBuilder(gm, cfg, leaves).build()
    sim.__dict__["qcard_sim"].warnings.extend(kept + fused)
    return sim
