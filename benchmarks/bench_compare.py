"""Wall time of `qcard compare` over 1,000 card files (a subprocess, as a user runs it).

Target (issues 5 and 13): at most 2 s of wall time on this 2-core machine, Python start-up and the pandas
import included, for cards WITH per-sample outcomes (1,000 eval images each), so that every row is tested
against the FP32 card (exact McNemar, Benjamini–Hochberg over all tests). The cards are generated into a
temporary run folder from the PTQ fixture card with varied fields (bits, granularity, calibration size,
first/last precision, accuracy, cost), so the comparison has real differences to name and a real Pareto
front to find; the first card is the FP32 baseline, and each card's outcome bits are the baseline's with
some images flipped (its accuracy is what its bits say).
Prints the median over the repeats and its ratio to the target, and the in-process time of the
significance part alone; exit 2 when over the target.
Usage: python benchmarks/bench_compare.py [--cards N] [--images N] [--repeats N] [--format md|csv|tex|json]
       [--no-outcomes]
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


def _fp32_card(base: dict, fp32_bits) -> dict:
    from qcard.cards.schema import unquantized_block
    c = copy.deepcopy(base)
    c.update(schema_version="2", id="f" * 64, quantization=unquantized_block())
    c["method"].update(name="fp32", family="none", label="fp32", params={}, pipeline=[])
    c["dataset"]["calibration"] = None
    c["results"].update(_evidence(fp32_bits, fp32_bits, c, is_baseline=True))
    return c


def _evidence(fp32_bits, bits, card: dict, is_baseline: bool = False) -> dict:
    """The card's outcome-derived figures, as the runner writes them (the card passes the evidence check)."""
    from qcard.cards.evidence import results_from_outcomes
    res = results_from_outcomes(fp32_bits, {0: bits}, fingerprint=card["dataset"]["fingerprint"],
                                is_baseline=is_baseline)
    res.pop("metric", None)
    return res


def make_cards(root: Path, n: int, seed: int = 0, images: int = 1000) -> None:
    """n cards; with images > 0 the first is the FP32 baseline and all carry per-sample outcomes."""
    import numpy as np
    base = json.loads(FIXTURE.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    exp = root / "sweep"
    if images:
        base["dataset"]["eval_size"] = images
        fp32_bits = np.zeros(images, dtype=bool)
        fp32_bits[rng.sample(range(images), round(images * 0.6976))] = True
        right, wrong = np.flatnonzero(fp32_bits), np.flatnonzero(~fp32_bits)
        folder = exp / "fp32"
        folder.mkdir(parents=True)
        (folder / "card.json").write_text(json.dumps(_fp32_card(base, fp32_bits), indent=2), encoding="utf-8")
        n -= 1
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
        if images:   # the baseline's bits, some correct images lost and a few wrong ones gained
            gained = rng.randint(0, 15)
            lost = max(0, min(len(right), gained + round(images * (69.76 - acc) / 100)))
            bits = fp32_bits.copy()
            bits[rng.sample(list(right), lost)] = False
            bits[rng.sample(list(wrong), gained)] = True
            c["schema_version"] = "2"
            c["results"].update(_evidence(fp32_bits, bits, c))
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


def significance_time(folder: Path, repeats: int) -> str:
    """In-process: the significance part alone (outcome unpacking, McNemar, BH, within-noise lines)."""
    from qcard.cards.compare import card_letter, load_cards, significance
    cards = [lc.card for lc in load_cards([folder])]
    letters = [card_letter(i) for i in range(len(cards))]
    ok = [i for i, c in enumerate(cards) if c.status == "ok"]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sig = significance(cards, letters, ok)
        times.append(time.perf_counter() - t)
    n_sig = sum(t["significant"] for t in sig.tests.values())
    line = (f"significance part (in-process): median {statistics.median(times) * 1000:.0f} ms for {len(sig.tests)} "
            f"tests ({n_sig} significant, {len(sig.tests) - n_sig} within noise)")
    # the slow case: every card has the baseline's bits, so every row is within noise
    fp32 = next(c for c in cards if c.method.family == "none")
    for c in cards:
        c.results.outcomes.seeds["0"] = fp32.results.outcomes.seeds["0"]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sig = significance(cards, letters, ok)
        times.append(time.perf_counter() - t)
    n_sig = sum(t["significant"] for t in sig.tests.values())
    return line + (f"; all rows within noise: median {statistics.median(times) * 1000:.0f} ms "
                   f"({len(sig.tests) - n_sig} within noise)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=1000, help="eval images per card (outcome bits)")
    ap.add_argument("--no-outcomes", action="store_true", help="cards without per-sample outcomes (schema 1)")
    from qcard.cards.compare.exporters import EXPORTERS
    ap.add_argument("--format", default="md", choices=list(EXPORTERS))
    args = ap.parse_args()
    images = 0 if args.no_outcomes else args.images
    tmp = Path(tempfile.mkdtemp(prefix="qcard-bench-compare-"))
    try:
        make_cards(tmp, args.cards, images=images)
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
        what = f"with outcomes of {images:,} images each" if images else "without outcomes"
        print(f"qcard compare over {args.cards} cards {what} (--format {args.format}): median {med:.2f} s over "
              f"{len(times)} runs (runs: {', '.join(f'{t:.2f}' for t in times)}); target {TARGET_S:.1f} s; "
              f"ratio {med / TARGET_S:.2f}; output {len(out):,} characters")
        if images:
            print(significance_time(tmp / "sweep", args.repeats))
        return 0 if med <= TARGET_S else 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
