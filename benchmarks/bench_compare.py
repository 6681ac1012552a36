"""Wall time of `qcard compare` over 1,000 card files (a subprocess, as a user runs it).

Target (issue 5): at most 2 s of wall time on this 2-core machine, Python start-up and the pandas
import included. The cards are generated into a temporary run folder from the PTQ fixture card with
varied fields (bits, granularity, calibration size, first/last precision, accuracy, cost), so the
comparison has real differences to name and a real Pareto front to find.
Prints the median over the repeats and its ratio to the target; exit 2 when over the target.
Usage: python benchmarks/bench_compare.py [--cards N] [--repeats N] [--format md|csv|tex|json]
"""
import argparse
import copy
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "cards" / "ptq_w4a8_resnet18.json"
TARGET_S = 2.0


def make_cards(root: Path, n: int, seed: int = 0) -> None:
    base = json.loads(FIXTURE.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    exp = root / "sweep"
    for i in range(n):
        c = copy.deepcopy(base)
        wb, ab = rng.choice([2, 3, 4, 6, 8]), rng.choice([4, 8])
        q = c["quantization"]
        q["weights"]["bits"], q["activations"]["bits"] = wb, ab
        q["weights"]["granularity"] = rng.choice(["per_channel", "per_tensor"])
        q["batch_norm"] = rng.choice(["folded", "kept"])
        if rng.random() < 0.5:   # first/last at 8 bits instead of FP32
            q["first_layer"].update(weight_bits=8, activation_bits=8)
            q["last_layer"].update(weight_bits=8, activation_bits=8)
        c["dataset"]["calibration"]["size"] = rng.choice([256, 512, 1024])
        c["method"]["params"].update(weight_bits=wb, activation_bits=ab)
        c["method"]["label"] = f"ptq-w{wb}a{ab}"
        acc = 69.76 - 12 / wb - 3 / ab + rng.gauss(0, 0.3)
        c["results"].update(quantized=round(acc, 3), delta=round(acc - 69.758, 3), std=round(abs(rng.gauss(0.1, 0.05)), 3))
        scale = wb * ab / 32
        for k in ("bops", "bops_uniq", "energy_pj", "size_bits"):
            c["cost"][k] = round(c["cost"][k] * scale * rng.uniform(0.97, 1.03), 1)
        for layer in c["cost"]["layers"]:
            if layer["weight_bits"] is not None:
                layer["weight_bits"], layer["activation_bits"] = wb, ab
                layer["bops"] = float(layer["macs"] * wb * ab)
        c["id"] = f"{i:064x}"
        folder = exp / f"{c['method']['label']}-{i:04d}"
        folder.mkdir(parents=True)
        (folder / "card.json").write_text(json.dumps(c, indent=2), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--format", default="md", choices=["md", "csv", "tex", "json"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qcard-bench-compare-"))
    try:
        make_cards(tmp, args.cards)
        cmd = [sys.executable, "-m", "qcard.cli", "compare", str(tmp / "sweep"), "--format", args.format,
               "--output", str(tmp / f"out.{args.format}")]
        subprocess.run(cmd, capture_output=True, text=True)   # warm the file cache once
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
        out = (tmp / f"out.{args.format}").read_text(encoding="utf-8")
        med = statistics.median(times)
        print(f"qcard compare over {args.cards} cards (--format {args.format}): median {med:.2f} s over "
              f"{len(times)} runs (runs: {', '.join(f'{t:.2f}' for t in times)}); target {TARGET_S:.1f} s; "
              f"ratio {med / TARGET_S:.2f}; output {len(out):,} characters")
        return 0 if med <= TARGET_S else 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
