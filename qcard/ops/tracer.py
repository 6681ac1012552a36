"""The op tracer: one forward pass that discovers the ops of a model on an example input.

How it works: forward pre/post hooks keep a stack of the modules being executed (and record each
module call with its input/output tensors), and a TorchFunctionMode sees every torch function call
(F.conv2d, F.linear, `a + b`, torch.cat, `q @ k`, F.scaled_dot_product_attention, ...). That catches
functional ops that module hooks miss (residual adds, attention matmuls) without torch.fx, so it works
on models fx cannot trace, and it costs one ordinary forward pass. Torch calls made inside another
torch function (F.multi_head_attention_forward's own linear, ...) are not seen: the mode is off while
a function it caught runs.

Each op gets its layer name (qcard.ops.naming), its kind (qcard.ops.kinds), the module running it and
the identity (id) and shape of the tensors it reads and writes. Every tensor seen is kept alive until
the pass ends, so ids are unique within one trace (data_flow=False skips that, for shapes-only
traces). nn.MultiheadAttention runs as one F.multi_head_attention_forward call; it is expanded into
its input projection, the two attention matmuls, the softmax and the output projection (Op.part,
Op.fused "mha"). F.scaled_dot_product_attention is expanded the same way into q·kᵀ, the softmax and
P·v (Op.fused "sdpa"): the ops an integer runtime runs, and the ops the fx builder writes in its place
(qcard.quant.attention), under the same names ("<module>.matmul", ".softmax", ".matmul_1").

Users: qcard.cost.trace (shape records for the cost model), qcard.quant.eager (quantizer placement
without a graph), qcard.quant.bn (which batch norms fold into which conv/linear), and methods that
need the module call order (MARViN) or the layer names (SPARQ).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .kinds import MAXPOOL_FUNC_IDS
from .naming import LayerNamer, weight_owner
from .opnames import COST_OPS, FUNC_NAME_OPS, SHAPE_QUERIES

__all__ = ["Op", "ModuleCall", "OpTrace", "trace_ops", "bind_args", "CONV_ARGS", "CONVT_ARGS", "MHA_PARTS",
           "SDPA_ARGS", "SDPA_PARTS"]

CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
LINEAR_ARGS = ("input", "weight", "bias")
# nn.MultiheadAttention's expansion: (part, op)
MHA_PARTS = (("in_proj", "linear"), ("scores", "matmul"), ("softmax", "softmax"), ("context", "matmul"),
             ("out_proj", "linear"))
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# F.scaled_dot_product_attention's expansion: (part, op)
SDPA_PARTS = (("scores", "matmul"), ("softmax", "softmax"), ("context", "matmul"))

Shape = Tuple[int, ...]


def _shape(t: Any) -> Shape:
    return tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else ()


def bind_args(names: Sequence[str], args: tuple, kwargs: dict) -> Dict[str, Any]:
    """A function call's arguments by parameter name (positional names given in order)."""
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


@dataclass
class Op:
    name: str                           # the card's layer name (qcard.ops.naming)
    op: str                             # conv2d | linear | matmul | attention | add | mul | concat | avgpool | ...
    path: str                           # the innermost module running it ("" at the top level)
    module: Optional[nn.Module]
    in_leaf: bool                       # run inside a leaf module's forward (F.conv2d inside nn.Conv2d)
    inputs: Tuple[int, ...] = ()        # ids of the tensors it reads (activations; not the weight)
    input_shapes: Tuple[Shape, ...] = ()
    output: Optional[int] = None
    output_shape: Shape = ()
    weight: Optional[str] = None        # the weight operand's parameter name, if it is a parameter
    part: Optional[str] = None          # in_proj | scores | softmax | context | out_proj (fused attention)
    fused: Optional[str] = None         # the fused call a part belongs to: "mha" | "sdpa"

    @property
    def cost_op(self) -> bool:
        """One of the ops the cost model records (non-linearities such as F.gelu are not)."""
        return self.op in COST_OPS


@dataclass
class ModuleCall:
    path: str
    module: nn.Module
    leaf: bool                          # no child modules
    inputs: Tuple[int, ...] = ()        # ids of its tensor arguments
    input_versions: Tuple[int, ...] = ()   # their _version then (in-place changes bump it)
    input_shapes: Tuple[Shape, ...] = ()
    output: Optional[int] = None        # id of its output (the first element of a tuple output)
    output_version: Optional[int] = None


@dataclass
class OpTrace:
    ops: List[Op] = field(default_factory=list)
    calls: List[ModuleCall] = field(default_factory=list)    # every module call, in call order
    # reads of each tensor by leaf-module calls and by torch functions run outside leaf modules
    uses: Dict[int, int] = field(default_factory=dict)
    example: Optional[int] = None                             # id of the example input

    def leaf_calls(self) -> List[ModuleCall]:
        return [c for c in self.calls if c.leaf]

    def producers(self) -> Dict[int, ModuleCall]:
        """The leaf-module call that returned each tensor (the last one, for in-place modules)."""
        return {c.output: c for c in self.calls if c.leaf and c.output is not None}


OnOp = Callable[[Op, Any, tuple, dict, Any], None]


class _Discard(list):
    """A keep-alive list that keeps nothing (shapes-only traces: memory as in a plain forward pass)."""

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _Frame:
    __slots__ = ("path", "module", "leaf", "counts", "extra_counts", "call")

    def __init__(self, path: str, module: nn.Module, leaf: bool, call: ModuleCall):
        self.path, self.module, self.leaf, self.call = path, module, leaf, call
        self.counts: Dict[str, int] = {}          # ops the cost model records
        self.extra_counts: Dict[str, int] = {}    # other ops (F.gelu, ...): counted apart, names stay stable


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module, on_op: Optional[OnOp], keep_alive: bool):
        super().__init__()
        self.trace = OpTrace()
        self.on_op = on_op
        self.stack: List[_Frame] = []
        # every tensor seen, alive until the end, so that ids stay unique (data_flow=True)
        self.keep: List[Any] = [] if keep_alive else _Discard()
        self.names = LayerNamer()
        self.extra_names = LayerNamer()
        self.param_names: Dict[int, str] = {}
        for name, p in model.named_parameters():
            self.param_names.setdefault(id(p), name)
        self.leaf = {id(m) for m in model.modules() if next(m.children(), None) is None}

    # -- module calls -----------------------------------------------------------------------------
    def pre_hook(self, path: str):
        def hook(module, args):
            leaf = id(module) in self.leaf
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            self.keep.extend(ins)
            call = ModuleCall(path=path, module=module, leaf=leaf, inputs=tuple(id(t) for t in ins),
                              input_versions=tuple(t._version for t in ins),
                              input_shapes=tuple(_shape(t) for t in ins))
            self.trace.calls.append(call)
            if leaf:
                for t in ins:
                    self._use(t)
            self.stack.append(_Frame(path, module, leaf, call))
        return hook

    def post_hook(self, module, args, output):
        if not self.stack:
            return
        frame = self.stack.pop()
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
            frame.call.output, frame.call.output_version = id(out), out._version

    def _use(self, t: torch.Tensor) -> None:
        self.trace.uses[id(t)] = self.trace.uses.get(id(t), 0) + 1

    # -- functions ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        kind = "maxpool" if id(func) in MAXPOOL_FUNC_IDS else FUNC_NAME_OPS.get(fname)
        frame = self.stack[-1] if self.stack else None
        if not (frame is not None and frame.leaf) and fname not in SHAPE_QUERIES:
            flat = list(args) + list(kwargs.values())
            if flat and isinstance(flat[0], (list, tuple)):
                flat = list(flat[0]) + flat[1:]
            for a in flat:
                if isinstance(a, torch.Tensor):
                    self.keep.append(a)
                    self._use(a)
        if kind == "mha":
            self._mha(func, args, kwargs)
        out = func(*args, **kwargs)      # the mode is off inside: nested calls are not re-recorded
        if kind is not None and kind != "mha":
            self._record(func, fname, kind, args, kwargs, out)
        return out

    # -- ops ------------------------------------------------------------------------------------------
    def _param(self, t: Any) -> Optional[str]:
        return self.param_names.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _new_op(self, kind: str, inputs: Sequence[Any], out: Any, weight: Any = None, *,
                named_weight: bool = True, part: Optional[str] = None, fused: Optional[str] = None) -> Op:
        """Name an op (naming rules: qcard.ops.naming) and describe it. weight: its weight operand;
        named_weight=False: a weight that names the op only when it is a parameter."""
        frame = self.stack[-1] if self.stack else None
        path = frame.path if frame else ""
        pname = self._param(weight)
        if kind in COST_OPS:
            counts, namer = (frame.counts if frame else {}), self.names
        else:
            counts, namer = (frame.extra_counts if frame else {}), self.extra_names
        name = namer.op_name(counts, path, kind, owner=weight_owner(pname) if pname is not None else None,
                             computed_weight=named_weight and weight is not None,
                             in_leaf=frame is not None and frame.leaf)
        if isinstance(out, (tuple, list)):     # max_pool with indices returns (values, indices)
            out = out[0] if out else None
        ins = [t for t in inputs if isinstance(t, torch.Tensor)]
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
        op = Op(name=name, op=kind, path=path, module=frame.module if frame else None,
                in_leaf=frame is not None and frame.leaf, inputs=tuple(id(t) for t in ins),
                input_shapes=tuple(_shape(t) for t in ins),
                output=id(out) if isinstance(out, torch.Tensor) else None, output_shape=_shape(out),
                weight=pname, part=part, fused=fused)
        self.trace.ops.append(op)
        return op

    def _emit(self, op: Op, func, args, kwargs, out) -> None:
        if self.on_op is not None:
            self.on_op(op, func, args, kwargs, out)

    def _record(self, func, fname: str, kind: str, args: tuple, kwargs: dict, out: Any) -> None:
        if kind.startswith("conv") or kind == "linear":
            names = LINEAR_ARGS if kind == "linear" else (CONVT_ARGS if "transpose" in kind else CONV_ARGS)
            a = bind_args(names, args, kwargs)
            op = self._new_op(kind, [a["input"]], out, a["weight"])
        elif kind == "matmul":
            if fname in ("baddbmm", "addmm"):       # (bias, a, b)
                x, y = args[1], args[2]
            elif fname == "__rmatmul__":
                y, x = args[0], args[1]
            else:
                x, y = args[0], args[1]
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return
            weight = y if self._param(y) is not None else (x if self._param(x) is not None else None)
            op = self._new_op(kind, [x, y], out, weight)
        elif kind == "attention":
            self._sdpa(func, args, kwargs, out)
            return
        elif kind in ("add", "mul"):
            tensors = [t for t in args[:2] if isinstance(t, torch.Tensor)]
            # x + 1 or x * scale are not data-moving layers; only tensor-tensor ops are recorded
            if not (len(tensors) == 2 and all(t.numel() > 1 for t in tensors)):
                return
            op = self._new_op(kind, tensors, out)
        elif kind == "concat":
            seq = args[0] if args else kwargs.get("tensors", ())
            op = self._new_op(kind, list(seq), out)
        else:   # pools, layernorm, softmax, non-linearities
            x = args[0] if args else next(iter(kwargs.values()), None)
            op = self._new_op(kind, [x], out)
        self._emit(op, func, args, kwargs, out)

    def _mha(self, func, args: tuple, kwargs: dict) -> None:
        a = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs).arguments
        w_in = a["q_proj_weight"] if a.get("use_separate_proj_weight") else a["in_proj_weight"]
        for part, kind in MHA_PARTS:
            if part == "in_proj":
                op = self._new_op(kind, [a["query"], a["key"], a["value"]], None, w_in, named_weight=False,
                                  part=part, fused="mha")
            elif part == "out_proj":
                op = self._new_op(kind, [], None, a["out_proj_weight"], named_weight=False, part=part, fused="mha")
            else:
                op = self._new_op(kind, [], None, part=part, fused="mha")
            self._emit(op, func, args, kwargs, None)

    def _sdpa(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """q·kᵀ (reads q and k), the softmax, P·v (reads v, returns the call's output)."""
        a = bind_args(SDPA_ARGS, args, kwargs)
        for part, kind in SDPA_PARTS:
            ins = {"scores": [a["query"], a["key"]], "softmax": [], "context": [a["value"]]}[part]
            op = self._new_op(kind, ins, out if part == "context" else None, part=part, fused="sdpa")
            self._emit(op, func, args, kwargs, out)


def trace_ops(model: nn.Module, example: torch.Tensor, on_op: Optional[OnOp] = None, *,
              data_flow: bool = True) -> OpTrace:
    """Run model(example) once (eval mode, no grad; the train/eval mode is restored) and return its ops
    and module calls in execution order. on_op(op, func, args, kwargs, out) is called for each op
    while its tensors are alive (the cost tracer computes MACs there); for nn.MultiheadAttention's
    parts, func/args are the F.multi_head_attention_forward call and out is None.
    data_flow=False: tensors are freed as in a plain forward pass, so an id may be reused and the
    identities (inputs, outputs, uses, producers) are not to be compared; names, kinds and shapes are
    the same."""
    tracer = _Tracer(model, on_op, data_flow)
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook(path)))
        handles.append(module.register_forward_hook(tracer.post_hook))
    was_training = model.training
    tracer.trace.example = id(example)
    tracer.keep.append(example)
    try:
        model.eval()
        with torch.no_grad(), tracer:
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        tracer.keep.clear()
    return tracer.trace
