"""The only place that orders the steps: points -> executor -> store.

For each point: load model and data -> FP32 baseline (cached by fingerprint) -> method, once per
seed -> evaluate -> cost -> card. A point that fails becomes a failed card; the others go on.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from .config import Experiment, Point, canonical_hash, load_config
from .errors import QcardError, RunInterrupted
from .store import CARD_FILE, RunStore


@dataclass
class PointOutcome:
    point: Point
    status: str                  # ok | failed | skipped | elsewhere (another qcard run holds its lock)
    folder: Path
    card: Optional[Dict[str, Any]] = None
    error: Optional[str] = None


@dataclass
class RunSummary:
    experiment: str
    out_dir: Path
    outcomes: List[PointOutcome] = field(default_factory=list)

    @property
    def failed(self) -> List[PointOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def _echo(msg: str) -> None:
    print(msg, flush=True)


def set_seed(seed: int, deterministic: bool) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


class Resources:
    """Models, datasets and traces loaded once per run and shared by the points that need them."""

    def __init__(self, exp: Experiment, store: RunStore, device: str, log: Callable[[str], None]):
        self.exp, self.store, self.device, self.log = exp, store, device, log
        self.baselines: Dict[str, Dict[str, Any]] = {}
        self._models: Dict[str, Any] = {}
        self._data: Dict[str, Any] = {}
        self._traces: Dict[str, Any] = {}

    def model(self, point: Point):
        from .zoo import load_model_with_info
        spec = point.model
        key = canonical_hash(spec.model_dump(mode="json", exclude={"label"}))
        if key not in self._models:
            set_seed(point.seeds[0], point.deterministic)  # random-init models are reproducible
            model, info = load_model_with_info(spec.ref, weights=spec.weights, pretrained=spec.pretrained,
                                               num_classes=spec.num_classes, **spec.kwargs)
            model.eval()
            self._models[key] = (model, info)
        return self._models[key]

    def datasets(self, point: Point, info):
        from .data import check_fits_model, eval_subset, load_dataset
        ds = point.dataset
        input_shape = ds.input_shape or point.model.input_shape
        key = canonical_hash({"ds": ds.model_dump(mode="json", exclude={"calibration"}),
                              "data_config": getattr(info, "data_config", None), "shape": input_shape,
                              "classes": ds.num_classes or point.model.num_classes})
        if key not in self._data:
            kwargs = dict(root=ds.root, download=ds.download, model_info=info, input_shape=input_shape,
                          num_classes=ds.num_classes or (point.model.num_classes if ds.ref == "synthetic" else None),
                          size=ds.size, seed=point.seeds[0], class_map=ds.class_map)
            train = load_dataset(ds.ref, "train", **kwargs)
            evaluation = eval_subset(load_dataset(ds.ref, ds.eval_split, **kwargs), ds.eval_size, ds.eval_subset)
            model = self.model(point)[0]
            for split in (train, evaluation):        # before any image is scored
                check_fits_model(split, info, point.model.ref, model)
            self._data[key] = (train, evaluation)
        return self._data[key]

    def trace(self, point: Point, model, input_shape):
        """The model's ModelTrace at input_shape (qcard.cost.trace), a copy the caller may change."""
        from .cost.trace import trace_model
        key = canonical_hash({"m": point.model.model_dump(mode="json", exclude={"label"}), "s": list(input_shape)})
        if key not in self._traces:
            self._traces[key] = trace_model(model, tuple(input_shape))
        return copy.deepcopy(self._traces[key])


@dataclass
class PointJob:
    """What an executor runs: the points of one experiment, written under root. Picklable, so that a
    worker process or a Ray task runs a point where it lands; models and data load once per process."""
    exp: Experiment
    root: str
    device: str                  # as the executor resolved it; resolved again in the process that runs
    progress: bool = False
    force: bool = False
    started: float = 0.0         # when the run began: a card written since then is another run's work

    def store(self) -> RunStore:
        return RunStore(Path(self.root))

    def resources(self, log: Callable[[str], None]) -> "Resources":
        return Resources(self.exp, self.store(), _resolve_device(self.device), log)

    def execute(self, point: Point, resources: "Resources", log: Callable[[str], None]) -> PointOutcome:
        """Run one point under its lock (qcard.store.PointLock): a point another qcard run holds, or has
        finished since this run listed its points, is left to that run."""
        store = resources.store
        folder = store.point_dir(point.folder)
        lock = store.lock(point.folder)
        got, note = lock.acquire()
        if not got:
            return PointOutcome(point, "elsewhere", folder, error=f"being run by another qcard run ({note})")
        try:
            if note:
                log(f"    {note} in {folder}")
            card, _ = store.card_state(point.folder, point.id)
            if card is not None and (not self.force or (folder / CARD_FILE).stat().st_mtime >= self.started):
                return PointOutcome(point, "skipped", folder, card)       # finished by another run meanwhile
            removed = store.clean_partial(point.folder)
            if removed:
                log(f"    removed {removed} partial file(s) left by an interrupted run in {folder}")
            with _warnings_to(log, point):
                return _execute(point, self.exp, store, resources, resources.device, self.progress, log)
        finally:
            lock.release()

    def failed(self, point: Point, error: str, details: str, log: Callable[[str], None]) -> PointOutcome:
        """The failed card of a point whose process died (or whose task could not run): written here."""
        store = self.store()
        lock = store.lock(point.folder)
        got = lock.acquire()[0]           # the dead process's lock (same host) is taken over, then removed
        try:
            store.write_text(point.folder, "error.log", details)
            card = failed_card(point, self.exp, error, time.time())
            _write_card(store, point, card, log)
        finally:
            if got:
                lock.release()
        return PointOutcome(point, "failed", store.point_dir(point.folder), card.model_dump(mode="json"), error)

    def baseline_group(self, point: Point) -> str:
        """Points of one group share one FP32 baseline (same model, eval data and device)."""
        return canonical_hash({"m": point.model.model_dump(mode="json", exclude={"label"}),
                               "d": point.dataset.model_dump(mode="json", exclude={"calibration"}),
                               "device": self.device})

    def baseline(self, point: Point, resources: "Resources"):
        """(cache key, FP32 result) of the point's baseline, measured or read from the store's cache;
        None when it cannot be had (the point itself then fails with the reason)."""
        try:
            pr = _PointRun(point, self.exp, resources, resources.device, False, resources.log)
            try:
                pr.load()
                pr.baseline()
            finally:
                if getattr(pr, "loaders", None) is not None:
                    pr.loaders.close()
            return next((k, v) for k, v in resources.baselines.items() if v is pr.fp32)
        except Exception:
            return None


def run(config: Union[str, os.PathLike, Experiment], *, out: Optional[str] = None, force: bool = False,
        only: Optional[List[str]] = None, progress: Optional[bool] = None, workers: int = 1,
        executor: str = "local", address: Optional[str] = None, max_retries: Optional[int] = None,
        log: Callable[[str], None] = _echo) -> RunSummary:
    """Run the points of an experiment. executor "local": in this process, or with workers > 1 in that
    many processes; "ray": as tasks on a Ray cluster (address; a failed task is retried max_retries
    times). Finished points are skipped; cards are written as points finish; the summary keeps the
    config's order."""
    from .deploy import check_extra
    from .executors import make_executor
    exp = config if isinstance(config, Experiment) else load_config(config)
    points = exp.points()
    if only:
        points = [p for p in points if any(p.id.startswith(o) for o in only)]
        if not points:
            raise QcardError(f"no point of experiment '{exp.name}' has an id starting with {', '.join(only)}; "
                             "see `qcard run CONFIG --dry-run` for the ids")
    chosen = make_executor(executor, workers=workers, address=address, max_retries=max_retries,
                           resources=exp.config.resources)
    check_extra(any(p.deploy is not None for p in points))      # onnx/onnxruntime present, before any point
    if progress is None:
        progress = sys.stderr.isatty()
    store = RunStore(exp.out_dir(out))
    job = PointJob(exp, str(store.root), chosen.device(exp.config.device, _resolve_device), progress, force,
                   time.time())
    summary = RunSummary(exp.name, store.root)
    log(f"qcard: experiment '{exp.name}': {len(points)} point(s) -> {store.root}")
    for w in exp.warnings:
        log(f"warning: {w}")
    todo = _todo(points, store, force, summary, log)

    def report(i: int, outcome: PointOutcome) -> None:
        summary.outcomes.append(_report(outcome, i, len(points), store, log))

    with _sigterm_interrupts():
        chosen.run(job, todo, report, log)
    order = {p.id: k for k, p in enumerate(points)}
    summary.outcomes.sort(key=lambda o: order[o.point.id])
    n_ok = sum(o.status == "ok" for o in summary.outcomes)
    n_skip = sum(o.status == "skipped" for o in summary.outcomes)
    n_else = sum(o.status == "elsewhere" for o in summary.outcomes)
    elsewhere = f", {n_else} being run by another qcard run (rerun later to see them)" if n_else else ""
    log(f"qcard: {n_ok} ran, {n_skip} skipped, {len(summary.failed)} failed{elsewhere}; cards in {store.root}")
    return summary


def preflight(exp: Experiment, log: Callable[[str], None] = _echo) -> int:
    """What would fail every point of a model, found before anything runs (`qcard validate`): each model is
    built and the data its points read is loaded (no image is scored beyond one forward pass): the output
    width against the dataset's classes, the channels, and a calibration size larger than the training
    split. Raises ConfigError naming the file and key; returns how many models were checked."""
    from .errors import ConfigError
    from .methods import resolve_method
    res = Resources(exp, RunStore(exp.out_dir()), "cpu", log)
    checked, failed, problems = set(), set(), []
    model_keys = [canonical_hash(m.model_dump(mode="json", exclude={"label"})) for m in exp.config.models]
    for point in exp.points():
        mkey = canonical_hash(point.model.model_dump(mode="json", exclude={"label"}))
        where = ("models", model_keys.index(mkey)) if mkey in model_keys else ("models",)
        if mkey in failed:
            continue
        try:
            _, info = res.model(point)             # built, and its data loaded, once per model
            # data that would be downloaded is not fetched here: only the model is built
            train = None if point.dataset.download else res.datasets(point, info)[0]
        except QcardError as exc:
            problems.append(exp.error(where, str(exc)))
            failed.add(mkey)
            continue
        checked.add(mkey)
        if train is None:
            continue
        size = point.dataset.calibration.size
        if resolve_method(point.method).family != "none" and size > len(train):
            problems.append(exp.error(("dataset", "calibration", "size"),
                                      f"calibration size {size} is larger than the training split of "
                                      f"{point.dataset.ref} ({len(train)} images), which calibration draws from; "
                                      f"use at most {len(train)}"))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(str(p) for p in problems)))
    return len(checked)


def _todo(points: List[Point], store: RunStore, force: bool, summary: RunSummary, log: Callable[[str], None]):
    """[(place in the config, point)] of the points to run: finished ones are skipped (recorded in the
    summary). Partial files of an interrupted run are removed by the point's runner, under its lock."""
    todo = []
    for i, point in enumerate(points, 1):
        folder = store.point_dir(point.folder)
        finished, why_not = store.card_state(point.folder, point.id)
        if not force and finished:
            _clean_if_free(store, point, log)
            log(f"{_prefix(i, len(points), point)}: already done, skipped (use --force to rerun)")
            summary.outcomes.append(PointOutcome(point, "skipped", folder))
            continue
        if why_not:
            log(f"{_prefix(i, len(points), point)}: the card there is not a finished card, rerunning ({why_not})")
        todo.append((i, point))
    return todo


@contextlib.contextmanager
def _warnings_to(log: Callable[[str], None], point: Point):
    """Python warnings raised while a point runs (torch's, a user method's) go to the run's log naming the
    point, in order with its other lines, not to stderr where they land under another point's line."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")          # each distinct warning once per point
        try:
            yield
        finally:
            for w in caught:
                log(f"    warning ({point.model.short} · {point.method_label}, {point.id[:10]}): "
                    f"{w.category.__name__}: {str(w.message).strip().splitlines()[0] if str(w.message).strip() else ''}")


def _clean_if_free(store: RunStore, point: Point, log: Callable[[str], None]) -> None:
    """Partial files in a finished point's folder (a killed --force rerun) are removed, unless another
    run holds the point's lock (they are its files being written)."""
    lock = store.lock(point.folder)
    try:
        got = lock.acquire()[0]
    except OSError:            # a read-only folder of finished cards: nothing to clean, nothing to write
        return
    if got:
        try:
            removed = store.clean_partial(point.folder)
            if removed:
                log(f"  removed {removed} partial file(s) left by an interrupted run in {store.point_dir(point.folder)}")
        finally:
            lock.release()


def _prefix(i: int, n: int, point: Point) -> str:
    swept = point.values(point.swept)      # what tells this point from its neighbours in a sweep
    return f"[{i}/{n}] {point.model.short} · {point.method_label}{' ' + swept if swept else ''} ({point.id[:10]})"


def _execute(point: Point, exp: Experiment, store: RunStore, resources: "Resources", device: str,
             progress: bool, log: Callable[[str], None]) -> PointOutcome:
    """Run one point and write its folder (card.json, card.md, error.log for a failure)."""
    # index: the point's place in the config's order, for tools that list cards in that order
    store.write_point_config(point.folder, {**point.canonical(), "index": point.index})
    started = time.time()
    try:
        card = run_point(point, exp, resources, device=device, progress=progress, log=log)
        status, error = "ok", None
    except Exception as exc:  # a failed point is recorded and the sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        store.write_text(point.folder, "error.log", traceback.format_exc())
        card = failed_card(point, exp, error, started)
        status = "failed"
    _write_card(store, point, card, log)
    if status == "ok" and not point.checkpoint.keep:     # a failed point keeps them: its rerun resumes
        from .checkpoint import remove_checkpoints
        remove_checkpoints(store.point_dir(point.folder))
    return PointOutcome(point, status, store.point_dir(point.folder), card.model_dump(mode="json"), error)


def _write_card(store: RunStore, point: Point, card, log: Callable[[str], None]) -> None:
    """card.md first (a rendering problem must not leave a 'finished' card.json without it), then card.json."""
    from .cards.render import render_card
    try:
        md = render_card(card, "md")
    except Exception as exc:       # the results are in card.json; say so instead of losing the sweep
        md = (f"# Quantization card\n\nRendering failed ({type(exc).__name__}: {exc}); card.json next to "
              f"this file holds every result. Re-render with `qcard render card.json` after a fix.\n")
        log(f"    warning: card.md could not be rendered ({type(exc).__name__}: {exc}); card.json is complete")
    store.write_text(point.folder, "card.md", md)
    store.write_card(point.folder, card.to_json())


def _report(outcome: PointOutcome, i: int, n: int, store: RunStore, log: Callable[[str], None]) -> PointOutcome:
    prefix, folder = _prefix(i, n, outcome.point), outcome.folder
    if outcome.status == "skipped":
        log(f"{prefix}: finished meanwhile by another qcard run, skipped")
    elif outcome.status == "elsewhere":
        log(f"{prefix}: {outcome.error}, left to it")
    elif outcome.status == "ok":
        r = outcome.card["results"]
        std = f" ± {r['std']:.2f}" if r.get("std") else ""
        log(f"{prefix}: {r['metric']} {r['quantized']:.2f}{std} (FP32 {r['fp32']:.2f}, "
            f"Δ {r['delta']:+.2f}) -> {folder / 'card.md'}")
    else:
        log(f"{prefix}: FAILED: {outcome.error} (details in {folder / 'error.log'})")
    return outcome


# ------------------------------------------------------------------ signals

def _raise_interrupted(signum, frame):
    raise RunInterrupted(signum)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (timeout, Slurm, kill) stops the driver the way Ctrl-C does, so it can stop its workers."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise QcardError("config asks for device 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _point_data(point: Point, train, evaluation, loaders=None):
    from .methods.base import PointData
    cal = point.dataset.calibration
    return PointData(train=train, eval=evaluation, num_classes=train.num_classes, input_shape=tuple(train.input_shape),
                     batch_size=point.dataset.batch_size, num_workers=point.dataset.num_workers,
                     calibration_size=cal.size, calibration_seed=cal.seed, fingerprint=evaluation.fingerprint,
                     loaders=loaders)


class _PointRun:
    """One point, in the order the card reads: load, FP32 baseline, the method once per seed, cost, card."""

    def __init__(self, point: Point, exp: Experiment, res: Resources, device: str, progress: bool,
                 log: Callable[[str], None]):
        self.point, self.exp, self.res, self.device, self.progress, self.log = point, exp, res, device, progress, log
        self.timings: Dict[str, float] = {}
        self.seed_outcomes: Dict[int, str] = {}     # seed -> packed top-1 outcomes (qcard.stats.outcomes)
        self.is_baseline = False                     # the point's model is the FP32 baseline itself
        self.resumed: List[Dict[str, Any]] = []      # [{seed, step}]: seeds that went on from a checkpoint
        self.memory = None                           # provenance.PeakMemory sampling this point (run_point)

    def timed(self, key: str, fn, *args):
        t = time.time()
        try:
            return fn(*args)
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.time() - t

    def load(self) -> None:
        point = self.point
        self.base_model, self.info = self.res.model(point)
        train, self.evaluation = self.res.datasets(point, self.info)
        from .data.loaders import PointLoaders
        self.loaders = PointLoaders(point.dataset.num_workers, self.device)
        self.data = _point_data(point, train, self.evaluation, self.loaders)

    def evaluate(self, model, dataset=None, desc: str = "evaluate"):
        from .evaluate import evaluate
        ds = self.point.dataset
        return evaluate(model.to(self.device), dataset if dataset is not None else self.evaluation,
                        batch_size=ds.batch_size, device=self.device, progress=self.progress, desc=desc,
                        loaders=self.loaders)

    def baseline(self) -> None:
        """The FP32 accuracy and per-image outcomes, measured on this run's data and preprocessing, cached
        across points and runs (OUT/.cache/fp32) under a key of everything that changes the FP32 outputs.
        A cached entry is used only when the model's logits on the first eval images still match the ones
        stored with it; otherwise (or for an entry of an older qcard) it is measured again."""
        from .stats.outcomes import pack_outcomes
        res = self.res
        key = baseline_key(self.point, self.info, self.base_model, self.evaluation, self.device)
        baseline = res.baselines.get(key)
        if baseline is None:
            cached = _with_outcomes(res.store.baseline(key), len(self.evaluation))
            probe = self.probe_logits()
            if cached is not None:
                why = _probe_mismatch(cached.get("probe"), probe)
                if why:
                    self.log(f"    the cached FP32 baseline of {self.point.model.short} ({res.store.cache / 'fp32'}) "
                             f"does not match the model now ({why}): measuring it again")
                    cached = None
            baseline = cached
        if baseline is None:
            metrics = self.evaluate(self.base_model, desc=f"FP32 {self.point.model.short}")
            baseline = {"top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"],
                        "outcomes": pack_outcomes(metrics["correct"]), "probe": probe}
            res.store.save_baseline(key, baseline)
        res.baselines[key] = self.fp32 = baseline

    def probe_logits(self) -> Dict[str, Any]:
        """The FP32 model's logits on the first PROBE_IMAGES eval images: the cheap check of a cached baseline."""
        import torch
        n = min(PROBE_IMAGES, len(self.evaluation))
        x = torch.stack([self.evaluation[i][0] for i in range(n)]).float().to(self.device)
        with torch.no_grad():
            out = self.base_model.to(self.device)(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return {"n": n, "logits": [[round(float(v), 5) for v in row] for row in out.detach().cpu().reshape(n, -1)]}

    def one_seed(self, method, seed: int):
        """(the method's result, {seed, top1, top5}) for one seed; its per-image outcomes go to seed_outcomes."""
        from .methods.base import RunContext
        from .quant.int_bias import round_biases, saturation_warnings
        from .stats.outcomes import pack_outcomes
        point = self.point
        set_seed(seed, point.deterministic)
        model = copy.deepcopy(self.base_model).to(self.device)
        ctx = RunContext(seed=seed, device=self.device, progress=self.progress, log=lambda m: self.log(f"    {m}"),
                         evaluate=lambda m, d=None: self.evaluate(m, d, desc="evaluate (method)"),
                         checkpoint=self.checkpointer(seed))
        result = self.timed("method", method.apply, model, self.data, point.params, ctx)
        result.warnings += saturation_warnings(round_biases(result.model))    # the bias integer runtimes add
        if ctx.checkpoint is not None:
            self.resumed += [{"seed": seed, **r} for r in ctx.checkpoint.resumed()]
        for w in result.warnings:
            self.log(f"    warning: {w}")
        if result.model is model and type(method).family == "none" and not result.pipeline:
            metrics = self.fp32  # the untouched FP32 model on the same data: evaluated once, above
            self.seed_outcomes[seed] = self.fp32["outcomes"]
            self.is_baseline = True
        else:
            metrics = self.timed("evaluate", self.evaluate, result.model,
                                 None, f"{point.method_label} {point.model.short} seed {seed}")
            self.seed_outcomes[seed] = pack_outcomes(metrics["correct"])
        return result, {"seed": seed, "top1": metrics["top1"], "top5": metrics["top5"]}

    def checkpointer(self, seed: int):
        """The seed's Checkpointer in the point folder (qcard.checkpoint), or None when the config turns
        them off. A checkpoint is loaded only by a run of the same point, seed, weights, device and code."""
        spec = self.point.checkpoint
        if not spec.enabled:
            return None
        import torch
        from .checkpoint import Checkpointer
        from .version import __version__
        fingerprint = canonical_hash({"point": self.point.id, "seed": seed, "weights": self.info.weights_sha256,
                                      "device": self.device, "qcard": __version__, "torch": torch.__version__})
        return Checkpointer(self.res.store.point_dir(self.point.folder), f"seed{seed}", fingerprint,
                            every_steps=spec.every_steps, every_minutes=spec.every_minutes,
                            log=lambda m: self.log(f"    {m}"))

    def card(self):
        from . import provenance
        from .cards.schema import CARD_SCHEMA_VERSION, card_from_dict
        from .methods import resolve_method
        from .methods.base import card_sections_of
        point, started_at, t_start = self.point, provenance.now_iso(), time.time()
        self.timed("load", self.load)
        self.timed("fp32_baseline", self.baseline)
        method_cls = resolve_method(point.method)
        method = method_cls()
        self.timings.update(method=0.0, evaluate=0.0)
        per_seed, figures = [], []
        for seed in point.seeds:        # one simulated model alive at a time
            result, row = self.one_seed(method, seed)
            per_seed.append(row)
            figures.append({"seed": seed, **_scalar_figures(result.stats)})
        method_stats = dict(result.stats)
        if len(point.seeds) > 1:
            # the full statistics (and the cost) are the last seed's; every seed's headline figures are kept
            method_stats["stats_seed"] = point.seeds[-1]
            method_stats["per_seed"] = figures
        info, data = self.info, self.data
        # the shape that was evaluated (the eval data's), unless the config asks for another explicitly:
        # a model's default size (timm's pretrained_cfg) may differ from the data it ran on
        input_shape = tuple(point.cost.input_shape or getattr(self.evaluation, "input_shape", None)
                            or data.input_shape or point.model.input_shape or info.input_shape)
        cost, cost_profiles, cost_warnings, layers = self.timed("cost", compute_cost, point, self.res,
                                                                self.base_model, input_shape, result.layers)
        quantization, layer_warnings = _headline(method_cls, result.quantization, layers)
        deployment = self.deploy(result.model, cost, method_cls.name or point.method)   # the last seed's model
        cost_warnings += layer_warnings
        for w in cost_warnings:
            self.log(f"    warning: {w}")
        prov = provenance.collect(seed=point.seeds[0], deterministic=point.deterministic,
                                  config_sha256=self.exp.config_sha256, device=self.device)
        memory = self.memory.record() if self.memory is not None else None     # peak so far: the point's
        prov.update(memory=memory, data_loading=self.loaders.describe(self.evaluation))
        prov.update(started_at=started_at, finished_at=provenance.now_iso(),
                    wall_seconds=round(time.time() - t_start, 3),
                    timings={k: round(self.timings[k], 3) for k in
                             ("load", "fp32_baseline", "method", "evaluate", "cost")})
        if self.resumed:
            prov["resumed"] = self.resumed
        card = {
            "schema_version": CARD_SCHEMA_VERSION, "id": point.id, "experiment": self.exp.name,
            "description": point.description or None, "status": "ok", "error": None,
            # params as the cost counts them: those that ran in the eval pass (not_run reported in the cost)
            "model": {**_model_block(point, info, input_shape), "params": cost["params"]},
            "dataset": _dataset_block(point, self.evaluation, result.calibration),
            "method": {"name": method_cls.name or point.method, "family": method_cls.family,
                       "params": point.params.model_dump(mode="json"), "pipeline": list(result.pipeline),
                       "label": point.method_label},
            "quantization": quantization,
            "results": _results_block(self.fp32, per_seed, point.seeds, self.seed_outcomes,
                                      self.evaluation.fingerprint, self.is_baseline),
            "cost": cost,
            "cost_profiles": cost_profiles,
            "method_stats": method_stats,
            "sections": card_sections_of(method, method_stats),
            "warnings": list(result.warnings) + cost_warnings + _data_warnings(self.evaluation, result.calibration),
            "provenance": prov,
            "reproduce": reproduce_command(self.exp, point),
            "point": point_block(point),
            "deployment": deployment,
        }
        from .evaluate import chance_check
        card["results"]["chance"] = chance_check(self.fp32, self.evaluation, self.data.num_classes)
        return card_from_dict(card, f"card of point {point.id[:10]}")


    def deploy(self, model, cost, method: str):
        """The deploy check (qcard.deploy) of a simulated model on the eval images the simulation was
        scored on; None when the point asks for none."""
        spec = self.point.deploy
        if spec is None:
            return None
        from .deploy import deploy_check
        self.log(f"    deploy check on {spec.runtime} ({spec.threads} thread(s))")
        return self.timed("deploy", lambda: deploy_check(
            model, self.evaluation, threads=spec.threads, batch_sizes=spec.batch_sizes,
            latency_runs=spec.latency_runs, latency_budget_s=spec.latency_budget_s, opset=spec.opset,
            int4_weights=spec.int4_weights, method=method,
            simulated_speedup=cost.get("speedup_vs_fp32"), eval_batch_size=self.point.dataset.batch_size))


def run_point(point: Point, exp: Experiment, res: Resources, *, device: str, progress: bool,
              log: Callable[[str], None]):
    from .provenance import PeakMemory
    run = _PointRun(point, exp, res, device, progress, log)
    with PeakMemory() as run.memory:
        try:
            return run.card()
        finally:
            if getattr(run, "loaders", None) is not None:
                run.loaders.close()


def _results_block(fp32: Dict[str, Any], per_seed: List[Dict[str, Any]], seeds,
                   seed_outcomes: Optional[Dict[int, str]] = None, fingerprint: Optional[str] = None,
                   is_baseline: bool = False) -> Dict[str, Any]:
    # the outcome-derived figures by the functions `qcard card validate` checks them with (cards.evidence)
    from .cards.evidence import summary_figures
    return {
        "metric": "top1", "fp32": fp32["top1"], **summary_figures(fp32["top1"], [r["top1"] for r in per_seed]),
        "top5_fp32": fp32["top5"], "top5": round(statistics.fmean(r["top5"] for r in per_seed), 4),
        "n_runs": len(per_seed), "seeds": list(seeds),
        "per_seed": per_seed,
        **_intervals(fp32, [r["seed"] for r in per_seed], seed_outcomes or {}, fingerprint, is_baseline),
    }


def _intervals(fp32: Dict[str, Any], seeds: List[int], seed_outcomes: Dict[int, str],
               fingerprint: Optional[str], is_baseline: bool = False) -> Dict[str, Any]:
    """The results' outcomes block and 95 % intervals (cards.evidence.interval_figures); none without
    outcomes. The FP32 point is the baseline itself: its Δ is 0 by construction, with no interval."""
    from .cards.evidence import interval_figures
    from .stats.outcomes import ENCODING, unpack_outcomes
    n = fp32.get("n")
    if not fp32.get("outcomes") or not n or not seeds or any(s not in seed_outcomes for s in seeds):
        return {}
    fp_bits = unpack_outcomes(fp32["outcomes"], n)
    bits = [unpack_outcomes(seed_outcomes[s], n) for s in seeds]
    return {
        **interval_figures(fp_bits, bits, is_baseline),
        "outcomes": {"encoding": ENCODING, "n": n, "fingerprint": fingerprint, "fp32": fp32["outcomes"],
                     "seeds": {str(s): seed_outcomes[s] for s in seeds}},
    }


PROBE_IMAGES = 4           # eval images whose FP32 logits are stored with a cached baseline
PROBE_TOLERANCE = 1e-3     # relative to the largest logit: threads and devices change the last digits only


def baseline_key(point: Point, info, model, evaluation, device: str) -> str:
    """The FP32 cache key: the model (reference, kwargs, shapes; not its label or the weights' path), its
    weights (content), the code that defines it, the eval data with its preprocessing (the fingerprint),
    the device, torch's CPU threads (reductions, so the last digits, depend on them), qcard and torch."""
    import torch
    from .version import __version__
    from .zoo.loader import code_sha256
    return canonical_hash({
        "model": point.model.model_dump(mode="json", exclude={"label", "weights"}),
        "weights": info.weights_sha256, "code": code_sha256(point.model.ref, model),
        "eval": evaluation.fingerprint, "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "qcard": __version__, "torch": torch.__version__,
    })


def _probe_mismatch(cached: Optional[Dict[str, Any]], now: Dict[str, Any]) -> Optional[str]:
    """Why cached probe logits differ from the model's now (None when they match)."""
    if not isinstance(cached, dict) or not isinstance(cached.get("logits"), list):
        return "no logits stored with it"
    a, b = cached["logits"], now["logits"]
    if cached.get("n") != now["n"] or [len(r) for r in a] != [len(r) for r in b]:
        return "its logits have another shape"
    scale = max([1.0] + [abs(v) for row in b for v in row])
    worst = max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)
    if worst > PROBE_TOLERANCE * scale:
        return f"logits of the first {now['n']} eval images differ by up to {worst:.4g}"
    return None


def _with_outcomes(cached: Optional[Dict[str, Any]], n: int) -> Optional[Dict[str, Any]]:
    """A cached FP32 baseline that carries valid outcomes for the n eval images, else None (measure again)."""
    from .stats.outcomes import unpack_outcomes
    if not cached or not isinstance(cached.get("outcomes"), str) or cached.get("n") != n:
        return None
    try:
        unpack_outcomes(cached["outcomes"], n)
    except QcardError:
        return None
    return cached


def _scalar_figures(stats: dict) -> dict:
    """The numbers and short strings at the top two levels of a method's statistics, as 'a.b' keys
    (e.g. marvin.inference_speedup): what differs from seed to seed, without per-layer tables."""
    out = {}
    for k, v in (stats or {}).items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for k2, v2 in items:
            if isinstance(v2, bool) or v2 is None or not isinstance(v2, (int, float, str)):
                continue
            if isinstance(v2, str) and len(v2) > 40:
                continue
            out[k if k2 is None else f"{k}.{k2}"] = v2
    return out


def compute_cost(point: Point, res: Resources, model, input_shape, method_layers):
    """(cost block of the first profile, the other profiles' totals, warnings, the per-layer records):
    the traced layers with the method's bits merged in by name; a method record that matches no traced
    layer is reported, not added."""
    from .cost import estimate, load_profile, merge_layer_records
    traced = res.trace(point, model, input_shape)
    records = traced.records
    warnings = merge_layer_records(records, method_layers)
    blocks = {}
    for name in point.cost.profiles:    # params: what ran in the eval pass; the rest is reported apart
        blocks[name] = estimate(records, load_profile(name), total_params=traced.params, not_run=traced.not_run)
    first = point.cost.profiles[0]
    extra = {k: {kk: vv for kk, vv in v.items() if kk != "layers"} for k, v in blocks.items() if k != first}
    return blocks[first], extra, warnings, records


def _headline(method_cls, quantization, layers):
    """(the quantization block, warnings): for PTQ and QAT (blocks read from the simulated model), the
    headline bits, first/last layer and FP32 flags re-read from the card's per-layer records, so
    that layers the simulation left alone count as FP32. Other methods write their own block."""
    if method_cls.family not in ("ptq", "qat"):
        return quantization, []
    from .quant.report import reconcile_with_layers
    return reconcile_with_layers(quantization, layers)


SHARED_IMAGES = "the evaluated images (single image folder: no train/ subfolder)"


def _data_warnings(evaluation, calibration) -> List[str]:
    info = getattr(evaluation, "split_info", None) or {}
    if info.get("shared_with_other_splits") and calibration:
        return ["calibration/training images were drawn from the evaluated images: the image folder has no "
                "train/ and val/ subfolders, so the accuracy is measured on data the method has seen; "
                "add PATH/train and PATH/val for an honest figure"]
    return []


def _model_block(point: Point, info, input_shape) -> Dict[str, Any]:
    return {"ref": point.model.ref, "source": info.source, "weights": info.weights, "label": point.model.label,
            "weights_sha256": info.weights_sha256, "params": info.params,
            "input_shape": list(input_shape) if input_shape else None}


def _dataset_block(point: Point, evaluation, calibration) -> Dict[str, Any]:
    if calibration and (getattr(evaluation, "split_info", None) or {}).get("shared_with_other_splits"):
        calibration = {**calibration, "split": SHARED_IMAGES}   # the method says "train"; the folder had none
    return {"ref": point.dataset.ref, "eval_split": point.dataset.eval_split, "eval_size": len(evaluation),
            "fingerprint": evaluation.fingerprint, "calibration": calibration,
            "preprocessing": getattr(evaluation, "preprocessing", None),
            "split_info": getattr(evaluation, "split_info", None)}


def reproduce_command(exp: Experiment, point: Point) -> str:
    """The command that reruns this point. User code named by the point (a `python:pkg.module:callable`
    model, a `pkg.module:Class` method) is imported from PYTHONPATH: the line names the folder each
    top-level package was found in, unless it is installed (site-packages)."""
    import importlib.util
    import shlex
    import site
    import sysconfig
    from .version import __version__
    from .provenance import git_state
    config = str(exp.path) if exp.path else "CONFIG.yaml"
    commit, _ = git_state()
    pin = f"qcard {__version__}" + (f" (git {commit[:12]})" if commit else "")
    user_code = [point.model.ref[len("python:"):]] if point.model.ref.startswith("python:") else []
    user_code += [point.method] if ":" in point.method else []
    installed = {os.path.realpath(p) for p in [*sysconfig.get_paths().values(), *site.getsitepackages(),
                                               site.getusersitepackages()]}
    roots: List[str] = []
    for target in user_code:
        top = target.partition(":")[0].split(".")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None or top == "qcard":
            continue
        where = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
        root = os.path.dirname(os.path.realpath(where[0])) if where else None
        if root and root not in installed and root not in roots:
            roots.append(root)
    env = f"PYTHONPATH={shlex.quote(os.pathsep.join(roots))} " if roots else ""
    return f"{env}qcard run {shlex.quote(config)} --only {point.id[:10]} --force  # {pin}"


def failed_card(point: Point, exp: Experiment, error: str, started: float):
    from . import provenance
    from .cards.schema import CARD_SCHEMA_VERSION, card_from_dict, unquantized_block
    try:
        from .methods import resolve_method
        cls = resolve_method(point.method)
        name, family = cls.name or point.method, cls.family
    except Exception:
        name, family = point.method, "other"
    prov = provenance.collect(seed=point.seeds[0], deterministic=point.deterministic, config_sha256=exp.config_sha256)
    prov.update(started_at=None, finished_at=provenance.now_iso(), wall_seconds=round(time.time() - started, 3))
    return card_from_dict({
        "schema_version": CARD_SCHEMA_VERSION, "id": point.id, "experiment": exp.name,
        "description": point.description or None, "status": "failed", "error": error,
        "model": {"ref": point.model.ref, "source": point.model.ref.split(":")[0], "label": point.model.label},
        "dataset": {"ref": point.dataset.ref, "eval_split": point.dataset.eval_split},
        "method": {"name": name, "family": family, "params": point.params.model_dump(mode="json"),
                   "label": point.method_label},
        "quantization": unquantized_block(), "results": {"metric": "top1", "seeds": list(point.seeds)},
        "cost": {}, "provenance": prov, "reproduce": reproduce_command(exp, point), "point": point_block(point),
    })


def point_block(point: Point) -> Dict[str, Any]:
    """The card's `point`: this point's place in its config and a config of it alone (qcard verify)."""
    return {"index": point.index, "config": point.as_config()}
