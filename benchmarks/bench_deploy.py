"""onnxruntime int8 latency ÷ onnxruntime FP32 latency of the same W8A8 model, beside the card's simulated
speedup (issue 12).

    python benchmarks/bench_deploy.py [--runs 10] [--threads 1] [--out DIR]

Two points run through the runner with a deploy block, so the figures are exactly the card's:
torchvision resnet18 (random weights, synthetic 3x224x224 images) and the bundled qcard:resnet8 (mnist5k),
PTQ W8A8 per-channel min-max. For each, the QDQ graph and the same graph in FP32 are timed side by side
(same runtime, same threads, the two graphs called in turns, median of --runs after 3 warm-up runs) at
batch 1 and 32.

Measured on the shared 2-core machine (AMD EPYC, onnxruntime 1.32.0, 1 thread, --runs 10):
  model     batch  int8 ms  FP32 ms  measured  simulated  top-1 rt / sim  identical argmax
  resnet18      1    10.04    33.99     3.38x      4.00x  (random)        100 % of 32
  resnet18     32   301.15  1031.50     3.42x      4.00x  (random)        100 % of 32
  resnet8       1     0.11     0.18     1.68x      4.00x  98.60 / 98.60   99.8 % of 1,000
  resnet8      32     2.84     5.37     1.89x      4.00x  98.60 / 98.60   99.8 % of 1,000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CONFIG = """
experiment: {name}
seeds: [0]
models: [{model}]
dataset: {dataset}
methods:
  - {{name: ptq, label: W8A8, params: {{w_bits: 8, a_bits: 8, w_granularity: per_channel, pipeline: minmax}},
     deploy: {{runtime: onnxruntime, threads: {threads}, batch_sizes: [1, 32], latency_runs: {runs}}}}}
cost: {{profiles: [bitops, asic45]}}
"""

POINTS = [
    ("resnet18", "torchvision:resnet18",
     "{ref: synthetic, input_shape: [3, 224, 224], num_classes: 1000, size: 32, batch_size: 32, "
     "calibration: {size: 32, seed: 0}}"),
    ("resnet8", "qcard:resnet8",
     "{ref: qcard:mnist5k, eval_split: test, batch_size: 500, calibration: {size: 256, seed: 0}}"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    from qcard import provenance
    from qcard.runner import run
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for name, model, dataset in POINTS:
            cfg = root / f"bench_deploy_{name}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(CONFIG.format(name=f"bench_deploy_{name}", model=model, dataset=dataset,
                                         threads=a.threads, runs=a.runs))
            summary = run(str(cfg), out=str(root / "runs"), force=True, progress=False, log=lambda m: None)
            if not summary.ok:
                print(f"{name}: the point failed: {summary.outcomes[0].error}", file=sys.stderr)
                return 1
            card = json.loads((summary.outcomes[0].folder / "card.json").read_text())
            rows.append((name, card["deployment"]))
    print(f"onnxruntime {rows[0][1].get('runtime_version')}, CPUExecutionProvider, {a.threads} thread(s), "
          f"median of {a.runs} runs; CPU: {provenance.cpu_name()}")
    print(f"{'model':<10} {'batch':>5} {'int8 ms':>10} {'FP32 ms':>10} {'measured':>9} {'simulated':>9}  "
          f"{'top-1 rt / sim':>16} {'argmax =':>8}")
    for name, d in rows:
        if d["status"] != "ok":
            print(f"{name:<10} {d['status']}: {d.get('reason')}")
            continue
        for r in d["latency"]:
            print(f"{name:<10} {r['batch_size']:>5} {r['int8_ms']:>10.3f} {r['fp32_ms']:>10.3f} "
                  f"{r['speedup']:>8.2f}x {d['simulated_speedup'] or float('nan'):>8.2f}x  "
                  f"{d['top1']:>7.2f} / {d['top1_simulated']:<6.2f} {100 * d['argmax_agreement']:>7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
