"""Speed of block reconstruction, as ratios to plain FP32 work on the same machine (GPTQ: bench_gptq.py).

  block ratio   one reconstruction iteration of a block (BRECQ: soft-rounded weights, activation quantizers
                on with learned steps) ÷ one FP32 forward+backward of the same block at the same batch
                (target ≤ 3); QDrop's ratio too (its elementwise draws cost extra);
  1,000 iters   wall time of 1,000 iterations on every unit of the model (the measured per-iteration
                times × 1,000; MQBench runs 20,000);
  Adam step     for the unit with the most weights per sample (the classifier): one step of the engine's
                Adam on its rounding logits V (torch's default CPU implementation) and of fused Adam, the
                part of its iteration that no change to the rounding can remove.
Random weights and random images (timing does not depend on them); one thread unless --threads; the load
average is printed before and after (ratios are measured side by side, absolute times move with load).
Usage: python benchmarks/bench_reconstruction.py [--model torchvision:resnet18] [--size 224] [--batch 32]
       [--iters 10] [--only UNIT[,UNIT...]] [--device cpu] [--threads 1]
       [--out benchmarks/bench_reconstruction.json]   (bench_reconstruction.md: the figures, with the command)
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcard.quant.blocks import block_units                              # noqa: E402
from qcard.quant.calibrate import calibrate_activations, set_weight_ranges  # noqa: E402
from qcard.quant.graph import build_simulated                           # noqa: E402
from qcard.quant.reconstruct import Settings, UnitView, fp_copy, reconstruct  # noqa: E402
from qcard.quant.scheme import SimScheme                                # noqa: E402
from qcard.zoo import load_model                                        # noqa: E402

TARGET_BLOCK = 3.0


def _sim(ref, size, batches, device):
    model = load_model(ref).eval().to(device)
    sim = build_simulated(model, SimScheme(w_bits=4, a_bits=4, w_granularity="per_channel", w_symmetric=False,
                                           weight_range="mse", activation_range="minmax"),
                          batches[0][:1].to(device), log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, batches, device)
    return sim


def _fp_step_s(fp, unit, x, repeats=3, min_s=0.5, max_repeats=100):
    """Median of one FP32 forward+backward of the unit: at least `repeats` times, and for short steps (a
    classifier's ~1 ms) until min_s seconds were spent, so the median is not three noisy samples."""
    view = UnitView(fp, unit, {id(m): n for n, m in fp.named_modules()})
    for p in fp.parameters():
        p.requires_grad_(True)
    times = []
    while len(times) < repeats + 1 or (sum(times[1:]) < min_s and len(times) < max_repeats + 1):
        t = time.perf_counter()
        y = view(x)
        y.pow(2).sum().backward()
        times.append(time.perf_counter() - t)
        for p in fp.parameters():
            p.grad = None
    for p in fp.parameters():
        p.requires_grad_(False)
    return statistics.median(times[1:])


def _adam_step_s(numel, fused, device, repeats=10):
    v = torch.zeros(numel, device=device, requires_grad=True)
    v.grad = torch.randn(numel, device=device)
    opt = torch.optim.Adam([v], lr=1e-3, fused=fused)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _load():
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated unit names (default: every unit)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "bench_reconstruction.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    chans = 1 if a.model.startswith("qcard:") else 3
    batches = [torch.rand(a.batch, chans, a.size, a.size)]
    sim = _sim(a.model, a.size, batches, a.device)
    units = block_units(sim)
    if a.only:
        wanted = a.only.split(",")
        units = [u for u in units if u.name in wanted]
        if len(units) != len(wanted):
            ap.error(f"--only: no unit named {sorted(set(wanted) - {u.name for u in units})}; units: "
                     f"{', '.join(u.name for u in block_units(sim))}")
    fp = fp_copy(sim)
    load_before = _load()
    print(f"{a.model} at {a.size}², batch {a.batch}, {len(units)} units, {a.iters} iterations each, "
          f"{a.threads} thread(s), {a.device}; {load_before}")
    rec = reconstruct(sim, batches, Settings(iters=a.iters, batch_size=a.batch), device=a.device,
                      only=[u.name for u in units])
    qi = 1 if len(units) > 1 else 0                 # QDrop on the second unit (the first with --only one unit)
    sim_q = _sim(a.model, a.size, batches, a.device)
    rec_q = reconstruct(sim_q, batches, Settings(iters=a.iters, batch_size=a.batch, drop=True), device=a.device,
                        only=[units[qi].name])
    ratios, fp_times = [], []
    for u, row in zip(units, rec["per_unit"]):
        x = UnitView(fp, u, {id(m): n for n, m in fp.named_modules()}).inputs(batches, a.device)[:a.batch]
        fp_s = _fp_step_s(fp, u, x)
        ratios.append(row["iter_s"] / fp_s)
        fp_times.append(fp_s)
        print(f"  {u.name:40s} brecq {1000 * row['iter_s']:8.1f} ms/iter   FP32 fwd+bwd {1000 * fp_s:8.1f} ms   "
              f"ratio {row['iter_s'] / fp_s:5.2f}")
    q_row = rec_q["per_unit"][0]
    print(f"  qdrop on {units[qi].name}: {1000 * q_row['iter_s']:.1f} ms/iter "
          f"(brecq {1000 * rec['per_unit'][qi]['iter_s']:.1f})")
    total = sum(r["iter_s"] for r in rec["per_unit"]) * 1000
    print(f"block ratio: median {statistics.median(ratios):.2f}, max {max(ratios):.2f} (target ≤ {TARGET_BLOCK})")
    print(f"1,000 iterations on {'the selected units' if a.only else 'every unit'} of {a.model}: {total:.0f} s (from the per-iteration times)")
    sizes = [sum(m.weight.numel() for m in u.modules) for u in units]
    k = max(range(len(units)), key=lambda i: sizes[i] / fp_times[i])      # most weights per unit of FP work
    adam, adam_fused = _adam_step_s(sizes[k], False, a.device), _adam_step_s(sizes[k], True, a.device)
    print(f"{units[k].name} ({sizes[k]:,} weights): Adam step on V {1000 * adam:.2f} ms (fused {1000 * adam_fused:.2f} "
          f"ms) = {adam / fp_times[k]:.2f} (fused {adam_fused / fp_times[k]:.2f}) FP32 fwd+bwd of the unit")
    load_after = _load()
    print(load_after)
    Path(a.out).write_text(json.dumps({
        "model": a.model, "size": a.size, "batch": a.batch, "iters": a.iters, "threads": a.threads,
        "device": a.device, "load_before": load_before, "load_after": load_after,
        "units": [{"unit": u.name, "iter_s": row["iter_s"], "fp_s": f, "ratio": r}
                  for u, row, f, r in zip(units, rec["per_unit"], fp_times, ratios)],
        "block_ratio_median": statistics.median(ratios), "block_ratio_max": max(ratios),
        "qdrop_iter_s": q_row["iter_s"], "qdrop_unit": units[qi].name,
        "brecq_iter_s_same_unit": rec["per_unit"][qi]["iter_s"],
        "iters_1000_s": total, "adam_unit": units[k].name, "adam_step_s": adam, "adam_fused_step_s": adam_fused},
        indent=1) + "\n")
    return 2 if statistics.median(ratios) > TARGET_BLOCK else 0


if __name__ == "__main__":
    sys.exit(main())
