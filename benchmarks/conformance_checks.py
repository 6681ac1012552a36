"""Independent checks of one conformance point, computed without trusting the card.

- what the simulated model's MAC operands really hold (a dispatch-level capture: every convolution,
  matmul and fused attention kernel, with the number of grid levels each operand uses);
- the model's MACs from torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 * MACs);
- the parameters that take part in an eval forward pass;
- the share of conv/gemm/matmul MACs that ran on integer kernels in onnxruntime's optimized graph,
  read from the runtime's own profile (each node's op type and input/output shapes).
"""
from __future__ import annotations

import contextlib

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

FP32 = 32
GRID_LEVELS_MAX = 256          # more distinct values than an 8-bit grid holds: a float operand

# --------------------------------------------------------------------------- operand grids


_ON_GRID = 5e-3          # a value is on the grid when within this many steps of a grid point (float32
                         # rounding of q * step is ~1e-5 steps; a float channel of 2 free values matches
                         # one of the 255 candidate grids by chance with p ~ 255 * 1e-4)
_NOISE = 1e-5            # float32 rounding, relative to the largest magnitude (an 8-bit step is >= 1/255)


def grid_bits(t: torch.Tensor, channel_axis: Optional[int] = None) -> int:
    """Bits of the smallest uniform grid that holds every value of `t` (per channel along channel_axis,
    the largest over channels); FP32 (32) when the values lie on no grid of at most 256 levels."""
    x = t.detach().to(torch.float64)
    if channel_axis is None:
        rows = torch.unique(x.reshape(-1)).reshape(1, -1)          # sorted
    else:
        x = x.movedim(channel_axis, 0)
        rows = x.reshape(x.shape[0], -1).sort(dim=1).values
    if rows.shape[1] < 2:
        return 0
    # values a float rounding apart are one grid point (a straight-through x + (q - x).detach() leaves
    # such noise): gaps below NOISE of the largest magnitude count as zero
    tol = rows.abs().max(dim=1, keepdim=True).values.clamp_min(1e-30) * _NOISE
    d = rows[:, 1:] - rows[:, :-1]
    d = torch.where(d > tol, d, torch.zeros_like(d))
    if int(((d > 0).sum(dim=1) + 1).max()) > GRID_LEVELS_MAX:
        return FP32
    # a grid of at most 256 levels that holds the smallest and the largest value has step span / n for a
    # whole n <= 255: the smallest n that puts every value on the grid gives the levels. (Guessing the step
    # from the gaps fails on channels with few values: a 1x1 conv's 4 weights per channel can sit 70-90
    # steps apart with no common divisor among the gaps.)
    span = rows[:, -1] - rows[:, 0]
    off = rows - rows[:, :1]
    step = torch.full_like(span, float("nan"))
    for n in range(1, GRID_LEVELS_MAX):
        cand = (span / n).clamp_min(1e-300).unsqueeze(1)
        ratio = off / cand
        ok = ((ratio - ratio.round()).abs() <= _ON_GRID).all(dim=1) & torch.isnan(step)
        step = torch.where(ok, cand.squeeze(1), step)
    flat = span == 0
    if bool((torch.isnan(step) & ~flat).any()):
        return FP32
    levels = torch.where(flat, torch.ones_like(span), torch.round(span / step) + 1)
    top = float(levels.max())
    if top > GRID_LEVELS_MAX:
        return FP32
    return int(math.ceil(math.log2(top))) if top > 1 else 0


# --------------------------------------------------------------------------- MAC-op capture

_CONV = {"convolution"}
_MM = {"mm", "addmm", "bmm", "baddbmm"}
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}


@dataclass
class MacOp:
    """One multiply-accumulate op of the simulated model's forward pass (per-sample MACs)."""
    kind: str                       # conv | matmul | attention (fused q.k^T, softmax, P.V)
    aten: str
    macs: float
    act_numel: int                  # activation operand elements, per sample
    act_bits: int                   # grid bits of the activation operands (32: float)
    weight_numel: int = 0
    weight_bits: Optional[int] = None
    note: str = ""


class _Capture(TorchDispatchMode):
    """Records conv/matmul/attention kernels; a tensor computed from the input is an activation operand,
    any other (parameters, buffers, a quantizer's cached scales, constants) a weight operand."""

    def __init__(self, x: torch.Tensor, batch: int):
        super().__init__()
        self.dynamic: Dict[int, torch.Tensor] = {id(x): x}      # kept alive: ids stay unique
        self.batch, self.ops = batch, []   # type: ignore[var-annotated]

    def _is_static(self, t: torch.Tensor) -> bool:
        return id(t) not in self.dynamic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(not self._is_static(a) for a in ins):
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.dynamic[id(o)] = o
        name = func.overloadpacket.__name__
        if name in _CONV or name in _MM or name in _SDPA:
            self.ops.extend(self._describe(name, args, out))
        return out

    def _operands(self, tensors: Sequence[Tuple[torch.Tensor, Optional[int]]]):
        acts = [t for t, _ in tensors if not self._is_static(t)]
        weights = [(t, ax) for t, ax in tensors if self._is_static(t)]
        act_bits = max((grid_bits(t) for t in acts), default=0)
        act_numel = sum(t.numel() for t in acts) // self.batch
        w_numel = sum(t.numel() for t, _ in weights)
        w_bits = max((grid_bits(t, ax) for t, ax in weights), default=None) if weights else None
        return act_numel, act_bits, w_numel, w_bits

    def _describe(self, name: str, args, out) -> List[MacOp]:
        if name in _CONV:
            x, w = args[0], args[1]
            macs = out.numel() * math.prod(w.shape[1:]) / self.batch
            a_n, a_b, w_n, w_b = self._operands([(x, None), (w, 0)])
            return [MacOp("conv", name, macs, a_n, a_b, w_n, w_b)]
        if name in _MM:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            k = a.shape[-1]
            macs = out.numel() * k / self.batch
            # a weight's output channels: columns of b (x @ w.T), rows of a (w @ x)
            a_n, a_b, w_n, w_b = self._operands([(a, a.dim() - 2), (b, b.dim() - 1)])
            return [MacOp("matmul", name, macs, a_n, a_b, w_n, w_b)]
        q, k, v = args[0], args[1], args[2]
        lq, s, e, ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        heads = q.numel() // (lq * e)
        qkv_n, qkv_b, _, _ = self._operands([(q, None), (k, None), (v, None)])
        # one op, as qcard's tracer records it (q.k^T and P.V); the softmax output P never leaves the
        # fused kernel: P.V multiplies a float operand whatever grid q, k and v are on
        return [MacOp("attention", name, heads * lq * s * (e + ev) / self.batch, qkv_n, FP32,
                      note=f"P (softmax output) stays FP32 inside the fused attention kernel; q, k, v on "
                           f"{'FP32' if qkv_b >= FP32 else f'{qkv_b}-bit grids'}")]


@contextlib.contextmanager
def mha_fast_path_off():
    """nn.MultiheadAttention's inference fast path (aten._native_multi_head_attention, taken in eval mode) is
    one fused kernel that torch's flop counter does not count and whose projections no capture can see;
    with it off the same module runs its in-projection, attention and out-projection as separate ops."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def capture_mac_ops(model: torch.nn.Module, x: torch.Tensor) -> List[MacOp]:
    """Every MAC op of one forward pass of `model` on batch `x`, with its operands' grid bits."""
    mode = _Capture(x, int(x.shape[0]))
    with torch.no_grad(), mha_fast_path_off(), mode:
        model(x)
    return mode.ops


def align(records: Sequence[Any], ops: Sequence[MacOp]) -> Tuple[List[Tuple[Any, MacOp]], List[Any], List[MacOp]]:
    """Pair the traced layer records that have MACs with the captured ops, in execution order and with
    equal MACs: (pairs, records left unpaired, ops left unpaired). A fused attention kernel is one op for
    two records where the model was traced with them apart (eager placement keeps timm's
    F.scaled_dot_product_attention whole, while the card lists q.k^T and P.V): both records pair with it."""
    pairs, lost_r, lost_o = [], [], []
    j = i = 0
    while i < len(records):
        r = records[i]
        window = range(j, min(j + 4, len(ops)))
        k = next((k for k in window if abs(ops[k].macs - r.macs) <= 0.5), None)
        if k is None and i + 1 < len(records):
            both = r.macs + records[i + 1].macs
            k = next((k for k in window if ops[k].kind == "attention" and abs(ops[k].macs - both) <= 0.5), None)
            if k is not None:
                lost_o.extend(ops[j:k])
                pairs += [(r, ops[k]), (records[i + 1], ops[k])]
                j, i = k + 1, i + 2
                continue
        if k is None:
            lost_r.append(r)
            i += 1
            continue
        lost_o.extend(ops[j:k])
        pairs.append((r, ops[k]))
        j, i = k + 1, i + 1
    lost_o.extend(ops[j:])
    return pairs, lost_r, lost_o


# --------------------------------------------------------------------------- flop counter, params in use


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """MACs of one forward pass of batch-1 `x` by torch's FlopCounterMode (FLOPs / 2), per aten op."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)
    # torch's registry covers the CUDA fused-attention kernels only; the CPU one gets torch's own formula
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: cpu_sdpa_flops} if cpu_sdpa is not None else None)
    with torch.no_grad(), mha_fast_path_off(), counter:
        model(x)
    per_op = {str(k): int(v) // 2 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"macs": counter.get_total_flops() // 2, "per_op": per_op}


def params_in_use(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Parameters of the modules whose forward ran on `x` (their own, not their children's)."""
    ran: set = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _a: ran.add(id(mod))) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    seen: set = set()
    total = 0
    for m in model.modules():
        if id(m) not in ran:
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# --------------------------------------------------------------------------- integer MACs on the runtime

INTEGER_KERNELS = {"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}
FLOAT_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                 "ConvTranspose", "Attention", "MultiHeadAttention"}
_WEIGHT_INPUT = {"QLinearConv": 3, "ConvInteger": 1, "Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1,
                 "ConvTranspose": 1}


def _shapes(entries) -> List[List[int]]:
    return [list(next(iter(e.values()))) for e in entries or []]


def _node_macs(op: str, ins: List[List[int]], outs: List[List[int]], weight: Optional[List[int]] = None) -> int:
    """MACs of one kernel call. `weight`: the conv weight's dims from the graph (the profile leaves out an
    initializer the kernel pre-packed, e.g. QLinearConv's int8 weight, and its input list then shifts)."""
    if not outs:
        return 0
    out_numel = math.prod(outs[0])
    if op in _WEIGHT_INPUT:
        w = weight if weight is not None else ins[_WEIGHT_INPUT[op]]
        return int(out_numel * math.prod(w[1:]))
    if op in ("Attention", "MultiHeadAttention", "QAttention"):
        return 0                       # not produced by qcard's exporter; counted as unknown
    a = ins[0]
    return int(out_numel * a[-1])


def runtime_mac_share(optimized_onnx: str, x, threads: int = 1) -> Dict[str, Any]:
    """Run the runtime-optimized graph once with profiling and split the conv/gemm/matmul MACs of the
    nodes that ran into integer and float kernels (shapes from onnxruntime's own profile)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # already optimized
    so.enable_profiling = True
    so.log_severity_level = 3
    prefix = str(Path(optimized_onnx).with_suffix(""))
    so.profile_file_prefix = prefix
    sess = ort.InferenceSession(str(optimized_onnx), so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    import onnx
    graph = onnx.load(str(optimized_onnx)).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    weight_of = {n.name: dims.get(n.input[_WEIGHT_INPUT[n.op_type]]) for n in graph.node
                 if n.op_type in _WEIGHT_INPUT and len(n.input) > _WEIGHT_INPUT[n.op_type]}
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    Path(prof).unlink(missing_ok=True)
    integer = flt = 0
    float_ops: Dict[str, int] = {}
    int_ops: Dict[str, int] = {}
    seen = set()
    for ev in events:
        args = ev.get("args") or {}
        op = args.get("op_name")
        if ev.get("cat") != "Node" or op is None or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        node = ev["name"][:-len("_kernel_time")]
        if node in seen or (op not in INTEGER_KERNELS and op not in FLOAT_KERNELS):
            continue
        seen.add(node)
        macs = _node_macs(op, _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape")),
                          weight_of.get(node))
        if op in INTEGER_KERNELS:
            integer += macs
            int_ops[op] = int_ops.get(op, 0) + 1
        else:
            flt += macs
            float_ops[op] = float_ops.get(op, 0) + 1
    total = integer + flt
    return {"share": integer / total if total else None, "integer": integer, "float": flt,
            "integer_ops": int_ops, "float_ops": float_ops}


# --------------------------------------------------------------------------- where runtime and simulation part

def runtime_divergence(qdq_onnx: str, x, sim_logits, probes: int = 8) -> Dict[str, Any]:
    """Where an exported model's runtime outputs leave the simulation's. The QDQ graph run with every
    onnxruntime optimization off computes in float what the simulation computes (the reference); run
    optimized, its QDQ pairs become integer kernels. Returns both argmax agreements with the simulation
    on x and, at `probes` activation tensors spread over the graph (in topological order), the largest and
    mean |optimized - reference| in that tensor's quantization steps."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    model = onnx.load(str(qdq_onnx))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    acts = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]

    def run(level, extra=None):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        if extra:
            m.graph.output.append(helper.make_tensor_value_info(extra, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})

    off, on = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sim_arg = np.asarray(sim_logits).argmax(1)
    ref, opt = run(off)[0], run(on)[0]
    out = {"images": int(len(x)), "reference_agreement": float((ref.argmax(1) == sim_arg).mean()),
           "optimized_agreement": float((opt.argmax(1) == sim_arg).mean()),
           "optimized_vs_reference": float((opt.argmax(1) == ref.argmax(1)).mean()), "probes": []}
    picks = sorted({int(i) for i in np.linspace(0, len(acts) - 1, min(probes, len(acts)))}) if acts else []
    for i in picks:
        n = acts[i]
        scale = inits.get(n.input[1])
        step = float(numpy_helper.to_array(scale).reshape(-1)[0]) if scale is not None else 1.0
        a, b = run(off, n.output[0])[1], run(on, n.output[0])[1]
        d = np.abs(a - b) / step
        out["probes"].append({"tensor": n.output[0].replace("/DequantizeLinear_output_0", ""), "index": i,
                              "of": len(acts), "max_steps": float(d.max()), "mean_steps": float(d.mean())})
    return out
