"""Does qcard's evaluation keep up with a plain torchvision loop on an image folder of JPEGs? (issue #24 item 2)

Generates N JPEGs at ImageNet-like sizes (375x500 and varied, 10 class folders) into a temporary ImageFolder
and times, side by side in one run, with the same worker count and batch size:

  FP32:  qcard.evaluate.evaluate (qcard's imagefolder dataset and the point's loaders, as `qcard run` uses them)
         vs a plain torchvision ImageFolder + DataLoader + model loop;
  W8A8:  the same two loops over qcard's W8A8 simulated model (ptq, minmax pipeline) instead of the FP32 one.

Both sides use the standard Resize(256) / CenterCrop(224) / ToTensor / Normalize(ImageNet) and the same
random-weight torchvision model. Each pair is timed `--repeats` times, alternating which side goes first; the
ratio reported is qcard images/s ÷ plain images/s of the median pass (target ≥ 0.95). Results are written to
benchmarks/bench_data.json and .md.

Usage: python benchmarks/bench_data.py [--images 2000] [--model mobilenet_v3_small] [--batch 64]
                                       [--workers auto] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcard.data import load_dataset  # noqa: E402
from qcard.data.loaders import PointLoaders, resolve_num_workers, usable_cores  # noqa: E402
from qcard.evaluate import evaluate, top_classes  # noqa: E402
from qcard.provenance import cpu_name  # noqa: E402

CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(folder: Path, n: int, seed: int = 0) -> int:
    """n JPEGs, ImageNet-like: mostly 375x500 or 500x375, some other sizes; smooth content (a realistic file
    size and decode cost, unlike white noise). Returns the bytes written."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300)]
    total = 0
    for i in range(n):
        w, h = sizes[0] if rng.rand() < 0.5 else sizes[rng.randint(len(sizes))]
        low = rng.randint(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        path = folder / f"class_{i % CLASSES:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        total += path.stat().st_size
    return total


def plain_eval(model, folder: Path, batch: int, workers: int) -> np.ndarray:
    """The reference loop: torchvision's ImageFolder and DataLoader, argmax per image."""
    from torchvision import datasets
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=batch,
                                         shuffle=False, num_workers=workers)
    right = []
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            right.append(top_classes(model(x), 1)[:, 0].eq(y).numpy())
    return np.concatenate(right)


def qcard_eval(model, dataset, batch: int, workers: int) -> np.ndarray:
    with PointLoaders(workers) as loaders:      # one point's loaders, as the runner makes them
        return evaluate(model, dataset, batch_size=batch, loaders=loaders)["correct"]


def side_by_side(name: str, model, dataset, folder: Path, batch: int, workers: int, repeats: int) -> dict:
    n = len(dataset)
    rows = {"qcard": [], "plain": []}
    outcomes = {}
    for r in range(repeats):
        order = ["qcard", "plain"] if r % 2 == 0 else ["plain", "qcard"]
        for side in order:
            t = time.perf_counter()
            right = qcard_eval(model, dataset, batch, workers) if side == "qcard" else \
                plain_eval(model, folder, batch, workers)
            rows[side].append(n / (time.perf_counter() - t))
            outcomes.setdefault(side, right)
    same = bool(np.array_equal(outcomes["qcard"], outcomes["plain"]))
    q, p = statistics.median(rows["qcard"]), statistics.median(rows["plain"])
    out = {"eval": name, "images": n, "qcard_img_s": round(q, 1), "plain_img_s": round(p, 1),
           "ratio": round(q / p, 3), "qcard_passes_img_s": [round(v, 1) for v in rows["qcard"]],
           "plain_passes_img_s": [round(v, 1) for v in rows["plain"]], "same_outcomes": same}
    print(f"{name}: qcard {q:.1f} img/s, plain {p:.1f} img/s, ratio {q / p:.3f} (passes: qcard "
          f"{out['qcard_passes_img_s']}, plain {out['plain_passes_img_s']}; same per-image outcomes: {same})",
          flush=True)
    return out


def w8a8(model, train, batch: int, workers: int):
    """qcard's W8A8 simulated model of `model` (ptq, minmax pipeline, 64 calibration images)."""
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.ptq import PTQ, PTQParams
    data = PointData(train=train, eval=train, num_classes=CLASSES, input_shape=tuple(train.input_shape),
                     batch_size=batch, num_workers=workers, calibration_size=64)
    params = PTQParams(w_bits=8, a_bits=8, pipeline="minmax")
    return PTQ().apply(model, data, params, RunContext(seed=0, progress=False, log=lambda m: None)).model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="mobilenet_v3_small", help="a torchvision classification model (random weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="auto", help="an int, or auto (as qcard resolves it for an image folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bench_data"))
    args = ap.parse_args()
    import torchvision
    tmp = Path(tempfile.mkdtemp(prefix="qcard-bench-data-"))
    try:
        t = time.perf_counter()
        nbytes = make_images(tmp / "imgs", args.images)
        print(f"{args.images} JPEGs ({nbytes / 1e6:.0f} MB) written in {time.perf_counter() - t:.0f} s", flush=True)
        ref = f"imagefolder:{tmp / 'imgs'}"
        dataset = load_dataset(ref, "test")              # no model data config: ImageNet's 256/224 recipe
        assert dataset.preprocessing["resize"] == 256 and dataset.preprocessing["crop"] == [224, 224]
        workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers), dataset)
        torch.manual_seed(0)
        model = getattr(torchvision.models, args.model)(weights=None, num_classes=CLASSES).eval()
        print(f"model torchvision:{args.model} (random weights), batch {args.batch}, {workers} worker(s), "
              f"{torch.get_num_threads()} torch threads, {usable_cores()} usable cores", flush=True)
        results = [side_by_side("FP32 eval", model, dataset, tmp / "imgs", args.batch, workers, args.repeats)]
        sim = w8a8(model, load_dataset(ref, "train"), args.batch, workers)
        results.append(side_by_side("W8A8 eval", sim, dataset, tmp / "imgs", args.batch, workers, args.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import os
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "model": f"torchvision:{args.model}", "images": args.images, "batch": args.batch, "workers": workers,
              "torch_threads": torch.get_num_threads(), "cores": usable_cores(), "cpu": cpu_name(),
              "load_average_1min": load, "torch": torch.__version__, "python": platform.python_version(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Data loading: qcard's eval vs a plain torchvision loop",
        "",
        f"Measured {record['measured_at']} with `{record['command']}` on {record['cpu']} ({record['cores']} usable "
        f"cores, {record['torch_threads']} torch threads; 1-minute load average {load:.1f} when it ended: a shared "
        f"machine, so absolute images/s are low and noisy — the ratios are measured side by side, alternating order).",
        "",
        f"{args.images} generated JPEGs (375x500 and varied, 10 classes), Resize(256)/CenterCrop(224)/Normalize, "
        f"torchvision:{args.model} with random weights, batch {args.batch}, {workers} loader worker(s) on both sides "
        f"(qcard's `num_workers: auto` on this machine). Ratio = qcard images/s ÷ plain images/s, median of "
        f"{args.repeats} passes each (target ≥ 0.95).",
        "",
        "| eval | qcard img/s | plain img/s | ratio | same per-image outcomes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['eval']} | {r['qcard_img_s']} | {r['plain_img_s']} | {r['ratio']} | "
                     f"{'yes' if r['same_outcomes'] else 'no'} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print(f"written {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
