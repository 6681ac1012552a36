"""What a sweep will cost before it runs: `qcard run CONFIG --dry-run [--estimate]`.

plan_points() lists, per point, the work it implies (evaluation images, calibration passes, training steps,
reconstruction iterations x units) from the method's own `planned_work` hook (qcard.methods.work) and the
data's sizes. With estimate=True, a short timing probe on this machine (a few batches forward, and forward +
backward, of each model at its input shape, plain and with W8A8 fake quantization; a few images read and
decoded) turns the work into seconds. The estimate is a rough guide (within a factor of about 2): it
counts the passes above and nothing else (per-iteration optimizer overheads of small reconstruction units,
the cost tracer and the deploy check are left out).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .config import Experiment, Point
from .data.catalog import SPLIT_SIZES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PROBE_BATCH = 16          # images per timed batch
PROBE_BATCHES = 3         # timed batches after one warm-up batch (their median counts)
PROBE_ITEMS = 8           # images read and decoded to time the data


@dataclass
class ModelFacts:
    layers: Optional[int] = None            # conv/linear modules (shared ones once)
    blocks: Optional[int] = None            # reconstruction blocks (estimate only: needs the simulated model)
    error: Optional[str] = None             # why the model could not be built
    # seconds per image, from the probe
    fwd: Optional[float] = None
    train: Optional[float] = None
    quant_factor: float = 1.0               # W8A8 simulated forward / FP32 forward
    load: Dict[str, float] = field(default_factory=dict)   # split -> seconds per image read (with the workers)
    notes: List[str] = field(default_factory=list)
    device: str = "cpu"                     # where the probe ran


@dataclass
class PointPlan:
    point: Point
    eval_images: int
    fp32_eval: int                          # 0 when an earlier point of the sweep measures the same baseline
    train_size: int
    work: Dict[str, Any]
    facts: ModelFacts
    seconds: Optional[float] = None
    parts: Dict[str, float] = field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return len(self.point.seeds)


# --------------------------------------------------------------------------- sizes, without loading images

def _image_count(folder: Path) -> int:
    n = 0
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for _, _, files in os.walk(cls):
            n += sum(1 for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return n


def split_size(point: Point, split: str) -> Optional[int]:
    """Images in a split of the point's dataset, from the catalog or the files (None when unknown)."""
    ds = point.dataset
    if ds.ref == "synthetic":
        return ds.size or 64
    if ds.ref in SPLIT_SIZES:
        return SPLIT_SIZES[ds.ref].get(split)
    if ds.ref.startswith("imagefolder:"):
        root = Path(ds.ref[len("imagefolder:"):]).expanduser()
        if not root.is_dir():
            return None
        sub = {p.name for p in root.iterdir() if p.is_dir()}
        if sub & {"train", "val", "test"}:
            wanted = ["train"] if split == "train" else ["val", "test"]
            found = [w for w in wanted if w in sub]
            return _image_count(root / found[0]) if found else None
        return _image_count(root)
    return None


# --------------------------------------------------------------------------- the probe

def _timed(fn, repeats: int) -> float:
    """The median time of `repeats` calls after a warm-up call (allocations, lazy init)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _count_layers(model) -> int:
    import torch
    seen = {id(m) for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))}
    return len(seen)


def _probe_model(model, shape: Tuple[int, ...], device: str, facts: ModelFacts, want_blocks: Optional[int]) -> None:
    """Seconds per image forward and forward+backward; the W8A8 simulation's slowdown; block units."""
    import copy

    import torch
    x = torch.randn(PROBE_BATCH, *shape, device=device)
    model = model.to(device).eval()
    with torch.no_grad():
        facts.fwd = _timed(lambda: model(x), PROBE_BATCHES) / PROBE_BATCH
    trainable = copy.deepcopy(model).train()

    def step():
        out = trainable(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().mean().backward()
    facts.train = _timed(step, PROBE_BATCHES) / PROBE_BATCH
    try:
        from .methods.ptq.params import PTQParams
        from .quant.blocks import block_units
        from .quant.calibrate import calibrate_activations, set_weight_ranges
        from .quant.graph import build_simulated
        sim = build_simulated(copy.deepcopy(model), PTQParams(w_bits=8, a_bits=8, pipeline="minmax"), x[:1],
                              log=lambda m: None)
        set_weight_ranges(sim, "minmax")
        calibrate_activations(sim, [x.cpu()], device, False)
        with torch.no_grad():
            facts.quant_factor = max(1.0, _timed(lambda: sim(x), PROBE_BATCHES) / PROBE_BATCH / facts.fwd)
        if want_blocks is not None:
            facts.blocks = len(block_units(sim, want_blocks))
    except Exception as exc:  # a model the simulation cannot build: plain FP32 speed, said so
        facts.notes.append(f"W8A8 simulation not probed ({type(exc).__name__}: {exc}); FP32 speed used")


def _probe_data(dataset, workers: int) -> float:
    """Seconds per image read and preprocessed, divided over the loader's workers (0 for in-memory data)."""
    from .data.loaders import decodes_per_item
    n = min(PROBE_ITEMS, len(dataset))
    if n == 0 or not decodes_per_item(dataset):
        return 0.0
    t = time.perf_counter()
    for i in range(n):
        dataset[i]
    return (time.perf_counter() - t) / n / max(1, workers)


# --------------------------------------------------------------------------- the plan

def _max_block_layers(points: List[Point]) -> Optional[int]:
    for p in points:
        r = getattr(p.params, "reconstruction", None)
        steps = getattr(p.params, "steps", None) or []
        if r is not None and r.unit == "block" or any(s in ("brecq", "qdrop") for s in steps):
            return r.max_block_layers if r is not None else 3
    return None


def resolve_device(device: str) -> str:
    """The device the probe runs on: the config's, where this machine has it."""
    if device == "cpu":
        return "cpu"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_points(exp: Experiment, points: List[Point], *, estimate: bool = False,
                device: Optional[str] = None) -> List[PointPlan]:
    """One PointPlan per point, in order; with estimate, timed on this machine (the config's device where
    this machine has it). Models are built without their weights (architecture only; nothing downloaded)."""
    from .methods import resolve_method
    from .methods.work import default_work
    device = device or (resolve_device(points[0].device if points else "cpu") if estimate else "cpu")
    models: Dict[str, ModelFacts] = {}
    baselines: set = set()
    plans: List[PointPlan] = []
    for point in points:
        mkey = point.model.model_dump_json(exclude={"label"}) + point.dataset.model_dump_json(exclude={"calibration"})
        facts = models.get(mkey)
        if facts is None:
            facts = models[mkey] = _model_facts(point, points, estimate, device)
        eval_n = point.dataset.eval_size or split_size(point, point.dataset.eval_split) or 0
        train_n = split_size(point, "train") or 0
        cal = point.dataset.calibration
        method_cls = resolve_method(point.method)
        hook = getattr(method_cls, "planned_work", None) or default_work
        if hook is default_work and method_cls.family == "none" and getattr(point.params, "train", None) is None:
            hook = _no_work         # the FP32 model as it is: evaluated, nothing else
        work = hook(point.params, {"calibration_size": cal.size, "train_size": train_n, "eval_size": eval_n,
                                   "batch_size": point.dataset.batch_size, "layers": facts.layers,
                                   "blocks": facts.blocks})
        # the FP32 method's model is the baseline itself: no second evaluation
        work["quantized_eval"] = 0 if method_cls.family == "none" and not work["train"] else eval_n
        fp32 = 0 if mkey in baselines else eval_n
        baselines.add(mkey)
        plan = PointPlan(point, eval_n, fp32, train_n, work, facts)
        if estimate and facts.fwd is not None:
            _estimate(plan)
        plans.append(plan)
    return plans


def _no_work(params: Any, facts: Dict[str, Any]) -> Dict[str, Any]:
    from .methods.work import empty_work
    return empty_work()


def _model_facts(point: Point, points: List[Point], estimate: bool, device: str) -> ModelFacts:
    from .runner import set_seed
    from .zoo import load_model_with_info
    facts = ModelFacts(device=device)
    spec = point.model
    try:
        set_seed(point.seeds[0], False)
        model, info = load_model_with_info(spec.ref, num_classes=spec.num_classes, **spec.kwargs)
    except Exception as exc:  # the plan still lists the point; `qcard validate` says what is wrong
        facts.error = f"{type(exc).__name__}: {exc}"
        return facts
    facts.layers = _count_layers(model)
    if not estimate:
        return facts
    from .data import eval_subset, load_dataset
    from .data.loaders import resolve_num_workers
    ds = point.dataset
    kwargs = dict(root=ds.root, download=False, model_info=info, input_shape=ds.input_shape or spec.input_shape,
                  num_classes=ds.num_classes or (spec.num_classes if ds.ref == "synthetic" else None),
                  size=ds.size, seed=point.seeds[0], class_map=ds.class_map)
    try:
        train = load_dataset(ds.ref, "train", **kwargs)
        evaluation = eval_subset(load_dataset(ds.ref, ds.eval_split, **kwargs), ds.eval_size, ds.eval_subset)
    except Exception as exc:  # no data here: time the model only, and say so
        facts.notes.append(f"data not read ({type(exc).__name__}: {exc}); loading time not counted")
        train = evaluation = None
    shape = tuple(evaluation.input_shape) if evaluation is not None else tuple(
        ds.input_shape or spec.input_shape or info.input_shape)
    try:
        _probe_model(model, shape, device, facts, _max_block_layers([p for p in points if p.model == spec]))
    except Exception as exc:  # a model that cannot run on these images: not estimated, said so
        facts.fwd = None
        facts.notes.append(f"not timed: the model failed on {'x'.join(map(str, shape))} inputs "
                           f"({type(exc).__name__}: {exc})")
        return facts
    for split, data in (("train", train), ("eval", evaluation)):
        if data is not None:
            facts.load[split] = _probe_data(data, resolve_num_workers(ds.num_workers, data))
    return facts


def _estimate(plan: PointPlan) -> None:
    """Seconds of the point from its work and the probe; parts: eval, calibration, training, reconstruction."""
    f, w = plan.facts, plan.work
    q = f.quant_factor

    def images(n: int, per_image: float, split: str) -> float:
        # the loader's workers read while the model computes: the slower of the two sets the pace
        return n * max(per_image, f.load.get(split, 0.0))

    parts = {"eval": images(plan.fp32_eval, f.fwd, "eval")
             + plan.seeds * (1 + w.get("evals", 0)) * images(w["quantized_eval"], f.fwd * q, "eval")}
    cal = 0.0
    for row in w["passes"]:
        if row["model"] == "none":
            cal += images(row["images"] * row["count"], 0.0, "train")
        else:
            cal += images(row["images"] * row["count"], f.fwd * (q if row["model"] == "quantized" else 1), "train")
    parts["calibration"] = plan.seeds * cal
    if w["train"]:
        t = w["train"]
        parts["training"] = plan.seeds * images(t["images"], f.train * (q if t["model"] == "quantized" else 1),
                                                "train")
    rec = 0.0
    for r in w["reconstruction"]:
        units = r["units"] or f.layers or 1
        # every unit runs `iters` steps on `batch` images: all units together are one model's forward+backward
        # per step; each unit also captures its inputs (float and quantized) over the calibration images
        rec += r["iters"] * r["batch"] * f.train * q + units * plan.point.dataset.calibration.size * f.fwd * q
    if rec:
        parts["reconstruction"] = plan.seeds * rec
    plan.parts = {k: v for k, v in parts.items() if v}
    plan.seconds = sum(plan.parts.values())


# --------------------------------------------------------------------------- printing

def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 86400:.1f} days"


def _n(x: int) -> str:
    return f"{x:,}"


def work_lines(plan: PointPlan) -> List[str]:
    """The point's work, one item a line (indented under the point's own line)."""
    w, seeds = plan.work, plan.seeds
    per_seed = f" × {seeds} seeds" if seeds > 1 else ""
    out = [(f"eval: {_n(plan.fp32_eval)} FP32 images" if plan.fp32_eval else
            "eval: FP32 baseline shared with an earlier point")
           + (f" + {_n(w['quantized_eval'])} quantized{per_seed}" if w["quantized_eval"] else "")
           + (f" + {w['evals']} evaluations during training{per_seed}" if w.get("evals") else "")]
    for row in w["passes"]:
        count = f"{row['count']} × " if row["count"] > 1 else ""
        out.append(f"calibration: {row['what']}: {count}{_n(row['images'])} images{per_seed}")
    if w["train"]:
        t = w["train"]
        out.append(f"training ({t['model']} model): {_n(t['steps'])} steps, {_n(t['images'])} images "
                   f"forward+backward{per_seed}")
    for r in w["reconstruction"]:
        units = r["units"]
        if units is None:
            units_txt = (f"≤ {plan.facts.layers} {r['unit']}s (blocks counted with --estimate)"
                         if r["unit"] == "block" and plan.facts.layers else f"? {r['unit']}s")
            total = ""
        else:
            units_txt, total = f"{units} {r['unit']}s", f" = {_n(r['iters'] * units)} unit iterations"
        out.append(f"reconstruction {r['step']}: {_n(r['iters'])} iterations × {units_txt} (batch {r['batch']})"
                   f"{total}{per_seed}")
    for note in w.get("notes", []) + plan.facts.notes:
        out.append(f"note: {note}")
    if plan.facts.error:
        out.append(f"note: the model could not be built ({plan.facts.error}); layers not counted")
    if plan.seconds is not None:
        parts = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in plan.parts.items())
        out.append(f"estimated: {fmt_seconds(plan.seconds)} ({parts})")
    return out


def total_lines(plans: List[PointPlan], device: str) -> List[str]:
    evals = sum(p.fp32_eval + p.seeds * p.work["quantized_eval"] * (1 + p.work.get("evals", 0)) for p in plans)
    steps = sum(p.seeds * p.work["train"]["steps"] for p in plans if p.work["train"])
    rec = [p.seeds * r["iters"] * r["units"] for p in plans for r in p.work["reconstruction"] if r["units"]]
    uncounted = sum(1 for p in plans for r in p.work["reconstruction"] if not r["units"])
    line = (f"sweep total: {len(plans)} point(s); {_n(evals)} images evaluated; {_n(steps)} training steps; "
            f"{_n(sum(rec))} reconstruction unit iterations"
            + (f" (+ {uncounted} step(s) whose units are counted with --estimate)" if uncounted else ""))
    out = [line]
    timed = [p for p in plans if p.seconds is not None]
    if timed:
        from .provenance import cpu_name, gpu_name, torch_threads
        where = gpu_name() if device.startswith("cuda") else f"{cpu_name()}, {torch_threads()} torch threads"
        missing = len(plans) - len(timed)
        out.append(f"estimated wall time: {fmt_seconds(sum(p.seconds for p in timed))} on this machine ({where}), "
                   f"run one point after another" + (f"; {missing} point(s) not estimated" if missing else "")
                   + " — a rough guide (a factor of about 2), from a short timing probe")
    return out
