"""Layer records for the cost model: one forward pass (batch 1) that records every conv, linear and
data-moving op with its shapes, MACs and parameters.

The ops and their names come from the op tracer (qcard.ops.tracer; naming rules in qcard.ops.naming):
"layer1.0.conv1" for a layer named by its weight, "layer1.0.add" / "blocks.0.attn.matmul_1" for
functional ops, "maxpool" for a leaf module's op. Methods match their records to these by name.

Bits are left None (FP32); quantization methods fill them in (qcard.cost.merge_layer_records).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import QcardError
from ..ops.tracer import CONV_ARGS, CONVT_ARGS, SDPA_ARGS, Op, bind_args, trace_ops
from ..records import LayerRecord

__all__ = ["trace_layers", "trace_model", "ModelTrace", "count_params"]


@dataclass
class ModelTrace:
    """The layer records of one traced eval pass and the parameters that took part in it."""
    records: List[LayerRecord]
    params: int                     # parameters of the modules called and of the ops run in the pass
    # parameters that never ran, by outermost module (e.g. googlenet's auxiliary classifiers: training only)
    not_run: Dict[str, int] = field(default_factory=dict)

    @property
    def params_not_run(self) -> int:
        return sum(self.not_run.values())


def count_params(model: torch.nn.Module) -> int:
    """Every parameter of the model (BN and embeddings included), shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else ()


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 0


def _tuple(v: Any, n: int) -> Tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),) * n


class _Recorder:
    """Turns each traced op into a LayerRecord (MACs, params, kernel geometry) while its tensors live."""

    def __init__(self, model: torch.nn.Module):
        self.records: List[LayerRecord] = []
        self.counted: set = set()        # ids of weight tensors already counted in params
        self.params_by_name = dict(model.named_parameters())
        self.param_ids = {id(p) for p in self.params_by_name.values()}
        self.used: set = set()           # ids of parameters read by any traced op

    def _params(self, *tensors: Any) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in self.counted:
                if id(t) in self.param_ids:
                    self.counted.add(id(t))   # a shared weight is counted at its first use only
                total += t.numel()
        return total

    def __call__(self, op: Op, func, args: tuple, kwargs: dict, out: Any) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) in self.param_ids:
                self.used.add(id(a))
        if not op.cost_op:
            return
        if op.fused == "mha":
            self._mha(op, args, kwargs)
        elif op.fused == "sdpa":
            self._sdpa(op, args, kwargs)
        elif op.op.startswith("conv"):
            self._conv(op, args, kwargs)
        elif op.op == "linear":
            a = bind_args(("input", "weight", "bias"), args, kwargs)
            w, b = a["weight"], a.get("bias")
            self.records.append(LayerRecord(
                name=op.name, op="linear", input_shape=op.input_shapes[0], output_shape=op.output_shape,
                weight_shape=_shape(w), params=self._params(w, b),
                macs=_numel(op.output_shape) * int(w.shape[-1]),
                extra={"fan_in": int(w.shape[-1]), "bias": b is not None}))
        elif op.op == "matmul":
            self._matmul(op)
        else:   # add, mul, concat, pools, layernorm, softmax
            extra = {"input_shapes": list(op.input_shapes)} if len(op.input_shapes) > 1 else {}
            self.records.append(LayerRecord(name=op.name, op=op.op,
                                            input_shape=op.input_shapes[0] if op.input_shapes else (),
                                            output_shape=op.output_shape, extra=extra))

    def _conv(self, op: Op, args: tuple, kwargs: dict) -> None:
        transposed = "transpose" in op.op
        a = bind_args(CONVT_ARGS if transposed else CONV_ARGS, args, kwargs)
        w, b = a["weight"], a.get("bias")
        nd = w.dim() - 2
        k = tuple(int(s) for s in w.shape[2:])
        stride = _tuple(a.get("stride", 1), nd)
        dilation = _tuple(a.get("dilation", 1), nd)
        padding = a.get("padding", 0)
        if isinstance(padding, str):          # 'valid' or 'same' (stride 1): the padding actually used
            padding = tuple(0 if padding == "valid" else d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        padding = _tuple(padding, nd)
        groups = int(a.get("groups", 1))
        ishape, oshape = op.input_shapes[0], op.output_shape
        if transposed:   # every input element is multiplied by a (C_out/g)·k² slice of the weight
            macs = _numel(ishape) * int(w.shape[1]) * _numel(k)
            fan_in = int(w.shape[0]) // groups * _numel(k)
        else:
            fan_in = int(w.shape[1]) * _numel(k)
            macs = _numel(oshape) * fan_in
        self.records.append(LayerRecord(
            name=op.name, op=op.op, input_shape=ishape, output_shape=oshape,
            weight_shape=_shape(w), kernel_size=k, stride=stride, padding=padding, groups=groups,
            params=self._params(w, b), macs=macs,
            extra={"fan_in": fan_in, "dilation": dilation, "bias": b is not None}))

    def _matmul(self, op: Op) -> None:
        (ashape, bshape), oshape = op.input_shapes, op.output_shape
        k = int(ashape[-1])
        n = oshape[-1] if len(bshape) > 1 and oshape else 1
        m = oshape[-2] if len(ashape) > 1 and len(oshape) > 1 else 1
        batch = _numel(oshape) // max(1, m * n) if oshape else 1
        weight = self._weight_of(op)
        self.records.append(LayerRecord(
            name=op.name, op="matmul", input_shape=ashape, output_shape=oshape,
            weight_shape=_shape(weight) if weight is not None else (),
            params=self._params(weight) if weight is not None else 0,
            macs=_numel(oshape) * k,
            extra={"fan_in": k, "gemms": [(batch, m, k, n)], "input_shapes": [ashape, bshape]}))

    def _weight_of(self, op: Op) -> Optional[torch.Tensor]:
        return self.params_by_name.get(op.weight) if op.weight is not None else None

    def _sdpa(self, op: Op, args: tuple, kwargs: dict) -> None:
        """F.scaled_dot_product_attention's parts (qcard.ops.tracer.SDPA_PARTS): q·kᵀ, softmax, P·v."""
        a = bind_args(SDPA_ARGS, args, kwargs)
        q, k, v = _shape(a["query"]), _shape(a["key"]), _shape(a["value"])
        L, E, S, Ev = int(q[-2]), int(q[-1]), int(k[-2]), int(v[-1])
        lead = tuple(q[:-2])
        batch = _numel(lead) if lead else 1
        scores = (*lead, L, S)
        if op.part == "scores":
            self.records.append(LayerRecord(
                name=op.name, op="matmul", input_shape=q, output_shape=scores, macs=batch * L * S * E,
                extra={"fan_in": E, "gemms": [(batch, L, E, S)], "input_shapes": [q, k]}))
        elif op.part == "softmax":
            self.records.append(LayerRecord(name=op.name, op="softmax", input_shape=scores, output_shape=scores))
        else:
            self.records.append(LayerRecord(
                name=op.name, op="matmul", input_shape=scores, output_shape=(*lead, L, Ev), macs=batch * L * S * Ev,
                extra={"fan_in": S, "gemms": [(batch, L, S, Ev)], "input_shapes": [scores, v]}))

    def _mha(self, op: Op, args: tuple, kwargs: dict) -> None:
        """nn.MultiheadAttention's parts (one F.multi_head_attention_forward call): input projection,
        the two attention matmuls, the softmax and the output projection."""
        a = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs).arguments
        q, key = a["query"], a["key"]
        heads = int(a["num_heads"])
        batched = q.dim() == 3
        L, S = int(q.shape[0]), int(key.shape[0])
        N = int(q.shape[1]) if batched else 1
        E = int(q.shape[-1])
        hd = E // heads
        if op.part == "in_proj":
            if a.get("use_separate_proj_weight"):
                ws = [a.get("q_proj_weight"), a.get("k_proj_weight"), a.get("v_proj_weight")]
            else:
                ws = [a["in_proj_weight"]]
            kdim = int(key.shape[-1])
            self.records.append(LayerRecord(
                name=op.name, op="linear", input_shape=(N, L, E), output_shape=(N, L, 3 * E),
                weight_shape=_shape(ws[0]), params=self._params(*ws, a.get("in_proj_bias")),
                macs=N * (L * E * E + 2 * S * kdim * E),
                extra={"fan_in": E, "gemms": [(1, N * L, E, E), (1, N * S, kdim, E), (1, N * S, kdim, E)]}))
        elif op.part in ("scores", "context"):
            m, kk, n, oshape = ((L, hd, S, (N, heads, L, S)) if op.part == "scores"
                                else (L, S, hd, (N, heads, L, hd)))
            # both operands are activations: q and kᵀ, then P and v
            ins = [(N, heads, L, hd), (N, heads, hd, S)] if op.part == "scores" else [(N, heads, L, S), (N, heads, S, hd)]
            self.records.append(LayerRecord(
                name=op.name, op="matmul", input_shape=ins[0], output_shape=oshape, macs=N * heads * m * kk * n,
                extra={"fan_in": kk, "gemms": [(N * heads, m, kk, n)], "input_shapes": ins}))
        elif op.part == "softmax":
            self.records.append(LayerRecord(name=op.name, op="softmax",
                                            input_shape=(N, heads, L, S), output_shape=(N, heads, L, S)))
        else:
            w_out = a["out_proj_weight"]
            self.records.append(LayerRecord(
                name=op.name, op="linear", input_shape=(N, L, E), output_shape=(N, L, E),
                weight_shape=_shape(w_out), params=self._params(w_out, a.get("out_proj_bias")),
                macs=N * L * E * int(w_out.shape[0]), extra={"fan_in": E}))


def trace_layers(model: torch.nn.Module, input_shape: Tuple[int, ...], *, device: str = "cpu") -> List[LayerRecord]:
    """Run one batch-1 forward pass of `model` on zeros of shape (1, *input_shape) and return a
    LayerRecord for every conv, linear, matmul/attention, add, mul, concat, pool, layernorm and
    softmax, in execution order. The model must already be on `device`; device="meta" traces
    shapes only (no arithmetic, no memory for weights). The model's train/eval mode is restored."""
    return trace_model(model, input_shape, device=device).records


def trace_model(model: torch.nn.Module, input_shape: Tuple[int, ...], *, device: str = "cpu") -> ModelTrace:
    """trace_layers' records, with the parameters that ran in that eval pass counted apart from the
    ones that did not (modules never called, such as training-only auxiliary heads)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise QcardError(f"input shape must be positive sizes such as (3, 224, 224), got {input_shape!r}")
    recorder = _Recorder(model)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        x = torch.zeros((1, *shape), dtype=dtype, device=device)
        ops = trace_ops(model, x, on_op=recorder, data_flow=False)
    except QcardError:
        raise
    except Exception as exc:
        raise QcardError(f"could not trace the model with input shape {shape} on {device}: "
                         f"{type(exc).__name__}: {exc}") from exc
    called = {id(c.module) for c in ops.calls} | {id(model)}
    ran = set(recorder.used) | recorder.counted
    for m in model.modules():
        if id(m) in called:
            ran.update(id(p) for p in m.parameters(recurse=False))
    return ModelTrace(records=recorder.records, params=sum(p.numel() for p in model.parameters() if id(p) in ran),
                      not_run=_not_run(model, ran))


def _not_run(model: torch.nn.Module, ran: set) -> Dict[str, int]:
    """{outermost module path: its parameters that never ran}, for modules none of whose parameters ran."""
    out: Dict[str, int] = {}
    for path, m in model.named_modules():
        ps = list(m.parameters())
        if not path or not ps or any(id(p) in ran for p in ps):
            continue
        if any(path.startswith(prefix + ".") for prefix in out):
            continue        # inside a module already listed
        out[path] = sum(p.numel() for p in ps)
    counted = sum(out.values())
    loose = sum(p.numel() for p in model.parameters() if id(p) not in ran) - counted
    if loose > 0:           # parameters that did not run inside modules that partly did
        out["(other)"] = loose
    return out
