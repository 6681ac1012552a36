"""Export a simulated model (qcard.quant) as an ONNX QDQ graph with exactly qcard's grids.

How: a copy of the simulated model has every FakeQuantize replaced by a marker (an autograd.Function
whose TorchScript `symbolic` writes standard ONNX ops), then torch's TorchScript exporter writes the
graph. The markers write
  - an activation quantizer as QuantizeLinear -> DequantizeLinear with qcard's scale and zero point
    (a ReLU/ReLU6 the quantizer absorbed is written before it unless the grid itself clips there);
  - a weight quantizer as an integer initializer (qcard's own integer values) -> DequantizeLinear
    (axis for per-channel scales); the float weight is not written.
Batch norm is already folded (or kept) in the simulated model as the card says, so the graph is the
simulated one. Before anything is written, every quantizer is checked to be a grid the runtime runs as
integer (`deploy_problem`); while tracing, each marker compares qcard's own quantizer output with the
standard QDQ formula on the example and refuses to export when they differ by one bit.
"""
from __future__ import annotations

import copy
import io
from collections import Counter
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..errors import QcardError
from ..quant.quantizer import FakeQuantize, fake_quantize

__all__ = ["export_onnx", "ExportInfo", "NotDeployable", "deploy_problem", "card_problem", "DEFAULT_OPSET",
           "INT4_OPSET"]

DEFAULT_OPSET = 13
INT4_OPSET = 21

# why the runtime cannot run a method's own simulated arithmetic (the card says it as the reason)
_METHOD_REASONS = {
    "sparq": "SPARQ's per-value 4-bit activation windows (dynamic bit-window selection) have no ONNX QDQ form "
             "and no onnxruntime integer kernel",
    "fp32": "an FP32 point: nothing is quantized, so there is no integer model to run",
    "fp32_train": "an FP32 point: nothing is quantized, so there is no integer model to run",
    "marvin": "MARViN's per-layer fixed-point word lengths (signed fixed-point with learned fraction bits, "
              "not 8-bit affine grids) have no onnxruntime integer kernel",
}


class NotDeployable(QcardError):
    """The setting cannot run on the runtime as integer; the message is the reason (for the card)."""


@dataclass
class ExportInfo:
    """What export_onnx wrote: the facts the card's deployment.export block records."""
    path: str
    opset: int
    fp32: bool
    activation_qdq: int = 0                     # Q->DQ pairs on activations
    weight_dq: int = 0                          # integer weight initializers -> DequantizeLinear
    weight_types: Dict[str, int] = field(default_factory=dict)   # int8 / uint8 / int4 -> count
    output_scale: Optional[float] = None        # the logits' quantization step (None: float logits)
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"format": "onnx_qdq" if not self.fp32 else "onnx_fp32", "opset": self.opset,
                "activation_qdq": self.activation_qdq, "weight_dq": self.weight_dq,
                "weight_types": dict(self.weight_types), "output_scale": self.output_scale,
                "batch_norm": "as simulated (folded into the weights, or kept in FP32)", "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------ checks

def _is_weight(name: str) -> bool:
    """A conv/linear layer's weight quantizer (the builders name it so; activations have other names)."""
    return name.endswith("weight_quantizer")


def deploy_problem(sim: nn.Module, method: Optional[str] = None) -> Optional[str]:
    """Why this simulated model cannot run on onnxruntime as integer (None: it can)."""
    if method in _METHOD_REASONS:
        return _METHOD_REASONS[method]
    if getattr(sim, "qcard_sim", None) is None:
        return ("the model was not built by qcard.quant (no qcard_sim): there are no affine grids to export"
                + (f" (method {method})" if method else ""))
    quantizers = [(n, m) for n, m in sim.named_modules() if isinstance(m, FakeQuantize)]
    if not quantizers:
        return "nothing is quantized (FP32 model): there is nothing to run as integer"
    for name, fq in quantizers:
        problem = _weight_problem(fq) if _is_weight(name) else _act_problem(fq)
        if problem:
            return f"{fq.qname or name}: {problem}"
    return None


def card_problem(card: Dict[str, Any]) -> Optional[str]:
    """Why a card's quantized model cannot run on onnxruntime as integer, read from the card alone (None:
    the card does not say it cannot; the export itself decides). The reasons are export's own."""
    from types import SimpleNamespace
    dep = card.get("deployment") or {}
    if dep.get("status") == "not_deployable" and dep.get("reason"):
        return dep["reason"]
    method = (card.get("method") or {}).get("name")
    if method in _METHOD_REASONS:
        return _METHOD_REASONS[method]
    q = card.get("quantization") or {}
    for kind, check in (("weights", _weight_problem), ("activations", _act_problem)):
        block = q.get(kind) or {}
        bits = _bits_of(block)
        if not bits:
            continue
        worst = max(bits) if kind == "weights" else next((b for b in bits if b != 8), 8)
        spec = SimpleNamespace(bits=worst, granularity=block.get("granularity") or "per_tensor",
                               rounding=block.get("rounding") if kind == "weights" else "nearest")
        problem = check(SimpleNamespace(spec=spec, dynamic=bool(block.get("dynamic")), calibrated=True))
        if problem:
            return f"{kind}: {problem}"
    return None


def _bits_of(block: Dict[str, Any]) -> List[int]:
    """The bit widths a card's weights/activations block names ("mixed: [4, 8]" lists them all)."""
    import re
    detail = block.get("bits_detail")
    if isinstance(detail, str) and "[" in detail:
        return [int(b) for b in re.findall(r"\d+", detail.split("[", 1)[1])]
    bits = block.get("bits")
    return [int(bits)] if isinstance(bits, (int, float)) and bits < 32 else []


def _act_problem(fq: FakeQuantize) -> Optional[str]:
    s = fq.spec
    if fq.dynamic:
        return "dynamic (per-sample) activation ranges; QDQ needs constant scales"
    if s.bits != 8:
        return (f"{s.bits}-bit activations: onnxruntime's integer kernels read 8-bit activations only, and a "
                f"{s.bits}-bit grid in an 8-bit container would clip at different values")
    if s.granularity != "per_tensor":
        return "per-channel activation scales: onnxruntime's integer kernels take one activation scale per tensor"
    if s.rounding != "nearest":
        return f"{s.rounding} rounding of activations: QuantizeLinear rounds to nearest even"
    if not fq.calibrated:
        return "the quantizer was never calibrated"
    return None      # a learnable estimator's output is compared with the plain grid while tracing


def _weight_problem(fq: FakeQuantize) -> Optional[str]:
    s = fq.spec
    if s.bits > 8:
        return f"{s.bits}-bit weights: the integer kernels take at most 8-bit weights"
    if s.granularity == "per_group":
        return ("per-group weight scales: onnxruntime has no integer convolution/matmul kernel with one scale per "
                "group of input channels")
    if s.rounding == "stochastic":
        return "stochastic weight rounding changes the weights at every call"
    if not fq.calibrated:
        return "the weight quantizer was never calibrated"
    return None


# ------------------------------------------------------------------------------------------ markers

def _activation(x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act == "relu":
        return torch.relu(x)
    if act == "relu6":
        return torch.nn.functional.relu6(x)
    return x


class _Grid:
    """One quantizer as the exported graph stores it (plain data handed to the symbolic)."""

    def __init__(self, fq: FakeQuantize, weight: bool, int4: bool):
        self.name = fq.qname
        self.weight = weight
        self.qmin, self.qmax = fq.qmin, fq.qmax
        self.axis = fq.axis
        self.scale = fq.scale.detach().float().cpu().clone()
        self.zp = fq.zero_point.detach().round().cpu().clone()
        if self.axis is None:
            self.scale, self.zp = self.scale.reshape(()), self.zp.reshape(())
        else:
            self.scale, self.zp = self.scale.reshape(-1), self.zp.reshape(-1)
        # the container: signed grids int8 (int4 at opset 21 for <= 4 bits), unsigned uint8
        self.dtype = torch.int8 if self.qmin < 0 else torch.uint8
        self.onnx_type = ("int4" if int4 and fq.bits <= 4 else "int8") if self.qmin < 0 else \
            ("uint4" if int4 and fq.bits <= 4 else "uint8")
        # an absorbed ReLU/ReLU6 is written out unless the grid itself clips exactly there (z = q_min; 6 in range)
        lo = float((self.qmin - self.zp) * self.scale) if self.axis is None else None
        hi = float((self.qmax - self.zp) * self.scale) if self.axis is None else None
        clips = lo == 0.0 and (fq.pre_act == "relu" or (hi is not None and hi <= 6.0))
        self.pre_act = fq.pre_act if fq.pre_act and not clips else None
        self.qweight: Optional[torch.Tensor] = None
        self.fn: Any = None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The standard QDQ arithmetic on x (qcard's formula with this grid)."""
        x = _activation(x, self.pre_act)
        return fake_quantize(x.detach().clone(), self.scale, self.zp, self.qmin, self.qmax, self.axis)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """qcard's integer weight values q (so that (q - z)·s is the fake-quantized weight)."""
        if self.axis is None:
            s, z = self.scale, self.zp
        else:
            shape = [1] * w.dim()
            shape[self.axis] = -1
            s, z = self.scale.reshape(shape), self.zp.reshape(shape)
        v = torch.mul(w.detach(), 1.0 / s)
        return (torch.clamp(v, self.qmin - z, self.qmax - z).round() + z).to(self.dtype)


def _qdq_function(grid: "_Grid") -> type:
    """An autograd.Function for one grid (the TorchScript tracer takes tensors only as its arguments)."""

    def forward(ctx, x):
        return grid.reference(x)

    def symbolic(g, x):
        kw = {"axis_i": int(grid.axis)} if grid.axis is not None else {}
        s = g.op("Constant", value_t=grid.scale)
        z = g.op("Constant", value_t=grid.zp.to(grid.dtype))
        if grid.weight:
            q = g.op("Constant", value_t=grid.qweight)
        else:
            if grid.pre_act == "relu":
                x = g.op("Relu", x)
            elif grid.pre_act == "relu6":
                x = g.op("Clip", x, g.op("Constant", value_t=torch.tensor(0.0)),
                         g.op("Constant", value_t=torch.tensor(6.0)))
            q = g.op("QuantizeLinear", x, s, z, **kw)
        return g.op("DequantizeLinear", q, s, z, **kw)

    return type("QcardQDQ", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


class _Tracer:
    """Puts the markers into a copy of the simulated model and records what it wrote."""

    def __init__(self, sim: nn.Module, fp32: bool, int4: bool):
        # the copy needs the modules only, not qcard_sim's bookkeeping (which refers to the original's modules)
        memo = {id(sim.__dict__["qcard_sim"]): None} if "qcard_sim" in sim.__dict__ else {}
        self.model = copy.deepcopy(sim, memo).cpu().eval()
        self.fp32, self.int4 = fp32, int4
        self.mismatch: List[str] = []
        self.checking = True          # the first pass builds and checks the grids; the export pass traces
        self.grids: Dict[int, _Grid] = {}
        self.weight_types: Dict[str, int] = {}
        for name, m in list(self.model.named_modules()):
            if isinstance(m, FakeQuantize):
                m.inplace = False
                m.prescaled_input = False
                m.forward = types.MethodType(self._quant_forward(_is_weight(name)), m)
            elif isinstance(getattr(m, "source", None), FakeQuantize):      # a tied quantizer (pooling)
                m.forward = types.MethodType(lambda mod, x: mod.source(x), m)
            if hasattr(m, "quantized_weight") and hasattr(m, "weight_quantizer"):
                m.__dict__.pop("out_prescale", None)
                m.quantized_weight = types.MethodType(
                    lambda mod: mod.weight_quantizer(mod.weight) if mod.weight_quantizer is not None else mod.weight, m)

    def _quant_forward(self, weight: bool):
        tracer = self

        def forward(fq, x):
            if tracer.fp32 or not fq.enabled:
                return _activation(x, fq.pre_act) if not weight else x
            grid = tracer.grids.get(id(fq))
            if not tracer.checking:                 # exporting: only the marker is traced
                return grid.fn.apply(x)
            if grid is None:
                grid = tracer.grids[id(fq)] = _Grid(fq, weight, tracer.int4)
                grid.fn = _qdq_function(grid)
            mine = grid.reference(x)
            theirs = FakeQuantize.forward(fq, x.detach().clone())
            if not torch.equal(mine, theirs):
                n = int((mine != theirs).sum())
                tracer.mismatch.append(f"{fq.qname}: qcard's quantizer differs from the standard QDQ grid on "
                                       f"{n} of {mine.numel()} values of the example")
            if weight:
                grid.qweight = grid.integers(x)
                if not torch.equal((grid.qweight.float() - _bshape(grid.zp, x, grid.axis))
                                   * _bshape(grid.scale, x, grid.axis), theirs):
                    tracer.mismatch.append(f"{fq.qname}: integer weights do not dequantize to the simulated ones")
            return grid.fn.apply(x)
        return forward


def _bshape(t: torch.Tensor, like: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


# ------------------------------------------------------------------------------------------ export

def export_onnx(sim_model: nn.Module, example: torch.Tensor, path, *, opset: Optional[int] = None,
                fp32: bool = False, method: Optional[str] = None, int4: bool = False) -> ExportInfo:
    """Write `sim_model` (a qcard.quant simulated model) as ONNX to `path`: QDQ with qcard's grids, or,
    with fp32=True, the same graph with every quantizer left out (the FP32 reference for latency).
    Weights of <= 4 bits go in int8 initializers (opset 13 by default), which onnxruntime runs on its
    integer kernels; `int4=True` stores them as int4 (opset >= 21), which it runs in float.
    Raises NotDeployable (the reason) when the setting has no exact integer form on onnxruntime."""
    import onnx
    if not fp32:
        problem = deploy_problem(sim_model, method)
        if problem:
            raise NotDeployable(problem)
    asked = opset
    opset = opset or (INT4_OPSET if int4 else DEFAULT_OPSET)
    if int4 and opset < INT4_OPSET:
        raise QcardError(f"int4 weights need opset {INT4_OPSET} or later (int4 is an ONNX type from opset "
                         f"{INT4_OPSET}); opset is {opset}")
    tr = _Tracer(sim_model, fp32, int4=int4)
    example = example.detach().cpu()
    with torch.no_grad():
        tr.model(example)                          # builds the grids and checks them on the example
    if tr.mismatch:
        raise NotDeployable("; ".join(tr.mismatch[:3]))
    tr.checking = False
    buf, raised = _export_lowest_opset(tr.model, example, opset, asked)
    model = onnx.load_from_string(buf.getvalue())
    info = ExportInfo(path=str(path), opset=raised[-1][1] if raised else opset, fp32=fp32)
    info.notes += [f"exported at opset {v} (default {DEFAULT_OPSET}): the graph has {op}, which ONNX has from "
                   f"opset {v}" for op, v in raised]
    _finish(model, info, tr)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.save(model, str(path))
    return info


MAX_OPSET = 21        # the newest opset qcard's exports are checked on


def _export_lowest_opset(model: nn.Module, example: torch.Tensor, opset: int, asked: Optional[int]):
    """torch.onnx.export at `opset`, or, when the opset was not asked for and an op of the graph needs a later
    one (e.g. scaled_dot_product_attention: 14), at the lowest opset that has every op. Returns the buffer and
    [(op, opset it needed)]; an asked opset that is too low raises a QcardError that names the op."""
    import re
    raised = []
    while True:
        buf = io.BytesIO()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")    # the tracer's notes on Python constants: the grids are constants
                torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  do_constant_folding=True)
            return buf, raised
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            found = re.search(r"operator '([^']+)'.*added in version (\d+)", str(exc))
            if not found or int(found.group(2)) <= opset or int(found.group(2)) > MAX_OPSET:
                raise
            op, needed = found.group(1), int(found.group(2))
            if asked is not None:
                raise QcardError(f"deploy.opset {asked}: the graph has {op}, which ONNX has from opset {needed}; "
                                 f"set deploy.opset to {needed} or later, or leave it out (qcard then exports at "
                                 f"the lowest opset the graph needs)") from exc
            raised.append((op, needed))
            opset = needed


def _finish(model, info: ExportInfo, tr: _Tracer) -> None:
    """Constants to named initializers, int4 weights where asked, and the facts for the card."""
    from onnx import helper, numpy_helper, TensorProto
    g = model.graph
    consts = {}
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            t.name = node.output[0]
            consts[t.name] = t
        else:
            keep.append(node)
    producer = {o: n for n in keep for o in n.output}
    weight_inputs = set()
    for n in keep:
        if n.op_type == "DequantizeLinear" and n.input[0] in consts:
            weight_inputs.add(n.input[0])
            info.weight_dq += 1
        elif n.op_type == "QuantizeLinear":
            info.activation_qdq += 1
    int4_types = {gr.onnx_type for gr in tr.grids.values() if gr.weight and gr.onnx_type.endswith("4")}
    for name, t in consts.items():
        if name in weight_inputs:
            arr = numpy_helper.to_array(t)
            kind = "int8" if arr.dtype.name == "int8" else "uint8"
            if int4_types and _fits4(arr):          # a 4-bit grid's values (exact in int4 as in int8)
                kind = kind.replace("8", "4")
                t = helper.make_tensor(name, TensorProto.INT4 if kind == "int4" else TensorProto.UINT4,
                                       arr.shape, arr.flatten().tolist())
            info.weight_types[kind] = info.weight_types.get(kind, 0) + 1
        g.initializer.append(t)
    if int4_types:
        _zero_points_to_4bit(model, weight_inputs)
    keep = [_flatten_as_reshape(g, n) if n.op_type == "Flatten" else n for n in keep]
    del g.node[:]
    g.node.extend(keep)
    out = producer.get(g.output[0].name)
    if out is not None and out.op_type == "DequantizeLinear" and out.input[1] in consts:
        s = numpy_helper.to_array(consts[out.input[1]])
        info.output_scale = float(s.reshape(-1)[0]) if s.size == 1 else None
    if info.weight_types.get("int8") and any(gr.weight and gr.qmax - gr.qmin < 255 for gr in tr.grids.values()):
        info.notes.append("weights of fewer than 8 bits are stored in int8 initializers (same integer values; "
                          "the runtime runs them with its 8-bit kernels)")
    if int4_types:
        info.notes.append(f"weights of 4 bits or fewer are stored as int4 (opset {info.opset}, deploy.int4_weights)")
    info.notes += _fit_biases(g)


INT32_MAX = 2 ** 31 - 1


def _fit_biases(graph) -> List[str]:
    """onnxruntime quantizes each float bias of a Conv/Gemm whose input and weight are quantized to int32 at
    s_in·s_w (saturating). A channel whose weight scale is tiny (all its weights 0, e.g. a batch norm with
    gamma 0 folded in, given a scale of float eps) then saturates: its bias is lost on the runtime but not in
    the simulation. Such a channel's integer weights are all zero, so any scale dequantizes them exactly:
    it gets one at which its bias fits. Channels with nonzero weights cannot change; they are named."""
    from onnx import numpy_helper
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = Counter(i for n in graph.node for i in n.input)
    fixed, lost, biased, off_grid = 0, [], 0, []
    for n in graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        xq, wq = producer.get(n.input[0]), producer.get(n.input[1])
        while xq is not None and xq.op_type == "Reshape":     # the runtime moves the DQ across it (Flatten's)
            xq = producer.get(xq.input[0])
        if not (xq is not None and wq is not None and xq.op_type == wq.op_type == "DequantizeLinear"
                and xq.input[1] in inits and wq.input[0] in inits and wq.input[1] in inits):
            continue
        biased += 1
        s_in = float(numpy_helper.to_array(inits[xq.input[1]]).reshape(-1)[0])
        s_w = numpy_helper.to_array(inits[wq.input[1]]).astype(np.float64).reshape(-1)
        q = numpy_helper.to_array(inits[wq.input[0]]).astype(np.int64)
        z = (numpy_helper.to_array(inits[wq.input[2]]).astype(np.int64).reshape(-1) if len(wq.input) > 2
             and wq.input[2] in inits else np.zeros(1, dtype=np.int64))
        b = np.abs(numpy_helper.to_array(inits[n.input[2]]).astype(np.float64))
        per_channel = s_w.size > 1
        zero = ((q.reshape(q.shape[0], -1) == z.reshape(-1, 1)).all(1) if per_channel
                else np.array([bool((q == z[0]).all())]))
        if _off_grid(b, s_in, s_w, zero if per_channel else None):
            off_grid.append(n.name)
        over = (b / (s_in * s_w) > INT32_MAX) if per_channel else np.array([bool((b / (s_in * s_w[0]) > INT32_MAX).any())])
        if not over.any():
            continue
        if (over & zero).any() and uses[wq.input[1]] == 1:
            bmax = b if per_channel else np.full(1, b.max())
            s_new = s_w.copy()
            ok = s_w[~zero].max() if (~zero).any() else 1.0
            s_new[over & zero] = np.maximum(ok, 2.0 * bmax[over & zero] / (s_in * INT32_MAX))
            dtype = numpy_helper.to_array(inits[wq.input[1]]).dtype
            inits[wq.input[1]].CopyFrom(numpy_helper.from_array(
                s_new.astype(dtype).reshape(numpy_helper.to_array(inits[wq.input[1]]).shape), wq.input[1]))
            fixed += int((over & zero).sum())
        if (over & ~zero).any():
            lost.append(f"{n.name} ({int((over & ~zero).sum())} channel(s))")
    notes = []
    if biased and not off_grid:
        notes.append("biases: onnxruntime adds each conv/gemm bias to the int32 accumulator at s_in·s_w; the "
                     f"simulated biases are on that grid ({biased} layer(s)), so it adds them exactly")
    elif off_grid:
        notes.append(f"biases: onnxruntime rounds each conv/gemm bias to int32 at s_in·s_w; {len(off_grid)} of "
                     f"{biased} layer(s) have a simulated bias off that grid ({', '.join(off_grid[:4])}"
                     f"{' ...' if len(off_grid) > 4 else ''}), so the runtime adds another bias than the simulation "
                     "(up to half an accumulator step: output codes a step apart, growing through the layers); "
                     "qcard's runner puts the biases on the grid (qcard.quant.int_bias.round_biases)")
    if fixed:
        notes.append(f"{fixed} channel(s) whose weights are all zero got a weight scale at which their bias fits "
                     "int32 at s_in·s_w (their weights dequantize to 0 at any scale; with the tiny scale the "
                     "runtime's int32 bias would saturate)")
    if lost:
        notes.append("bias out of int32 range at s_in·s_w (the runtime saturates it; the simulation does not): "
                     + ", ".join(lost[:6]) + (" ..." if len(lost) > 6 else ""))
    return notes


def _off_grid(b_abs, s_in: float, s_w, zero) -> bool:
    """Whether a bias (|b| per channel) is not a multiple of its accumulator step s_in·s_w (float32, as the
    runtime multiplies them) on a channel with nonzero weights; a relative tolerance covers float32's
    representation of large multiples."""
    step = (np.float32(s_in) * s_w.astype(np.float32)).astype(np.float64)
    k = b_abs / step
    off = np.abs(k - np.round(k)) > np.maximum(1e-3, 1e-6 * k)
    if zero is not None:
        off = off & ~zero
    return bool(off.any())


def _flatten_as_reshape(graph, node):
    """Flatten(axis=1) as Reshape(0, -1): the same tensor, but onnxruntime moves a DequantizeLinear across a
    Reshape (not across a Flatten), so the conv/linear after it can still run as an integer kernel."""
    from onnx import helper, numpy_helper
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if axis != 1:
        return node
    shape = f"{node.output[0]}_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
    return helper.make_node("Reshape", [node.input[0], shape], list(node.output), name=node.name or shape)


def _fits4(arr) -> bool:
    return bool(arr.size) and int(arr.min()) >= (-8 if arr.dtype.name == "int8" else 0) and \
        int(arr.max()) <= (7 if arr.dtype.name == "int8" else 15)


def _zero_points_to_4bit(model, weight_inputs) -> None:
    """DequantizeLinear needs the zero point in the type of its input: 4-bit weights get 4-bit zero points."""
    from onnx import helper, numpy_helper, TensorProto
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in weight_inputs or len(n.input) < 3:
            continue
        w = model.graph.initializer[inits[n.input[0]]]
        if w.data_type not in (TensorProto.INT4, TensorProto.UINT4):
            continue
        zi = inits[n.input[2]]
        z = numpy_helper.to_array(model.graph.initializer[zi])
        model.graph.initializer[zi].CopyFrom(helper.make_tensor(n.input[2], w.data_type, z.shape,
                                                                z.flatten().tolist()))
