"""CPU against CUDA, method by method, card by card (issue 24 item 3).

    python benchmarks/gpu_check.py [--devices cpu,cuda] [--methods fp32,ptq_w8a8,...] [--model qcard:resnet8]
                                   [--eval-size 1000] [--out DIR] [--no-throughput] [--no-warmup] [--threads N]

Each method (METHODS: fp32, the standard W8A8 PTQ pipeline with bias correction, AdaRound, BRECQ and GPTQ
with a few iterations, QAT, MARViN, SPARQ) runs as a one-point config on a bundled model and the MNIST
subset, once per device in --devices (through qcard.runner.run, each in a fresh out folder: nothing is
cached between devices), and every later device's card is compared with the first's:

  - the quantization and cost blocks are identical (they describe the model's scheme, not the device),
  - the top-1 (and the FP32 baseline's) lies inside the first card's 95 % interval,
  - SPARQ's statistics of its activation codes are identical,

and the wall time of each point (model load, FP32 baseline, method, evaluation; after an untimed FP32
warm-up point per device) is printed with its ratio to the first device's. Last, on CUDA: torchvision
resnet50 (random weights) at 3x224x224, FP32 eval images/s and the W8A8 simulated model's (standard
pipeline) images/s ÷ FP32.

Exit 0 when every comparison holds, 1 when one does not (or a point failed), 2 when CUDA is asked for and
this machine has none. `--devices cpu,cpu` compares the CPU with itself (what the tests run).

Status: written and tested on CPU only; it has not been run on a GPU yet (see the README's "GPU check").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# deterministic cuBLAS (qcard runs points with torch.use_deterministic_algorithms): set before CUDA starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

_TRAIN = {"epochs": 1, "max_steps": 10, "batch_size": 64}
# name -> the config's method entry; small iteration counts: the check is about devices, not accuracy
METHODS: Dict[str, Any] = {
    "fp32": "fp32",
    "ptq_w8a8": {"name": "ptq", "label": "W8A8", "params": {"w_bits": 8, "a_bits": 8, "pipeline": "standard",
                                                            "w_granularity": "per_channel"}},
    "adaround": {"name": "ptq", "label": "W4A8-AdaRound",
                 "params": {"w_bits": 4, "a_bits": 8, "pipeline": "standard_adaround", "adaround_iters": 20,
                            "adaround_batch_size": 16}},
    "brecq": {"name": "ptq", "label": "W4A8-BRECQ",
              "params": {"w_bits": 4, "a_bits": 8, "pipeline": "brecq",
                         "reconstruction": {"iters": 20, "batch_size": 16}}},
    "gptq": {"name": "ptq", "label": "W4A8-GPTQ", "params": {"w_bits": 4, "a_bits": 8, "pipeline": "gptq"}},
    "qat": {"name": "qat", "label": "QAT-W4A4",
            "params": {"w_bits": 4, "a_bits": 4, "train": dict(_TRAIN, optimizer="adam", lr=5.0e-4)}},
    "marvin": {"name": "marvin", "label": "MARViN", "params": {"train": dict(_TRAIN, lr=0.01)}},
    "sparq": {"name": "sparq", "label": "SPARQ", "params": {"variant": "sparq", "negatives": "exclude",
                                                           "stats_size": 64}},
}
IDENTICAL_BLOCKS = ("quantization", "cost", "cost_profiles")
INTERVALS = (("quantized", "ci95"), ("fp32", "fp32_ci95"))     # (value, the interval it must lie in)


def cuda_problem(devices: List[str]) -> Optional[str]:
    """One line when CUDA is asked for and not usable here; None otherwise."""
    if "cuda" not in devices or torch.cuda.is_available():
        return None
    built = torch.version.cuda or "no CUDA (a CPU build)"
    return (f"gpu_check: --devices {','.join(devices)} asks for CUDA but this machine has no usable CUDA "
            f"device (torch {torch.__version__} built with {built}); run it on a GPU machine, or "
            "`--devices cpu,cpu` to check the CPU path alone")


# ------------------------------------------------------------------ comparing two cards

def first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    """Where two JSON values first differ, as 'path: a != b'; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}{key}: only in the {'first' if key in a else 'second'} card"
            found = first_difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path.rstrip('.')}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}{i}.")
            if found:
                return found
        return None
    return None if a == b else f"{path.rstrip('.')}: {a!r} != {b!r}"


def compare_cards(ref: Dict[str, Any], other: Dict[str, Any]) -> List[str]:
    """What does not hold between the reference device's card and another device's (empty: all holds)."""
    problems = []
    for block in IDENTICAL_BLOCKS:
        diff = first_difference(ref.get(block), other.get(block))
        if diff:
            problems.append(f"{block} block differs ({diff})")
    for value, interval in INTERVALS:
        ci, v = ref["results"].get(interval), other["results"].get(value)
        if ci is None or v is None:
            continue                       # e.g. no interval for this metric: nothing to check against
        if not ci[0] <= v <= ci[1]:
            problems.append(f"results.{value} {v} outside the reference's 95 % interval [{ci[0]}, {ci[1]}]")
    sparq = [(c.get("method_stats") or {}).get("sparq") for c in (ref, other)]
    if sparq != [None, None]:
        diff = first_difference(*sparq) if None not in sparq else "present in one card only"
        if diff:
            problems.append(f"SPARQ code statistics differ ({diff})")
    return problems


# ------------------------------------------------------------------ running the points

def point_config(method: Any, device: str, model: str, eval_size: int) -> Dict[str, Any]:
    return {"experiment": "gpu_check", "seeds": [0], "device": device, "models": [model],
            "dataset": {"ref": "qcard:mnist5k", "eval_split": "test", "eval_size": eval_size, "batch_size": 250,
                        "calibration": {"size": 128, "seed": 0}},
            "methods": [method], "cost": {"profiles": ["bitops"]}}


def run_point(name: str, device: str, model: str, eval_size: int, out: Path) -> Tuple[Dict[str, Any], float]:
    """(card, wall seconds) of one method on one device; a failed point raises with its error."""
    import yaml
    from qcard.runner import run
    folder = out / f"{name}-{device}-{len(list(out.glob(f'{name}-{device}*')))}"
    folder.mkdir(parents=True)
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump(point_config(METHODS[name], device, model, eval_size), sort_keys=False))
    t0 = time.perf_counter()
    summary = run(cfg, out=str(folder / "runs"), progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    outcome = summary.outcomes[0]
    if outcome.status != "ok":
        raise RuntimeError(f"{name} on {device}: {outcome.status}: {outcome.error}")
    return outcome.card, seconds


# ------------------------------------------------------------------ resnet50 throughput

def images_per_s(model, x: torch.Tensor, batches: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(2):                      # warm-up: cuDNN's algorithm choice, the allocator
            model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        sync()
    return batches * x.shape[0] / (time.perf_counter() - t0)


def throughput(device: str, arch: str = "resnet50", batch: int = 64, batches: int = 20, size: int = 224,
               calibration: int = 32) -> Dict[str, float]:
    """A torchvision model (random weights) at 3 x size²: FP32 eval images/s, and the W8A8 standard
    pipeline's simulated model's."""
    import torchvision
    from qcard.methods.base import RunContext
    from qcard.methods.ptq import PTQParams
    from qcard.methods.ptq.pipeline import build, run_steps
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    fp32 = images_per_s(model, x, batches)
    p = PTQParams(w_bits=8, a_bits=8, pipeline="standard")
    ctx = RunContext(seed=0, device=device, progress=False, log=lambda m: None)
    xs = [torch.rand(min(16, calibration - k), 3, size, size, generator=gen) for k in range(0, calibration, 16)]
    sim = build(model, p, xs, ctx)
    run_steps(sim, p, p.steps, xs, ctx, {})
    w8a8 = images_per_s(sim.eval(), x, batches)
    return {"fp32_images_per_s": fp32, "w8a8_images_per_s": w8a8, "w8a8_over_fp32": w8a8 / fp32}


# ------------------------------------------------------------------ the check

def check(devices: List[str], methods: List[str], model: str, eval_size: int, out: Path,
          say=print, warmup: bool = True) -> int:
    """The number of methods whose point failed or whose cards differ beyond what the check allows."""
    for device in dict.fromkeys(devices) if warmup else ():   # untimed: imports, zoo weights, CUDA context
        run_point("fp32", device, model, eval_size, out)
    failures = 0
    for name in methods:
        cards, failed = [], False
        for device in devices:
            try:
                cards.append((device,) + run_point(name, device, model, eval_size, out))
            except RuntimeError as exc:
                say(f"{name}: FAILED: {exc}")
                failed = True
                break
        else:
            ref_device, ref_card, ref_s = cards[0]
            for device, card, seconds in cards[1:]:
                problems = compare_cards(ref_card, card)
                top1 = f"top1 {ref_card['results']['quantized']} / {card['results']['quantized']}"
                times = f"{ref_s:.1f} s / {seconds:.1f} s = {ref_s / seconds:.2f}x"
                verdict = "identical blocks, accuracy inside the interval" if not problems else "; ".join(problems)
                say(f"{name}: {ref_device} vs {device}: {top1}, wall {times}: "
                    f"{'OK' if not problems else 'MISMATCH'}: {verdict}")
                failed = failed or bool(problems)
        failures += failed
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; the first is the reference")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--model", default="qcard:resnet8")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the resnet50 throughput figure")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed FP32 point per device")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [d for d in devices if d not in ("cpu", "cuda")] + [m for m in methods if m not in METHODS]
    if len(devices) < 2 or unknown:
        print(f"gpu_check: give at least two --devices of cpu, cuda and --methods of {', '.join(METHODS)}"
              f"{f' (unknown: {unknown})' if unknown else ''}", file=sys.stderr)
        return 2
    problem = cuda_problem(devices)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else "none"
    print(f"gpu_check: {args.model}, {args.eval_size} eval images, devices {', '.join(devices)} (GPU: {gpu}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory(prefix="qcard-gpu-check-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        failures = check(devices, methods, args.model, args.eval_size, out, warmup=not args.no_warmup)
    if "cuda" in devices and not args.no_throughput:
        t = throughput("cuda")
        print(f"resnet50 3x224x224 on {gpu}: FP32 eval {t['fp32_images_per_s']:.0f} images/s, W8A8 "
              f"{t['w8a8_images_per_s']:.0f} images/s = {t['w8a8_over_fp32']:.2f}x FP32")
    print(f"gpu_check: {len(methods) - failures} of {len(methods)} method(s) hold")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
