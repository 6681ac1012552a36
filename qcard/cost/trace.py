"""Layer tracing: one forward pass (batch 1) that records every conv, linear and data-moving op.

How it works: forward pre/post hooks keep a stack of the module paths being executed, and a
TorchFunctionMode sees every torch function call (F.conv2d, F.linear, `a + b`, torch.cat, `q @ k`,
F.scaled_dot_product_attention, ...). That catches functional ops that module hooks miss (residual
adds, attention matmuls) without torch.fx, so it works on models fx cannot trace, and it costs one
ordinary forward pass.

Names: an op whose weight is a parameter of the model is named after that parameter's owner
("layer1.0.conv1"; "encoder.layers.0.self_attention.in_proj" for an `in_proj_weight`), so methods can
match records by module path. Other ops are named "<module path>.<op>" ("layer1.0.add",
"blocks.0.attn.matmul_1"), or just the module path when they are the only op of a leaf module
("maxpool"). A repeated name gets a "_1", "_2", ... suffix.

Bits are left None (FP32); quantization methods fill them in, matching records by name.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import QcardError
from ..records import LayerRecord

__all__ = ["trace_layers", "count_params"]


def count_params(model: torch.nn.Module) -> int:
    """Every parameter of the model (BN and embeddings included), shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


# Functions recognised by __name__ (builtins and Tensor methods). Max-pool functions are
# boolean-dispatch wrappers named "fn", so those are recognised by identity in _OpCatcher.
_NAME_TO_OP = {
    "conv1d": "conv1d", "conv2d": "conv2d", "conv3d": "conv3d",
    "conv_transpose1d": "conv_transpose1d", "conv_transpose2d": "conv_transpose2d",
    "conv_transpose3d": "conv_transpose3d",
    "linear": "linear",
    "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "mm": "matmul",
    "bmm": "matmul", "baddbmm": "matmul", "addmm": "matmul",
    "scaled_dot_product_attention": "attention",
    "multi_head_attention_forward": "mha",
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add", "__radd__": "add",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__imul__": "mul", "__rmul__": "mul",
    "cat": "concat", "concat": "concat", "concatenate": "concat",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool", "adaptive_avg_pool3d": "avgpool",
    "max_pool1d_with_indices": "maxpool", "max_pool2d_with_indices": "maxpool",
    "max_pool3d_with_indices": "maxpool", "adaptive_max_pool2d_with_indices": "maxpool",
    "layer_norm": "layernorm", "softmax": "softmax",
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else ()


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 0


def _tuple(v: Any, n: int) -> Tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),) * n


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> Dict[str, Any]:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


class _Tracer:
    def __init__(self, model: torch.nn.Module):
        self.records: List[LayerRecord] = []
        self.stack: List[Tuple[str, torch.nn.Module, Dict[str, int]]] = []
        self.used_names: Dict[str, int] = {}
        self.counted: set = set()        # ids of weight tensors already counted in params
        self.param_names: Dict[int, str] = {}
        for name, p in model.named_parameters():
            self.param_names.setdefault(id(p), name)
        self.leaf = {id(m) for m in model.modules() if next(m.children(), None) is None}

    # -- naming ---------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        """name, or name_1, name_2, ... when a module runs twice (or names collide)."""
        candidate, n = name, self.used_names.get(name, 0)
        while candidate in self.used_names:
            n += 1
            candidate = f"{name}_{n}"
        self.used_names[name] = n
        self.used_names.setdefault(candidate, 0)
        return candidate

    def _weight_name(self, w: Any) -> Optional[str]:
        pname = self.param_names.get(id(w)) if isinstance(w, torch.Tensor) else None
        if pname is None:
            return None
        if pname.endswith(".weight"):
            return pname[: -len(".weight")]
        if pname == "weight":
            return ""
        if pname.endswith("_weight"):       # nn.MultiheadAttention.in_proj_weight -> ...in_proj
            return pname[: -len("_weight")]
        return pname

    def _op_name(self, op: str, weight: Any = None) -> str:
        name = self._weight_name(weight)
        if name is None:
            path, module, counts = self.stack[-1] if self.stack else ("", None, {})
            n = counts.get(op, 0)
            counts[op] = n + 1
            total = sum(counts.values())
            if path and ((weight is not None and n == 0) or
                         (module is not None and id(module) in self.leaf and total == 1)):
                # a weight that is not a parameter (e.g. fake-quantized on the fly) belongs to the
                # module that computed it; the one op of a leaf module is named by the module
                name = path
            else:
                base = f"{path}.{op}" if path else op
                name = base if n == 0 else f"{base}_{n}"
        return self._unique(name or op)

    def _known(self, t: Any) -> Any:
        """t when it is a parameter of the model, else None (name the op "<module>.<op>")."""
        return t if isinstance(t, torch.Tensor) and id(t) in self.param_names else None

    def _params(self, *tensors: Any) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in self.counted:
                if id(t) in self.param_names:
                    self.counted.add(id(t))   # a shared weight is counted at its first use only
                total += t.numel()
        return total

    # -- hooks ----------------------------------------------------------------------------
    def pre_hook(self, path: str):
        def hook(module, args):
            self.stack.append((path, module, {}))
        return hook

    def post_hook(self, module, args, output):
        if self.stack:
            self.stack.pop()

    # -- recording ------------------------------------------------------------------------
    def record(self, func, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        if op.startswith("conv"):
            self._conv(op, args, kwargs, out)
        elif op == "linear":
            a = _bind(("input", "weight", "bias"), args, kwargs)
            x, w, b = a["input"], a["weight"], a.get("bias")
            oshape = _shape(out)
            self._add(LayerRecord(
                name=self._op_name("linear", w), op="linear", input_shape=_shape(x), output_shape=oshape,
                weight_shape=_shape(w), params=self._params(w, b),
                macs=_numel(oshape) * int(w.shape[-1]), extra={"fan_in": int(w.shape[-1]), "bias": b is not None}))
        elif op == "matmul":
            self._matmul(func, args, kwargs, out)
        elif op == "attention":
            self._sdpa(args, kwargs, out)
        elif op in ("add", "mul"):
            tensors = [t for t in args[:2] if isinstance(t, torch.Tensor)]
            # x + 1 or x * scale are not data-moving layers; only tensor-tensor ops are recorded
            if len(tensors) == 2 and all(t.numel() > 1 for t in tensors):
                self._simple(op, tensors, out)
        elif op == "concat":
            seq = args[0] if args else kwargs.get("tensors", ())
            self._simple(op, [t for t in seq if isinstance(t, torch.Tensor)], out)
        else:   # pools, layernorm, softmax
            x = args[0] if args else next(iter(kwargs.values()), None)
            self._simple(op, [x] if isinstance(x, torch.Tensor) else [], out)

    def _add(self, rec: LayerRecord) -> None:
        self.records.append(rec)

    def _simple(self, op: str, inputs: List[torch.Tensor], out: Any) -> None:
        if isinstance(out, (tuple, list)):     # max_pool with indices returns (values, indices)
            out = out[0]
        extra = {"input_shapes": [_shape(t) for t in inputs]} if len(inputs) > 1 else {}
        self._add(LayerRecord(name=self._op_name(op), op=op, input_shape=_shape(inputs[0]) if inputs else (),
                              output_shape=_shape(out), extra=extra))

    def _conv(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        transposed = "transpose" in op
        a = _bind(_CONVT_ARGS if transposed else _CONV_ARGS, args, kwargs)
        x, w, b = a["input"], a["weight"], a.get("bias")
        nd = w.dim() - 2
        k = tuple(int(s) for s in w.shape[2:])
        stride = _tuple(a.get("stride", 1), nd)
        dilation = _tuple(a.get("dilation", 1), nd)
        padding = a.get("padding", 0)
        if isinstance(padding, str):          # 'valid' or 'same' (stride 1): the padding actually used
            padding = tuple(0 if padding == "valid" else d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        padding = _tuple(padding, nd)
        groups = int(a.get("groups", 1))
        oshape = _shape(out)
        if transposed:   # every input element is multiplied by a (C_out/g)·k² slice of the weight
            macs = _numel(_shape(x)) * int(w.shape[1]) * _numel(k)
            fan_in = int(w.shape[0]) // groups * _numel(k)
        else:
            fan_in = int(w.shape[1]) * _numel(k)
            macs = _numel(oshape) * fan_in
        self._add(LayerRecord(
            name=self._op_name(op, w), op=op, input_shape=_shape(x), output_shape=oshape,
            weight_shape=_shape(w), kernel_size=k, stride=stride, padding=padding, groups=groups,
            params=self._params(w, b), macs=macs,
            extra={"fan_in": fan_in, "dilation": dilation, "bias": b is not None}))

    def _matmul(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", "")
        if name in ("baddbmm", "addmm"):       # (bias, a, b)
            a, b = args[1], args[2]
        elif name == "__rmatmul__":
            b, a = args[0], args[1]
        else:
            a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return
        k = int(a.shape[-1])
        oshape = _shape(out)
        n = oshape[-1] if b.dim() > 1 and oshape else 1
        m = oshape[-2] if a.dim() > 1 and len(oshape) > 1 else 1
        batch = _numel(oshape) // max(1, m * n) if oshape else 1
        weight = b if id(b) in self.param_names else (a if id(a) in self.param_names else None)
        self._add(LayerRecord(
            name=self._op_name("matmul", weight), op="matmul", input_shape=_shape(a), output_shape=oshape,
            weight_shape=_shape(weight) if weight is not None else (),
            params=self._params(weight) if weight is not None else 0,
            macs=_numel(oshape) * k,
            extra={"fan_in": k, "gemms": [(batch, m, k, n)], "input_shapes": [_shape(a), _shape(b)]}))

    def _sdpa(self, args: tuple, kwargs: dict, out: Any) -> None:
        a = _bind(("query", "key", "value"), args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        L, E = int(q.shape[-2]), int(q.shape[-1])
        S, Ev = int(k.shape[-2]), int(v.shape[-1])
        batch = _numel(_shape(q)) // (L * E)
        self._add(LayerRecord(
            name=self._op_name("attention"), op="attention", input_shape=_shape(q), output_shape=_shape(out),
            macs=batch * L * S * (E + Ev),
            extra={"fan_in": S, "gemms": [(batch, L, E, S), (batch, L, S, Ev)],
                   "input_shapes": [_shape(q), _shape(k), _shape(v)]}))

    def mha(self, args: tuple, kwargs: dict) -> None:
        """nn.MultiheadAttention runs inside one F.multi_head_attention_forward call: expand it into
        its input projection, the two attention matmuls, the softmax and the output projection."""
        a = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs).arguments
        q, key = a["query"], a["key"]
        heads = int(a["num_heads"])
        batched = q.dim() == 3
        L, S = int(q.shape[0]), int(key.shape[0])
        N = int(q.shape[1]) if batched else 1
        E = int(q.shape[-1])
        hd = E // heads
        if a.get("use_separate_proj_weight"):
            ws = [a.get("q_proj_weight"), a.get("k_proj_weight"), a.get("v_proj_weight")]
            w_in = ws[0]
        else:
            w_in = a["in_proj_weight"]
            ws = [w_in]
        kdim = int(key.shape[-1])
        in_macs = N * (L * E * E + 2 * S * kdim * E)
        self._add(LayerRecord(
            name=self._op_name("in_proj", self._known(w_in)), op="linear", input_shape=(N, L, E), output_shape=(N, L, 3 * E),
            weight_shape=_shape(w_in), params=self._params(*ws, a.get("in_proj_bias")), macs=in_macs,
            extra={"fan_in": E, "gemms": [(1, N * L, E, E), (1, N * S, kdim, E), (1, N * S, kdim, E)]}))
        for i, (m, kk, n, oshape) in enumerate(((L, hd, S, (N, heads, L, S)), (L, S, hd, (N, heads, L, hd)))):
            self._add(LayerRecord(
                name=self._op_name("matmul"), op="matmul", input_shape=(N, heads, L, hd if i == 0 else S),
                output_shape=oshape, macs=N * heads * m * kk * n,
                extra={"fan_in": kk, "gemms": [(N * heads, m, kk, n)]}))
            if i == 0:
                self._add(LayerRecord(name=self._op_name("softmax"), op="softmax",
                                      input_shape=(N, heads, L, S), output_shape=(N, heads, L, S)))
        w_out = a["out_proj_weight"]
        self._add(LayerRecord(
            name=self._op_name("out_proj", self._known(w_out)), op="linear", input_shape=(N, L, E), output_shape=(N, L, E),
            weight_shape=_shape(w_out), params=self._params(w_out, a.get("out_proj_bias")),
            macs=N * L * E * int(w_out.shape[0]), extra={"fan_in": E}))


class _OpCatcher(TorchFunctionMode):
    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer
        self.by_id = {id(f): "maxpool" for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d,
                                                F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                                F.adaptive_max_pool3d)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = self.by_id.get(id(func)) or _NAME_TO_OP.get(getattr(func, "__name__", ""))
        if op == "mha":
            self.tracer.mha(args, kwargs)
        out = func(*args, **kwargs)      # the mode is off inside: nested calls are not re-recorded
        if op is not None and op != "mha":
            self.tracer.record(func, op, args, kwargs, out)
        return out


def trace_layers(model: torch.nn.Module, input_shape: Tuple[int, ...], *, device: str = "cpu") -> List[LayerRecord]:
    """Run one batch-1 forward pass of `model` on zeros of shape (1, *input_shape) and return a
    LayerRecord for every conv, linear, matmul/attention, add, mul, concat, pool, layernorm and
    softmax, in execution order. The model must already be on `device`; device="meta" traces
    shapes only (no arithmetic, no memory for weights). The model's train/eval mode is restored."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise QcardError(f"input shape must be positive sizes such as (3, 224, 224), got {input_shape!r}")
    tracer = _Tracer(model)
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook(path)))
        handles.append(module.register_forward_hook(tracer.post_hook))
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros((1, *shape), dtype=dtype, device=device)
        with torch.no_grad(), _OpCatcher(tracer):
            model(x)
    except QcardError:
        raise
    except Exception as exc:
        raise QcardError(f"could not trace the model with input shape {shape} on {device}: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return tracer.records
