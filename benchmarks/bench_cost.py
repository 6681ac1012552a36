"""Wall time of `qcard cost torchvision:resnet50 --json` (target: at most 3 s).

Runs the command as a subprocess several times and prints the median and its ratio to the 3 s
target, next to the floor measured in the same run: a bare `import torch, torchvision`, which the
command cannot avoid (torchvision's import pulls in torch._dynamo).

    .venv/bin/python benchmarks/bench_cost.py [--repeats 5] [--model torchvision:resnet50]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 3.0


def _cmd(model: str) -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "qcard")
    if not os.path.exists(exe):
        exe = shutil.which("qcard") or ""
    if exe:
        return [exe, "cost", model, "--json"]
    return [sys.executable, "-m", "qcard.commands.cost", model, "--json"]


def _time(cmd: list) -> tuple:
    """(wall seconds, CPU seconds of the child, stdout)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="torchvision:resnet50")
    args = ap.parse_args()
    cmd = _cmd(args.model)
    floor_cmd = [sys.executable, "-c", "import torch, torchvision"]
    _time(cmd)                                   # warm the file cache once
    times, cpus, floors, floor_cpus = [], [], [], []
    for _ in range(args.repeats):                # interleaved, so both see the same machine load
        dt, cpu, out = _time(cmd)
        times.append(dt)
        cpus.append(cpu)
        fdt, fcpu, _ = _time(floor_cmd)
        floors.append(fdt)
        floor_cpus.append(fcpu)
    report = json.loads(out)
    med, floor = statistics.median(times), statistics.median(floors)
    print(f"command: {' '.join(cmd)}")
    print(f"  macs {report['total']['macs']:,}  params {report['total']['params']:,}  layers {len(report['layers'])}")
    print(f"  runs (s): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"  median wall time      {med:.2f} s   ratio to the {TARGET_S:g} s target: {med / TARGET_S:.2f}"
          f"  ({'ok' if med <= TARGET_S else 'OVER TARGET'})")
    print(f"  median CPU time       {statistics.median(cpus):.2f} s (user+sys of the process; less sensitive "
          f"to other load on the machine)")
    print(f"  import torch+torchvision floor: wall {floor:.2f} s, CPU {statistics.median(floor_cpus):.2f} s;"
          f"  command / floor (wall): {med / floor:.2f}")
    print(f"  load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
