"""SPARQ kernel speed, side by side with a plain 4-bit requantization of the same codes.

    python benchmarks/bench_sparq_kernels.py [--shape 16 64 56 56] [--threads 1] [--device cpu]

Prints milliseconds per call (median of --repeat runs) and ratios against the plain 4-bit
requantization torch.round(q / 16).clamp(0, 15) * 16 of the same codes. For context it also
times the whole fake-quant path a model would run (float x -> 8-bit codes -> SPARQ -> float,
against float x -> 4-bit fake quant) and a 3x3 conv (C -> C) on the same activation, since
the end-to-end target is SPARQ eval / plain A4 eval <= 1.5 on resnet18 at batch 16.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qcard.methods.sparq import SparqKernel, bsparq, vsparq


def _time(fn, repeat: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()
    fn()                                # warm-up: table build and caches
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 64, 56, 56])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    shape = tuple(args.shape)

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=g)).to(dev)     # ReLU output: about half zeros
    dx = float(x.max()) / 255
    q8 = torch.clamp(torch.round(x / dx), 0, 255).to(torch.uint8)
    zero = (q8 == 0).double().mean().item()
    print(f"shape {shape}  device {dev}  threads {torch.get_num_threads()}  torch {torch.__version__}  "
          f"zero fraction {zero:.3f}")

    rows = []
    for dtype in (torch.uint8, torch.int64):
        q = q8.to(dtype)
        plain = _time(lambda: torch.round(q / 16).clamp(0, 15) * 16, args.repeat, dev)
        vs = _time(lambda: vsparq(q), args.repeat, dev)
        bs = _time(lambda: bsparq(q), args.repeat, dev)
        k = SparqKernel("sparq", track_stats=True)
        vs_stats = _time(lambda: k(q), args.repeat, dev)
        name = str(dtype).replace("torch.", "")
        rows.append((f"plain 4-bit requant ({name})", plain, 1.0))
        rows.append((f"vsparq 4b/5opt/round ({name})", vs, vs / plain))
        rows.append((f"bsparq 4b/5opt/round ({name})", bs, bs / plain))
        rows.append((f"vsparq + stats ({name})", vs_stats, vs_stats / plain))

    # whole fake-quant paths from float activations (one full-size buffer for plain A4)
    dx4 = float(x.max()) / 15
    fq_plain = _time(lambda: torch.div(x, dx4).round_().clamp_(0, 15).mul_(dx4), args.repeat, dev)
    fq_naive = _time(lambda: vsparq(torch.clamp(torch.round(x / dx), 0, 255).to(torch.uint8)).float() * dx,
                     args.repeat, dev)
    fq_sparq = _time(lambda: SparqKernel().fake_quant(x, dx), args.repeat, dev)
    k_fq = SparqKernel(track_stats=True)
    fq_stats = _time(lambda: k_fq.fake_quant(x, dx), args.repeat, dev)
    rows.append(("fake-quant: plain A4 (float x, in place)", fq_plain, 1.0))
    rows.append(("fake-quant: x -> uint8 -> vsparq -> float", fq_naive, fq_naive / fq_plain))
    rows.append(("fake-quant: SparqKernel.fake_quant", fq_sparq, fq_sparq / fq_plain))
    rows.append(("fake-quant: SparqKernel.fake_quant + stats", fq_stats, fq_stats / fq_plain))
    if len(shape) == 4:
        conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False).to(dev)
        with torch.no_grad():
            t_conv = _time(lambda: conv(x), max(3, args.repeat // 3), dev)
        rows.append((f"conv3x3 {shape[1]}->{shape[1]} (float x, context)", t_conv, t_conv / fq_plain))

    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  {'ms':>9}  ratio")
    for name, ms, ratio in rows:
        print(f"{name:{w}}  {ms:9.2f}  {ratio:5.2f}")
    for name, ms, ratio in rows:
        if name.startswith("vsparq 4b"):
            print(f"RATIO {name}: vsparq / plain 4-bit requant = {ratio:.2f}")
    print(f"RATIO fake-quant path: SparqKernel.fake_quant / plain A4 = {fq_sparq / fq_plain:.2f}")


if __name__ == "__main__":
    main()
