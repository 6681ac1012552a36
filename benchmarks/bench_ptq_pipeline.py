"""The standard PTQ pipeline's wall time ÷ one FP32 pass over the same calibration batches (issue 16 item 5).

    python benchmarks/bench_ptq_pipeline.py [--models resnet50,densenet121] [--images 16] [--batch 8]
                                            [--size 224] [--w-bits 8] [--a-bits 8] [--threads N]

torchvision models with random weights (the timing does not depend on the values), random images. The
pipeline is the ptq method's own: build the simulated model, then cle, bias_absorption, weight_ranges,
bias_correction (empirical), activation_ranges, each step timed. Both figures are measured side by side
in one run, so machine load hits them alike. Target: ratio <= 20 (a small constant number of passes,
not one per layer). Exit 2 when a model is over the target.

Measured on the shared 2-core machine (W8A8, 16 images):
  before (bias correction reran the model up to each layer), 3x112x112, 1 thread:
      resnet50 76.9x (bias correction 69 s of 98 s), densenet121 360x (210 s of 222 s)
  after (one node-by-node pass), 3x112x112, 1 thread: resnet50 13.9x, densenet121 13.0x
  after, 3x224x224, 2 threads: resnet50 15.0x, densenet121 9.6x (bias correction about 2 FP32 passes;
      the MSE weight ranges, which do not depend on the images, are now most of the time)
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

TARGET = 20.0


def _fp32_pass(model, xs) -> float:
    with torch.no_grad():
        model(xs[0][:1])                     # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        for x in xs:
            model(x)
    return time.perf_counter() - t0


def _pipeline(model, xs, w_bits: int, a_bits: int):
    from qcard.methods.base import RunContext
    from qcard.methods.ptq import PTQParams
    from qcard.methods.ptq.pipeline import build, run_steps
    p = PTQParams(w_bits=w_bits, a_bits=a_bits, pipeline="standard")
    ctx = RunContext(seed=0, progress=False, log=lambda msg: None)
    times = {}
    t0 = time.perf_counter()
    sim = build(model, p, xs, ctx)
    times["build"] = time.perf_counter() - t0
    stats: dict = {}
    for step in p.steps:
        t = time.perf_counter()
        run_steps(sim, p, [step], xs, ctx, stats)
        times[step] = time.perf_counter() - t
    return time.perf_counter() - t0, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,densenet121")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision
    over = False
    print(f"{args.images} calibration images of 3x{args.size}x{args.size} in batches of {args.batch}, "
          f"W{args.w_bits}A{args.a_bits}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        gen = torch.Generator().manual_seed(0)
        n, xs = args.images, []
        while n > 0:
            xs.append(torch.rand(min(args.batch, n), 3, args.size, args.size, generator=gen))
            n -= xs[-1].shape[0]
        fp = _fp32_pass(model, xs)
        total, times = _pipeline(model, xs, args.w_bits, args.a_bits)
        ratio = total / fp
        over |= ratio > TARGET
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
        print(f"{name}: FP32 pass {fp:.2f}s, standard pipeline {total:.1f}s = {ratio:.1f}x "
              f"(target <= {TARGET:g})  [{steps}]", flush=True)
    return 2 if over else 0


if __name__ == "__main__":
    sys.exit(main())
