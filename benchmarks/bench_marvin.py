"""MARViN training step time ÷ FP32 training step time, measured side by side in one run.

Both go through qcard.training.train with the same recipe (SGD, one optimizer step per mini-batch);
MARViN adds fixed-point stochastic rounding of every conv/linear/BN/avg-pool input, output and
parameter copy, gradient quantization/normalization and the per-layer switching tests. Steps are
timed with hooks; the first `--warmup` steps of each run are discarded. Runs alternate
(fp32, marvin, fp32, marvin, ...) so a change in machine load hits both.

Default: torchvision resnet18 with random weights, batch 16 of 3×224×224 random images (slow on a CPU;
use --steps to keep it short). Prints the median step times and their ratio.
Usage: python benchmarks/bench_marvin.py [--model torchvision:resnet18] [--batch 16] [--size 224]
                                         [--steps 5] [--warmup 1] [--repeats 2] [--threads 2]
"""
import argparse
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    ap.add_argument("--repeats", type=int, default=2, help="fp32/marvin pairs (more pairs: less noise)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.marvin import Marvin, MarvinController
    from qcard.training import TrainRecipe, train
    from qcard.zoo import load_model

    torch.set_num_threads(args.threads)
    n_steps = args.steps + args.warmup
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch * n_steps, 3, args.size, args.size, generator=gen)
    labels = torch.randint(0, 10, (args.batch * n_steps,), generator=gen)
    ds = torch.utils.data.TensorDataset(images, labels)
    data = PointData(ds, ds, 10, (3, args.size, args.size), batch_size=args.batch)
    recipe = TrainRecipe(epochs=1, batch_size=args.batch, max_steps=n_steps, schedule="none", lr=0.01)

    class Timer:
        def __init__(self):
            self.t, self.times = None, []

        def before_forward(self, state):
            self.t = time.perf_counter()

        def after_step(self, state):
            self.times.append(time.perf_counter() - self.t)

    def one(method):
        timer = Timer()
        model = load_model(args.model, weights="random", num_classes=10)
        ctx = RunContext(seed=0, progress=False, log=lambda m: None)
        hooks = [timer]
        if method == "marvin":     # what Marvin.apply does, with the timer as a second hook
            hooks.insert(0, MarvinController(model, data, Marvin.Params(train=recipe), ctx))
        train(model, data, recipe, ctx, hooks=hooks)
        return timer.times[args.warmup:]

    fp32, marvin = [], []
    for _ in range(args.repeats):
        fp32 += one("fp32")
        marvin += one("marvin")
    f, m = statistics.median(fp32), statistics.median(marvin)
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s), "
          f"{len(fp32)} timed step(s) each")
    print(f"fp32 step:   median {f:.3f} s  ({', '.join(f'{t:.2f}' for t in fp32)})")
    print(f"marvin step: median {m:.3f} s  ({', '.join(f'{t:.2f}' for t in marvin)})")
    print(f"ratio marvin / fp32: {m / f:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
