"""Speed of block reconstruction and GPTQ, as ratios to plain FP32 work on the same machine.

  block ratio   one reconstruction iteration of a block (BRECQ: soft-rounded weights, activation quantizers
                on with learned steps) ÷ one FP32 forward+backward of the same block at the same batch
                (target ≤ 3); QDrop's ratio too (its elementwise draws cost extra);
  1,000 iters   wall time of 1,000 iterations on every unit of the model (the measured per-iteration
                times × 1,000; MQBench runs 20,000);
  GPTQ ratio    GPTQ over the whole model ÷ one calibration pass over the same images (target ≤ 10).
Random weights and random images (timing does not depend on them); one thread unless --threads.
Usage: python benchmarks/bench_reconstruction.py [--model torchvision:resnet18] [--size 224] [--batch 32]
       [--iters 10] [--gptq-model torchvision:resnet50] [--gptq-images 32] [--device cpu] [--threads 1]
       [--out benchmarks/bench_reconstruction.json]   (bench_reconstruction.md: the figures, with the command)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcard.quant.blocks import block_units                              # noqa: E402
from qcard.quant.calibrate import calibrate_activations, run_batches, set_weight_ranges  # noqa: E402
from qcard.quant.gptq import gptq                                       # noqa: E402
from qcard.quant.graph import build_simulated                           # noqa: E402
from qcard.quant.reconstruct import Settings, UnitView, fp_copy, reconstruct  # noqa: E402
from qcard.quant.scheme import SimScheme                                # noqa: E402
from qcard.zoo import load_model                                        # noqa: E402

TARGET_BLOCK, TARGET_GPTQ = 3.0, 10.0


def _sim(ref, size, batches, device):
    model = load_model(ref).eval().to(device)
    sim = build_simulated(model, SimScheme(w_bits=4, a_bits=4, w_granularity="per_channel", w_symmetric=False,
                                           weight_range="mse", activation_range="minmax"),
                          batches[0][:1].to(device), log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, batches, device)
    return sim


def _fp_step_s(fp, unit, x, repeats):
    view = UnitView(fp, unit, {id(m): n for n, m in fp.named_modules()})
    for p in fp.parameters():
        p.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        y = view(x)
        y.pow(2).sum().backward()
        times.append(time.perf_counter() - t)
        for p in fp.parameters():
            p.grad = None
    for p in fp.parameters():
        p.requires_grad_(False)
    return statistics.median(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gptq-model", default="torchvision:resnet50")
    ap.add_argument("--gptq-images", type=int, default=32)
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
    fp = fp_copy(sim)
    print(f"{a.model} at {a.size}², batch {a.batch}, {len(units)} units, {a.iters} iterations each, "
          f"{a.threads} thread(s), {a.device}")
    rec = reconstruct(sim, batches, Settings(iters=a.iters, batch_size=a.batch), device=a.device)
    sim_q = _sim(a.model, a.size, batches, a.device)
    rec_q = reconstruct(sim_q, batches, Settings(iters=a.iters, batch_size=a.batch, drop=True), device=a.device,
                        only=[units[1].name])
    ratios = []
    for u, row in zip(units, rec["per_unit"]):
        x = UnitView(fp, u, {id(m): n for n, m in fp.named_modules()}).inputs(batches, a.device)[:a.batch]
        fp_s = _fp_step_s(fp, u, x, 3)
        ratios.append(row["iter_s"] / fp_s)
        print(f"  {u.name:40s} brecq {1000 * row['iter_s']:8.1f} ms/iter   FP32 fwd+bwd {1000 * fp_s:8.1f} ms   "
              f"ratio {row['iter_s'] / fp_s:5.2f}")
    q_row = rec_q["per_unit"][0]
    print(f"  qdrop on {units[1].name}: {1000 * q_row['iter_s']:.1f} ms/iter "
          f"(brecq {1000 * rec['per_unit'][1]['iter_s']:.1f})")
    total = sum(r["iter_s"] for r in rec["per_unit"]) * 1000
    print(f"block ratio: median {statistics.median(ratios):.2f}, max {max(ratios):.2f} (target ≤ {TARGET_BLOCK})")
    print(f"1,000 iterations on every unit of {a.model}: {total:.0f} s (from the per-iteration times)")
    gchans = 1 if a.gptq_model.startswith("qcard:") else 3
    gb = [torch.rand(min(a.batch, a.gptq_images), gchans, a.size, a.size)
          for _ in range(max(1, a.gptq_images // a.batch))]
    gsim = _sim(a.gptq_model, a.size, gb, a.device)
    t = time.perf_counter()
    run_batches(gsim, gb, a.device)
    calib_s = time.perf_counter() - t
    g = gptq(gsim, gb, device=a.device)
    print(f"GPTQ on {a.gptq_model} ({a.gptq_images} images): {g['wall_s']:.1f} s; one calibration pass "
          f"{calib_s:.1f} s; ratio {g['wall_s'] / calib_s:.1f} (target ≤ {TARGET_GPTQ})")
    Path(a.out).write_text(json.dumps({
        "model": a.model, "size": a.size, "batch": a.batch, "iters": a.iters, "threads": a.threads,
        "device": a.device, "units": [{"unit": u.name, "iter_s": row["iter_s"], "ratio": r}
                                      for u, row, r in zip(units, rec["per_unit"], ratios)],
        "block_ratio_median": statistics.median(ratios), "block_ratio_max": max(ratios),
        "qdrop_iter_s": q_row["iter_s"], "brecq_iter_s_same_unit": rec["per_unit"][1]["iter_s"],
        "iters_1000_s": total, "gptq_model": a.gptq_model, "gptq_images": a.gptq_images, "gptq_s": g["wall_s"],
        "calibration_pass_s": calib_s, "gptq_ratio": g["wall_s"] / calib_s}, indent=1) + "\n")
    over = statistics.median(ratios) > TARGET_BLOCK or g["wall_s"] / calib_s > TARGET_GPTQ
    return 2 if over else 0


if __name__ == "__main__":
    sys.exit(main())
