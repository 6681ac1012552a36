"""Wall time of one 16-point sweep (tiny points) in-process, with --workers 2 and with --executor ray
(a local Ray started by the run), in one run, and the per-point overhead Ray adds over --workers 2.

Each executor runs `qcard run` in a fresh process and a fresh output folder, so every figure includes
the process start; the Ray figure also includes starting the local Ray, measured apart as well.
Usage: python benchmarks/bench_executors.py [--repeats N]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
experiment: bench_executors
models: [qcard:mlp, qcard:lenet5]
dataset: {ref: qcard:mnist5k, eval_size: 200, batch_size: 100, calibration: {size: 32}}
cost: {profiles: [bitops]}
methods:
  - fp32
  - {name: ptq, params: {w_bits: [8, 7, 6, 5, 4, 3, 2], a_bits: 8, pipeline: minmax}}
"""
N_POINTS = 16
EXECUTORS = {"in-process": [], "--workers 2": ["--workers", "2"], "--executor ray": ["--executor", "ray"]}


def sweep(config: Path, args) -> float:
    """Wall seconds of the sweep, in a fresh process and output folder."""
    out = tempfile.mkdtemp(prefix="qcard-bench-")
    try:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(config), "--out", out,
                               "--no-progress"] + args, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"qcard run {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        cards = list(Path(out).glob("*/*/card.json"))
        assert len(cards) == N_POINTS and all(json.loads(c.read_text())["status"] == "ok" for c in cards)
        return wall
    finally:
        shutil.rmtree(out, ignore_errors=True)


def ray_start_seconds() -> float:
    code = ("import time, ray\nt = time.perf_counter()\nray.init(include_dashboard=False, logging_level='ERROR')\n"
            "ray.shutdown()\nprint(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench_executors.yaml"
        config.write_text(CONFIG)
        walls = {name: [] for name in EXECUTORS}
        for _ in range(args.repeats):          # interleaved, so a busy moment hits every executor alike
            for name, extra in EXECUTORS.items():
                walls[name].append(sweep(config, extra))
    start = ray_start_seconds()
    med = {name: statistics.median(v) for name, v in walls.items()}
    base = med["in-process"]
    print(f"one {N_POINTS}-point sweep (2 models x 8 tiny PTQ/FP32 points, eval 200 images), "
          f"{os.cpu_count()} cores, median of {args.repeats} run(s):")
    for name in EXECUTORS:
        print(f"  {name:<15} {med[name]:6.1f} s   ratio to in-process {med[name] / base:5.2f}")
    extra = med["--executor ray"] - med["--workers 2"]
    print(f"Ray over --workers 2: {extra:+.1f} s for the sweep, {extra / N_POINTS:+.2f} s per point "
          f"(of it: starting a local Ray {start:.1f} s, i.e. {(extra - start) / N_POINTS:+.2f} s per point "
          f"once Ray runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
