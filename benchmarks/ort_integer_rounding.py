"""Where onnxruntime's integer convolution parts from the float QDQ graph: one layer, exact arithmetic as judge.

Builds one QDQ convolution (uint8 activations, per-channel int8 weights, a float bias, a uint8 output grid)
with onnx.helper, runs it on onnxruntime with every graph optimization off (DequantizeLinear -> float Conv ->
QuantizeLinear: the simulation's arithmetic) and on (fused into QLinearConv: integer kernels), and compares
both with the exact result computed in numpy (int64 accumulation, requantization in float64, round half to
even and half away from zero):
  - "float bias": round((s_in·s_w·acc + b) / s_out), what the graph says and what the simulation computes;
  - "int32 bias": round(s_in·s_w·(acc + round(b / (s_in·s_w))) / s_out), the bias on the accumulator's grid.
The integer kernel is exact to the second, the float graph to the first: the two part on the values that
the bias's rounding (at most half an accumulator step) carries across a rounding boundary of the output.
With the bias put on that grid first (--on-grid, what qcard's runner does: qcard.quant.int_bias) all agree.

    python benchmarks/ort_integer_rounding.py [--channels 144] [--out-channels 24] [--seed 0] [--on-grid]
"""
from __future__ import annotations

import argparse

import numpy as np


def build(cin: int, cout: int, rng, on_grid: bool):
    """(onnx model, its parameters) of input -> Q -> DQ -> Conv 1x1 (DQ'd int8 weights, float bias) -> Q -> DQ."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    s_in = np.float32(0.0158)                                            # an activation grid after ReLU6
    w = rng.integers(-127, 128, size=(cout, cin, 1, 1)).astype(np.int8)
    s_w = (rng.uniform(0.5, 2.0, cout) * 2e-3).astype(np.float32)        # per-channel weight steps
    step = s_in * s_w                                                    # float32, as the runtime forms it
    bias = (rng.normal(0, 1, cout) * 0.3).astype(np.float32)
    if on_grid:
        bias = (np.round(bias / step) * step).astype(np.float32)
    s_out = np.float32(0.04)
    z_out = np.uint8(126)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (s_in, "s_in"), (np.uint8(0), "z_in"), (w, "w_q"), (s_w, "s_w"), (np.zeros(cout, np.int8), "z_w"),
        (bias, "bias"), (s_out, "s_out"), (z_out, "z_out"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["y"], name="conv"),
             helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["y_q"])]
    graph = helper.make_graph(nodes, "one_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, "h", "w"])],
                              [helper.make_tensor_value_info("y_q", TensorProto.UINT8, ["n", cout, "h", "w"]),
                               helper.make_tensor_value_info("x_q", TensorProto.UINT8, ["n", cin, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model, dict(s_in=s_in, w=w, s_w=s_w, bias=bias, s_out=s_out, z_out=z_out)


def run(model, x, optimized: bool):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    kernels = None
    if optimized:
        import onnx
        import tempfile
        import os
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            kernels = sorted({n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node})
    y_q, x_q = s.run(None, {"x": x})
    return y_q, x_q, kernels


def exact(x_q, p, int32_bias: bool, away: bool) -> np.ndarray:
    """The output codes in exact integer accumulation, requantized in float64 (float32 scales are exact there)."""
    acc = np.einsum("nchw,oc->nohw", x_q.astype(np.int64), p["w"][:, :, 0, 0].astype(np.int64))
    s_in, s_w, s_out = np.float64(p["s_in"]), p["s_w"].astype(np.float64), np.float64(p["s_out"])
    step = (p["s_in"] * p["s_w"]).astype(np.float64)                      # the runtime's float32 product
    b = p["bias"].astype(np.float64)
    if int32_bias:
        v = (acc + np.round(b / step).reshape(1, -1, 1, 1)) * (step / s_out).reshape(1, -1, 1, 1)
    else:
        v = (acc * (s_in * s_w).reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)) / s_out
    r = np.sign(v) * np.floor(np.abs(v) + 0.5) if away else np.round(v)
    return np.clip(r + int(p["z_out"]), 0, 255).astype(np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=144)
    ap.add_argument("--out-channels", type=int, default=24)
    ap.add_argument("--size", type=int, default=16, help="spatial size of the input (N=16 images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on-grid", action="store_true", help="put the float bias on the int32 grid first")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    model, p = build(args.channels, args.out_channels, rng, args.on_grid)
    # sparse non-negative activations, as after ReLU6: most codes small, some zero
    x = np.maximum(rng.normal(0.3, 1.0, (16, args.channels, args.size, args.size)), 0).astype(np.float32)
    y_off, x_off, _ = run(model, x, optimized=False)
    y_on, x_on, kernels = run(model, x, optimized=True)
    assert np.array_equal(x_off, x_on)
    step_ratio = (p["s_in"] * p["s_w"] / p["s_out"]).astype(np.float64)
    print(f"one 1x1 conv, {args.channels} -> {args.out_channels} channels, {y_on.size} output codes; bias "
          f"{'on' if args.on_grid else 'off'} the int32 grid; accumulator step / output step "
          f"{step_ratio.min():.4f}-{step_ratio.max():.4f}; optimized graph ran {', '.join(kernels)}")
    print(f"{'':28s}{'ORT unoptimized (float)':>26s}{'ORT optimized (integer)':>26s}")
    for name, int32 in (("exact, float bias", False), ("exact, int32 bias", True)):
        for away in (False, True):
            ref = exact(x_off, p, int32, away)
            cells = []
            for y in (y_off, y_on):
                d = np.abs(y.astype(np.int64) - ref)
                cells.append(f"{100 * (d > 0).mean():7.3f} % differ (max {d.max()})")
            print(f"{name + (', half away' if away else ', half even'):28s}{cells[0]:>26s}{cells[1]:>26s}")
    d = np.abs(y_off.astype(np.int64) - y_on)
    print(f"unoptimized vs optimized: {100 * (d > 0).mean():.3f} % of the codes differ (max {d.max()} step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
