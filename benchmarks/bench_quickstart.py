"""Wall time of `qcard run configs/quickstart.yaml` (fresh output folder, installed package).

Target (foundation issue): at most 60 s on a 2-core machine. Prints the time and its ratio to the target.
Usage: python benchmarks/bench_quickstart.py [--repeats N] [--config PATH]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    args = ap.parse_args()
    qcard = [sys.executable, "-m", "qcard.cli"]
    times = []
    for _ in range(args.repeats):
        out = tempfile.mkdtemp(prefix="qcard-bench-")
        try:
            t = time.perf_counter()
            proc = subprocess.run(qcard + ["run", args.config, "--out", out, "--no-progress"], cwd=ROOT,
                                  capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
        finally:
            shutil.rmtree(out, ignore_errors=True)
    med = statistics.median(times)
    print(f"quickstart wall time: median {med:.1f} s over {len(times)} run(s) "
          f"(runs: {', '.join(f'{t:.1f}' for t in times)}); target {TARGET_S:.0f} s; ratio {med / TARGET_S:.2f}")
    print(f"cpu threads: torch default, {os.cpu_count()} cores visible")
    return 0 if med <= TARGET_S else 2


if __name__ == "__main__":
    sys.exit(main())
