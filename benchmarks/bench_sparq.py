"""SPARQ evaluation speed against plain A4 fake quantization, side by side in one run.

    python benchmarks/bench_sparq.py [--model resnet18] [--batch 16] [--size 224] [--threads 2]
                                     [--repeat 7] [--calibration 32] [--variant sparq]

Both models come from the same torchvision architecture with the same random weights and the same
calibration (the sparq method with variant=a4 and variant=sparq, paper base, on synthetic images);
each timed call is one forward pass of a batch in inference mode (statistics collection off, as in
the runner's evaluation). Timings alternate between the two models and the median is reported, so
that load on a shared machine hits both alike. Target: SPARQ / A4 <= 1.5.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def build(args):
    import torchvision

    from qcard.data import load_dataset
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.sparq import SPARQ

    torch.manual_seed(0)
    base = torchvision.models.get_model(args.model).eval()
    shape = (3, args.size, args.size)
    train = load_dataset("synthetic", "train", input_shape=shape, num_classes=1000, size=args.calibration, seed=0)
    data = PointData(train, train, 1000, shape, batch_size=args.batch,
                     calibration_size=args.calibration)
    models = {"fp32": base}
    for variant in ("a4", args.variant):
        params = SPARQ.Params(variant=variant, calibration_batch_size=args.batch, stats_size=args.batch)
        t0 = time.perf_counter()
        res = SPARQ().apply(copy.deepcopy(base), data, params, RunContext(seed=0, progress=False, log=lambda m: None))
        models[variant] = res.model.eval()
        print(f"  apply {variant:<6} {time.perf_counter() - t0:6.1f} s (calibration {args.calibration} images)")
    return models, shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--variant", default="sparq", choices=["sparq", "bsparq", "vsparq", "a8"])
    ap.add_argument("--target", type=float, default=1.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bench_sparq: torchvision:{args.model} (random weights), batch {args.batch}, "
          f"{args.size}x{args.size}, CPU, {args.threads} thread(s), torch {torch.__version__}")
    models, shape = build(args)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():          # warm-up: tables, allocator
            m(x)
        for _ in range(args.repeat):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"  (fp32 is the unquantized model, for context)")
    for k, v in med.items():
        print(f"  {k:<6} eval {v:8.1f} ms/batch (median of {args.repeat})")
    ratio = med[args.variant] / med["a4"]
    ok = ratio <= args.target
    print(f"ratio {args.variant}/a4 = {ratio:.3f} (target <= {args.target}) {'OK' if ok else 'OVER TARGET'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
