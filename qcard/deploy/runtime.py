"""onnxruntime: sessions, the ops that ran as integer kernels, their share of the MACs, and latency."""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import QcardError

__all__ = ["require_runtime", "runtime_version", "make_session", "op_counts", "latency", "Timing", "integer_macs",
           "INSTALL_HINT", "EXECUTION_PROVIDER", "SPREAD_SMALL"]

INSTALL_HINT = "pip install 'qcard[deploy]'"
EXECUTION_PROVIDER = "CPUExecutionProvider"

# kernels that compute on integers (ONNX standard and onnxruntime's com.microsoft contrib ops)
INTEGER_OPS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "NhwcQLinearConv", "QLinearConvTranspose"})
# conv/gemm/matmul kernels in float (onnxruntime's fused and layout-transformed forms included)
FLOAT_COMPUTE = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                           "NchwcConv", "MatMulNBits"})
# compute ops that, when still present after fusion, ran in float
FLOAT_OPS = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Sum", "Mul",
    "Concat", "AveragePool", "GlobalAveragePool", "Softmax", "LayerNormalization", "Gelu", "BiasGelu",
    "Sigmoid", "Tanh", "Erf", "BatchNormalization"})


def require_runtime():
    """(onnx, onnxruntime), or a QcardError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise QcardError(f"the deploy check needs onnx and onnxruntime ({exc.name} is not installed); "
                         f"install them with: {INSTALL_HINT}") from exc
    return onnx, onnxruntime


def runtime_version() -> str:
    return require_runtime()[1].__version__


def make_session(path: str, threads: int, optimized_path: Optional[str] = None):
    """A CPU session with all graph optimizations (QDQ fused into integer kernels), `threads` intra-op."""
    ort = require_runtime()[1]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3                       # the optimized-model notice is expected, not a warning
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=[EXECUTION_PROVIDER])


def op_counts(optimized_path: str) -> Tuple[Dict[str, int], Dict[str, int]]:
    """({integer kernel: count}, {float compute op left: count}) in the model the runtime optimized."""
    onnx = require_runtime()[0]
    ops = Counter(n.op_type for n in onnx.load(str(optimized_path)).graph.node)
    return ({k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
            {k: v for k, v in sorted(ops.items()) if k in FLOAT_OPS})


def run(session, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


# relative spread ((q3 - q1) / median of the per-call speedups) under which the timing may stop early;
# above it when the time budget ends, the card flags the row
SPREAD_SMALL = 0.10


@dataclass
class Timing:
    """Wall times (ms) of one call per session, the sessions called in turns, run by run."""
    times: List[List[float]]
    seconds: float                      # wall time of the timed runs

    def median(self, i: int) -> float:
        return statistics.median(self.times[i])

    def quartiles(self, values: Sequence[float]) -> Tuple[float, float]:
        if len(values) < 2:
            return (values[0], values[0])
        q = statistics.quantiles(values, n=4, method="inclusive")
        return q[0], q[2]

    def ratios(self) -> List[float]:
        """Per run: the second session's time / the first's (FP32 / QDQ: the measured speedup of that run)."""
        return [b / a for a, b in zip(self.times[0], self.times[1]) if a > 0]

    def spread(self) -> float:
        r = self.ratios()
        if len(r) < 2:
            return float("inf")
        q1, q3 = self.quartiles(r)
        return (q3 - q1) / statistics.median(r)


def latency(sessions, x: np.ndarray, min_runs: int, budget_s: float, warmup: int = 3,
            max_runs: int = 10000, clock=time.perf_counter) -> Timing:
    """Times one call on batch x per session, the sessions taking turns call by call (so load from other
    processes hits them alike), after `warmup` untimed calls. At least `min_runs` runs; then runs go on
    while the spread of the per-run speedup is above SPREAD_SMALL and `budget_s` seconds have not passed."""
    for _ in range(warmup):
        for s in sessions:
            run(s, x)
    timing = Timing([[] for _ in sessions], 0.0)
    start = clock()
    while True:
        for i, s in enumerate(sessions):
            t = clock()
            run(s, x)
            timing.times[i].append((clock() - t) * 1000.0)
        timing.seconds = clock() - start
        n = len(timing.times[0])
        if n >= max_runs or (n >= min_runs and (timing.seconds >= budget_s or timing.spread() <= SPREAD_SMALL)):
            return timing


# ------------------------------------------------------------------------------------------ MACs

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")     # the exported graph's conv/gemm/matmul nodes


def _node_macs(node, shapes_in: List[List[int]], shapes_out: List[List[int]]) -> int:
    """Multiply-accumulates of one conv/gemm/matmul call, from the shapes the runtime saw."""
    out = int(np.prod(shapes_out[0])) if shapes_out and shapes_out[0] else 0
    if node.op_type == "Conv":
        return out * int(np.prod(shapes_in[1][1:]))
    if node.op_type == "ConvTranspose":        # weight (C_in, C_out/g, k...): each input value feeds them all
        return int(np.prod(shapes_in[0])) * int(np.prod(shapes_in[1][1:]))
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return out * int(shapes_in[0][0 if trans_a else 1])
    return out * int(shapes_in[0][-1])          # MatMul: (..., M, K) x (..., K, N)


def _profile_shapes(path: str, x: np.ndarray) -> Dict[str, Tuple[List[List[int]], List[List[int]]]]:
    """{node name: (input shapes, output shapes)} of one unoptimized call on x, from onnxruntime's profile."""
    ort = require_runtime()[1]
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=[EXECUTION_PROVIDER])
        run(session, x)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    shapes = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "input_type_shape" in args and e.get("name", "").endswith("_kernel_time"):
            flat = lambda lst: [next(iter(d.values())) for d in lst]      # noqa: E731  [{"float": shape}] -> shapes
            shapes[e["name"][:-len("_kernel_time")]] = (flat(args["input_type_shape"]),
                                                        flat(args.get("output_type_shape") or []))
    return shapes


def _layer_name(node: str) -> str:
    """'/layer1/conv2/Conv' -> 'layer1.conv2' (the exporter names nodes by module path)."""
    parts = node.strip("/").split("/")
    return ".".join(parts[:-1]) or node


def integer_macs(path: str, optimized_path: str, x: np.ndarray) -> Dict[str, Any]:
    """The share of the exported graph's conv/gemm/matmul MACs (per image of x's shape, batch 1) that the
    optimized graph runs on integer kernels: {"share", "integer", "float", "float_ops", "float_layers"}.
    MACs come from the shapes onnxruntime saw on one call of the unoptimized graph; a node is matched to
    the kernel that replaced it by name (onnxruntime keeps it, adding _token_N suffixes) or by its weight."""
    onnx = require_runtime()[0]
    graph = onnx.load(str(path)).graph
    opt = onnx.load(str(optimized_path)).graph
    shapes = _profile_shapes(path, x[:1])
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    by_key: Dict[str, int] = {}
    nodes = [n for n in graph.node if n.op_type in COMPUTE_OPS]
    for i, n in enumerate(nodes):
        by_key[n.name] = i
        dq = producer.get(n.input[1]) if len(n.input) > 1 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            by_key[n.input[1]] = by_key[dq.input[0]] = i          # the weight, dequantized or integer
    ran: Dict[int, str] = {}
    for m in opt.node:
        if m.op_type not in INTEGER_OPS and m.op_type not in FLOAT_COMPUTE:
            continue                              # a DequantizeLinear left beside a float conv, a Transpose...
        base = re.sub(r"(_token_\d+)+$", "", m.name)
        hits = {by_key[k] for k in [base, *m.input] if k in by_key}
        for i in hits:
            if m.op_type in INTEGER_OPS or i not in ran:
                ran[i] = m.op_type
    out = {"share": None, "integer": 0, "float": 0, "float_ops": [], "float_layers": [], "unknown": []}
    float_ops: Counter = Counter()
    for i, n in enumerate(nodes):
        if n.name not in shapes:
            out["unknown"].append(n.name)
            continue
        macs = _node_macs(n, *shapes[n.name])
        op = ran.get(i)
        if op in INTEGER_OPS:
            out["integer"] += macs
        else:
            out["float"] += macs
            float_ops[op or f"{n.op_type} (no kernel found after optimization)"] += 1
            out["float_layers"].append(_layer_name(n.name))
    out["float_ops"] = sorted(float_ops)
    out["float_op_counts"] = dict(sorted(float_ops.items()))
    total = out["integer"] + out["float"]
    out["share"] = round(out["integer"] / total, 6) if total else None
    return out
