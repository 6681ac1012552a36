"""GPTQ's speed as a ratio (issue #23 item 6): GPTQ over the whole model ÷ one calibration pass over the
same images, side by side in one process (target ≤ 10).

The model is built as bench_reconstruction's was (W4A4, weights per-channel asymmetric with MSE ranges,
activations min-max, calibrated on the same images), random weights and random images at --size²: speed
does not depend on their values. "One calibration pass" is the simulated model's forward over the
calibration images (quant.calibrate.run_batches). GPTQ's time is split into what grows with the images
(the node-by-node pass and X·Xᵀ per layer) and what does not (per layer: the Cholesky factorisations of
H and H⁻¹ and the column loop, `gptq_rows`). --factor-both also times each layer's three factorisations
in float64 and in float32 on its own Hessian (outside GPTQ's time), which is what the float32 choice saves.
Each image count runs in a fresh process, which also reports its peak RSS (VmHWM).

Usage: python benchmarks/bench_gptq.py [--images 32,128] [--model torchvision:resnet50] [--size 224]
       [--batch 32] [--threads 1] [--factor-both] [--out benchmarks/bench_gptq]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 10.0
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import _peak_mb, run_one  # noqa: E402  (one reader of the peak RSS, one runner)


def _factor_s(h, dtype) -> float:
    import torch
    hf = h.to(dtype)
    t = time.perf_counter()
    torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hf)), upper=True)
    return time.perf_counter() - t


def one(a) -> dict:
    import torch

    from qcard.quant import gptq as gptq_mod
    from qcard.quant.calibrate import calibrate_activations, run_batches, set_weight_ranges
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    from qcard.zoo import load_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    xs = [torch.rand(min(a.batch, a.images - i), 3, a.size, a.size) for i in range(0, a.images, a.batch)]
    sim = build_simulated(load_model(a.model).eval(), SimScheme(
        w_bits=4, a_bits=4, w_granularity="per_channel", w_symmetric=False, weight_range="mse",
        activation_range="minmax"), xs[0][:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, xs)
    t = time.perf_counter()
    run_batches(sim, xs)
    pass_s = time.perf_counter() - t

    rows_s, factor = [0.0], {"float64": 0.0, "float32": 0.0}
    orig = gptq_mod.gptq_rows

    def timed(w, h, *args, **kw):           # the per-layer part that does not grow with the images
        if a.factor_both:
            hd = h.double() + 0.01 * torch.mean(torch.diag(h.double())) * torch.eye(h.shape[0], dtype=torch.float64)
            for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
                factor[name] += _factor_s(hd, dt)
        t0 = time.perf_counter()
        out = orig(w, h, *args, **kw)
        rows_s[0] += time.perf_counter() - t0
        return out
    gptq_mod.gptq_rows = timed
    rec = gptq_mod.gptq(sim, xs)
    gptq_s = rec["wall_s"] - (sum(factor.values()) if a.factor_both else 0.0)
    skipped = [r["name"] for r in rec["layers"] if "skipped" in r]
    return {"images": a.images, "calibration_pass_s": round(pass_s, 2), "gptq_s": round(gptq_s, 2),
            "ratio": round(gptq_s / pass_s, 2), "gptq_rows_s": round(rows_s[0], 2),
            "pass_and_xxt_s": round(gptq_s - rows_s[0], 2),
            "factor_s": {k: round(v, 2) for k, v in factor.items()} if a.factor_both else None,
            "layers": len(rec["layers"]), "skipped": skipped, "peak_rss_mb": round(_peak_mb()),
            "capture_mb": os.environ.get("QCARD_CAPTURE_MB", "1024 (default)")}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", default="32,128")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--factor-both", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bench_gptq"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        a.images = int(a.images)
        print("RESULT " + json.dumps(one(a)))
        return 0
    runs, load0 = [], os.getloadavg()
    for images in [int(v) for v in a.images.split(",")]:
        cmd = [sys.executable, __file__, "--one", "--model", a.model, "--size", str(a.size), "--images", str(images),
               "--batch", str(a.batch), "--threads", str(a.threads)] + (["--factor-both"] if a.factor_both else [])
        r = run_one(cmd, None, f"GPTQ at {images} images")
        runs.append(r)
        print(f"{images:4d} images: GPTQ {r['gptq_s']:.1f} s (pass + X·Xᵀ {r['pass_and_xxt_s']:.1f}, per-layer "
              f"rounding {r['gptq_rows_s']:.1f}); one calibration pass {r['calibration_pass_s']:.1f} s; ratio "
              f"{r['ratio']:.1f} (target ≤ {TARGET}); peak RSS {r['peak_rss_mb']} MB"
              + (f"; factorisations float64 {r['factor_s']['float64']:.1f} s, float32 {r['factor_s']['float32']:.1f} s"
                 if r["factor_s"] else ""), flush=True)
    Path(a.out + ".json").write_text(json.dumps({
        "model": a.model, "size": a.size, "threads": a.threads, "target": TARGET, "runs": runs,
        "load_average_start": load0, "load_average_end": os.getloadavg()}, indent=1) + "\n")
    return 0 if all(r["ratio"] <= TARGET for r in runs) else 2


if __name__ == "__main__":
    sys.exit(main())
