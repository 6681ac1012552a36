"""onnxruntime QDQ latency ÷ onnxruntime FP32 latency of the same model, beside the card's simulated speedup,
with the share of the conv/gemm/matmul MACs that ran on integer kernels and the runtime-vs-simulation
agreement (issues 12, 21).

    python benchmarks/bench_deploy.py [--runs 20] [--budget 5] [--threads 1] [--out DIR]

The points run through the runner with a deploy block, so the figures are exactly the cards': the bundled
qcard:resnet8 and qcard:mobilenet_tiny (trained on mnist5k; their outputs vary, so agreement means
something), PTQ per-channel min-max at W8A8, W4A8 (default export: int8 containers at opset 13), W4A8 with
`int4_weights: true` (int4 at opset 21) and W8A8 with eager placement. Each batch size is timed with at
least --runs runs of the QDQ graph and the same graph in FP32 called in turns (after 3 warm-up calls),
more while the per-run speedup's spread is above 10 % and --budget seconds last; the table gives medians
and [interquartile ranges].
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CONFIG = """
experiment: bench_deploy
seeds: [0]
models: [qcard:resnet8, qcard:mobilenet_tiny]
dataset: {{ref: qcard:mnist5k, eval_split: test, batch_size: 500, calibration: {{size: 256, seed: 0}}}}
deploy: {{runtime: onnxruntime, threads: {threads}, batch_sizes: [1, 32], latency_runs: {runs},
          latency_budget_s: {budget}}}
methods:
  - {{name: ptq, label: W8A8, params: {{w_bits: 8, a_bits: 8, w_granularity: per_channel, pipeline: minmax}}}}
  - {{name: ptq, label: W4A8, params: {{w_bits: 4, a_bits: 8, w_granularity: per_channel, pipeline: minmax}}}}
  - {{name: ptq, label: W4A8 int4, params: {{w_bits: 4, a_bits: 8, w_granularity: per_channel, pipeline: minmax}},
     deploy: {{threads: {threads}, batch_sizes: [1, 32], latency_runs: {runs}, latency_budget_s: {budget},
              int4_weights: true}}}}
  - {{name: ptq, label: W8A8 eager, params: {{w_bits: 8, a_bits: 8, w_granularity: per_channel, pipeline: minmax,
                                            graph_mode: eager}}}}
cost: {{profiles: [bitops]}}
"""


def _iqr(r, key):
    q = r.get(f"{key}_iqr")
    return f"[{q[0]:.3g}, {q[1]:.3g}]" if q else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    from qcard import provenance
    from qcard.runner import run
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = root / "bench_deploy.yaml"
        cfg.write_text(CONFIG.format(threads=a.threads, runs=a.runs, budget=a.budget))
        summary = run(str(cfg), out=str(root / "runs"), force=True, progress=False, log=lambda m: None)
        if not summary.ok:
            print(f"a point failed: {[o.error for o in summary.outcomes if o.error]}", file=sys.stderr)
            return 1
        cards = [json.loads((o.folder / "card.json").read_text()) for o in summary.outcomes]
    d0 = cards[0]["deployment"]
    print(f"onnxruntime {d0.get('runtime_version')}, CPUExecutionProvider, {a.threads} thread(s), at least "
          f"{a.runs} runs per batch (budget {a.budget:g} s); CPU: {provenance.cpu_name()}")
    print("| model | setting | opset | MACs on integer kernels | batch | QDQ ms [IQR] | FP32 ms | measured speedup "
          "[IQR] | runs | simulated | top-1 runtime / simulated | identical argmax (classes) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cards:
        d = c["deployment"]
        name, label = c["model"]["ref"], c["method"]["label"]
        if d["status"] != "ok":
            print(f"| {name} | {label} | {d['status']}: {d.get('reason')} |")
            continue
        share = d["integer_macs"]["share"]
        for r in d["latency"]:
            print(f"| {name} | {label} | {d['opset']} | {100 * share:.1f} % | {r['batch_size']} | "
                  f"{r['int8_ms']:.3g} {_iqr(r, 'int8_ms')} | {r['fp32_ms']:.3g} | {r['speedup']:.2f}× "
                  f"{_iqr(r, 'speedup')}{' large spread' if r['large_spread'] else ''} | {r['runs']} | "
                  f"{d['simulated_speedup'] or float('nan'):.2f}× | {d['top1']:.2f} / {d['top1_simulated']:.2f} | "
                  f"{100 * d['argmax_agreement']:.1f} % ({d['simulated_outputs']['argmax_classes']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
