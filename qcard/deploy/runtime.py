"""onnxruntime: sessions, the ops that ran as integer kernels, and latency."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import QcardError

__all__ = ["require_runtime", "runtime_version", "make_session", "op_counts", "latency_ms", "INSTALL_HINT",
           "EXECUTION_PROVIDER"]

INSTALL_HINT = "pip install 'qcard[deploy]'"
EXECUTION_PROVIDER = "CPUExecutionProvider"

# kernels that compute on integers (ONNX standard and onnxruntime's com.microsoft contrib ops)
INTEGER_OPS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "NhwcQLinearConv", "QLinearConvTranspose"})
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


def latency_ms(sessions, x: np.ndarray, runs: int, warmup: int = 3) -> List[float]:
    """Median wall time of one call on batch x, in milliseconds, per session, after `warmup` untimed calls.
    The sessions take turns call by call, so load from other processes hits them alike."""
    for _ in range(warmup):
        for s in sessions:
            run(s, x)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(int(runs)):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            run(s, x)
            times[i].append((time.perf_counter() - t) * 1000.0)
    return [statistics.median(t) for t in times]
