"""Peak resident memory of the layer-wise steps at ImageNet scale (issue #24 item 4): the W8A8 pipeline
with AdaRound (`--step adaround`), the standard W8A8 pipeline with empirical bias correction
(`--step bias_correction`) and the GPTQ pipeline at W8A8 (`--step gptq`).

adaround:

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

bias_correction, gptq: the pipeline's steps as `qcard run` runs them (`standard`: CLE, bias absorption,
MSE weight ranges, bias correction, activation ranges; `gptq`: weight ranges, activation ranges, GPTQ),
every step on all images except activation ranges (--act-images). Both steps go through one node-by-node
pass (quant.layerwise.run_by_node), whose live values past QCARD_CAPTURE_MB spill to temporary files;
the bench reports how many values and bytes spilled.

Each step runs twice, each time in a fresh process: at --unbounded-images with the bound lifted
(QCARD_CAPTURE_MB=1000000: everything in memory, the behaviour before the bound) and at --images with the
default bound. The JSON keeps the results of every step measured so far (--step replaces that step's).

Usage: python benchmarks/bench_memory.py [--step adaround|bias_correction|gptq] [--images 1024]
       [--unbounded-images 256] [--iters 2] [--units layer1.0.conv3,layer1.1.conv1] [--act-images 64]
       [--out benchmarks/bench_memory]
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


def run_one(cmd, env, what: str) -> dict:
    """Run one measurement in its own process (a fresh peak RSS) and return its `RESULT {json}` line."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{what} failed")
    return json.loads(line[7:])


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
    if a.step != "adaround":
        return one_pass(a)
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


def one_pass(a) -> dict:
    """bias_correction or gptq: the pipeline's steps, in this process; returns its measurements."""
    import torch

    from qcard.methods.base import RunContext
    from qcard.methods.ptq.params import PTQParams
    from qcard.methods.ptq.pipeline import run_steps
    from qcard.quant import bias_correction, gptq, layerwise
    from qcard.quant.graph import build_simulated
    from qcard.zoo import load_model

    p = PTQParams(pipeline="standard" if a.step == "bias_correction" else "gptq", w_bits=8, a_bits=8)
    bs = p.calibration_batch_size
    xs = [torch.rand(min(bs, a.images - i), 3, a.size, a.size) for i in range(0, a.images, bs)]
    base = _peak_mb()
    sim = build_simulated(load_model(a.model).eval(), p, xs[0][:1], log=lambda m: None)
    passes = []

    def watched(*args, **kw):                 # the pass's spill counts
        passes.append(layerwise.run_by_node(*args, **kw))
        return passes[-1]
    for mod in (bias_correction, gptq):
        mod.run_by_node = watched
    ctx = RunContext(seed=0, progress=False, log=lambda m: None)
    seconds, peaks, stats = {}, {}, {}
    for step in p.steps:
        t = time.perf_counter()
        run_steps(sim, p, [step], xs[:max(1, a.act_images // bs)] if step == "activation_ranges" else xs, ctx, stats)
        seconds[step] = round(time.perf_counter() - t, 1)
        peaks[step] = round(_peak_mb())
    spilled = (passes[0] if passes else None) or {}     # None: a run_by_node without a bound
    return {"images": a.images, "capture_mb": os.environ.get("QCARD_CAPTURE_MB", "1024 (default)"),
            "steps": list(p.steps), "images_mb": sum(x.numel() * 4 for x in xs) / 2 ** 20,
            "values_spilled": spilled.get("values_spilled"),
            "gb_spilled": round(spilled.get("bytes_spilled", 0) / 2 ** 30, 2),
            "peak_rss_mb_before_model": base, "peak_rss_mb_after_step": peaks, "seconds": seconds,
            "peak_rss_mb": _peak_mb()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", default="adaround", choices=["adaround", "bias_correction", "gptq"])
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--unbounded-images", type=int, default=256,
                    help="images for the run without a capture bound (the old behaviour; 1,024 would not fit); 0: none")
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
    load0 = os.getloadavg()
    configs = ((a.unbounded_images, "1000000"), (a.images, None)) if a.unbounded_images else ((a.images, None),)
    for images, mb in configs:
        env = dict(os.environ)
        env.pop("QCARD_CAPTURE_MB", None)
        if mb is not None:
            env["QCARD_CAPTURE_MB"] = mb
        cmd = [sys.executable, __file__, "--one", "--step", a.step, "--model", a.model, "--size", str(a.size),
               "--images", str(images),
               "--iters", str(a.iters), "--units", a.units, "--act-images", str(a.act_images),
               "--threads", str(a.threads)]
        r = run_one(cmd, env, f"configuration {images} images, QCARD_CAPTURE_MB={mb}")
        runs.append(r)
        if a.step == "adaround":
            print(f"{r['images']:5d} images  capture bound {r['capture_mb']:>16s}  largest store "
                  f"{r['largest_store_mb']:7.0f} MB  spilled {r['stores_spilled']}  peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(after AdaRound {r['peak_rss_mb_after_adaround']:7.0f})  AdaRound {r['adaround_s']} s", flush=True)
        else:
            print(f"{r['images']:5d} images  capture bound {r['capture_mb']:>16s}  spilled {r['values_spilled']} values "
                  f"({r['gb_spilled']} GB)  peak RSS {r['peak_rss_mb']:7.0f} MB  by step {r['peak_rss_mb_after_step']}  "
                  f"seconds {r['seconds']}", flush=True)
    peak_gb = runs[-1]["peak_rss_mb"] / 1024
    path = Path(a.out + ".json")
    old = json.loads(path.read_text()) if path.exists() else {}
    steps = old.get("steps") or ({"adaround": {"runs": old["runs"]}} if "runs" in old else {})
    steps[a.step] = {"runs": runs, "load_average_start": load0, "load_average_end": os.getloadavg()}
    path.write_text(json.dumps({"model": a.model, "size": a.size, "target_gb": TARGET_GB, "steps": steps},
                               indent=1) + "\n")
    print(f"peak RSS at {a.images} images with the default bound: {peak_gb:.2f} GB (target ≤ {TARGET_GB} GB)")
    return 0 if peak_gb <= TARGET_GB else 2


if __name__ == "__main__":
    sys.exit(main())
