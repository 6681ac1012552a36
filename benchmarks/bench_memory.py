"""Peak resident memory of the standard W8A8 pipeline with AdaRound (issue #24 item 4).

The pipeline is `standard_adaround` at W8A8 (CLE, bias absorption, MSE weight ranges, AdaRound,
activation ranges) on torchvision resnet50 at 224² with random weights and random images (memory does not
depend on their values). AdaRound's memory is what it captures per unit: the unit's input in the
quantized model (x_q) and the FP unit's output (the target), over every calibration image; the largest
units of resnet50 are in layer1 (256×56×56 floats = 3.2 MB per image on one side). The bench runs
AdaRound only on those units (`--units`, a few iterations: the loop's memory is one minibatch) because
capturing every one of the 53 layers over 1,024 images takes hours on a shared CPU; each configuration
runs in a fresh process and reports its peak RSS (VmHWM from /proc/self/status), the largest capture,
and whether the stores spilled to their temporary files (QCARD_CAPTURE_MB, default 1024 MiB per store).
Activation ranges (one streamed pass) run on --act-images images.

Usage: python benchmarks/bench_memory.py [--images 1024] [--unbounded-images 256] [--iters 2]
       [--units layer1.0.conv3,layer1.1.conv1] [--act-images 64] [--out benchmarks/bench_memory]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_GB = 8.0


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one(a) -> dict:
    """One configuration, in this process: returns its measurements."""
    import torch

    from qcard.methods.ptq.params import PTQParams
    from qcard.quant import layerwise
    from qcard.quant.calibrate import calibrate_activations, set_weight_ranges
    from qcard.quant.cle import absorb_high_bias, equalize
    from qcard.quant.graph import build_simulated
    from qcard.quant.reconstruct import Settings, reconstruct
    from qcard.zoo import load_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p = PTQParams(pipeline="standard_adaround", w_bits=8, a_bits=8)
    bs = p.calibration_batch_size
    xs = [torch.rand(min(bs, a.images - i), 3, a.size, a.size) for i in range(0, a.images, bs)]
    base = _peak_mb()
    sim = build_simulated(load_model(a.model).eval(), p, xs[0][:1], log=lambda m: None)
    equalize(sim)
    absorb_high_bias(sim)
    set_weight_ranges(sim, p.weight_range)
    spilled, largest = [], [0]
    orig_append = layerwise.Captured.append

    def append(self, x):          # watch the stores: their size and whether they spilled
        orig_append(self, x)
        largest[0] = max(largest[0], self._bytes)
        if self.spilled and id(self) not in spilled:
            spilled.append(id(self))
    layerwise.Captured.append = append
    t = time.perf_counter()
    s = Settings(unit="layer", iters=a.iters, batch_size=p.adaround_batch_size, input="fp_activations",
                 quant_activations=False, label="adaround")
    reconstruct(sim, xs, s, only=a.units.split(","))
    ada_s = time.perf_counter() - t
    after_ada = _peak_mb()
    calibrate_activations(sim, xs[:max(1, a.act_images // bs)])
    return {"images": a.images, "capture_mb": os.environ.get("QCARD_CAPTURE_MB", "1024 (default)"),
            "units": a.units, "iters": a.iters, "images_mb": sum(x.numel() * 4 for x in xs) / 2 ** 20,
            "largest_store_mb": largest[0] / 2 ** 20, "stores_spilled": len(spilled),
            "peak_rss_mb_before_model": base, "peak_rss_mb_after_adaround": after_ada,
            "peak_rss_mb": _peak_mb(), "adaround_s": round(ada_s, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--unbounded-images", type=int, default=256,
                    help="images for the run without a capture bound (the old behaviour; 1,024 would not fit)")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--units", default="layer1.0.conv3,layer1.1.conv1")
    ap.add_argument("--act-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bench_memory"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(a)))
        return 0
    runs = []
    for images, mb in ((a.unbounded_images, "1000000"), (a.images, None)):
        env = dict(os.environ)
        env.pop("QCARD_CAPTURE_MB", None)
        if mb is not None:
            env["QCARD_CAPTURE_MB"] = mb
        cmd = [sys.executable, __file__, "--one", "--model", a.model, "--size", str(a.size), "--images", str(images),
               "--iters", str(a.iters), "--units", a.units, "--act-images", str(a.act_images),
               "--threads", str(a.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"configuration {images} images, QCARD_CAPTURE_MB={mb} failed")
        r = json.loads(line[7:])
        runs.append(r)
        print(f"{r['images']:5d} images  capture bound {r['capture_mb']:>16s}  largest store "
              f"{r['largest_store_mb']:7.0f} MB  spilled {r['stores_spilled']}  peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"(after AdaRound {r['peak_rss_mb_after_adaround']:7.0f})  AdaRound {r['adaround_s']} s", flush=True)
    peak_gb = runs[-1]["peak_rss_mb"] / 1024
    Path(a.out + ".json").write_text(json.dumps({"model": a.model, "size": a.size, "target_gb": TARGET_GB,
                                                 "runs": runs}, indent=1) + "\n")
    print(f"peak RSS at {a.images} images with the default bound: {peak_gb:.2f} GB (target ≤ {TARGET_GB} GB)")
    return 0 if peak_gb <= TARGET_GB else 2


if __name__ == "__main__":
    sys.exit(main())
