"""One reconstruction engine for AdaRound (layer units), BRECQ and QDrop (block units).

For each unit in topological order (quant.blocks):
  x_fp  its input in the FP network: an untouched FP copy of the simulated model taken when the engine
        starts (every quantizer off, FP weights), as MQBench does;
  x_q   its input in the network quantized so far (units before it rounded; activations quantized when
        `input: quantized`, FP when `input: fp_activations`, AIMET's AdaRound);
  target y_fp = unit_fp(x_fp); output y_q = unit_q(x_q) with the unit's weights soft-rounded
        (quant.rounding.LearnedRounding) and, with `quant_activations`, its activation quantizers on,
        their step sizes learned (LSQ, Adam with cosine decay) and, with `drop`, QDrop's drop.
  loss  ‖y_fp − y_q‖² (summed over features, mean over the batch) + λ·Σ(1 − |2h − 1|^β), β annealed
        linearly from beta_start to beta_end after a warm-up of warm_start·iters iterations without it.
Then the rounding is hardened and written into the weights (FP weights kept in `qcard_fp_weight`), the
learned activation grids fixed; the next unit sees them.

`targets: rounded_so_far` reproduces qcard's AdaRound before this engine, which took "FP" inputs from the
model being rounded with its quantizers off: its upstream weights already held rounded values, so x_fp
equalled x_q after the first layer. It exists so older cards can be reproduced; it is not a default.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import generator_state, set_generator_state
from .blocks import Unit, block_units, layer_units, units_record
from .calibrate import quant_state, sim_info
from .layerwise import Captured, capture_inputs, layer_forward, node_values, run_nodes
from .lsq import clamp_learned, freeze, make_lsq
from .quantizer import FakeQuantize
from .rounding import LearnedRounding, QDrop, attach, detach

__all__ = ["Settings", "reconstruct", "fp_copy", "UnitView"]


@dataclass
class Settings:
    unit: str = "block"                 # layer | block
    max_block_layers: int = 3
    iters: int = 20000
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    batch_size: int = 32
    lr: float = 1e-3                    # Adam on the rounding logits V
    scale_lr: float = 4e-5              # Adam on the activation step sizes (cosine decay)
    input: str = "quantized"            # quantized | fp_activations
    quant_activations: bool = True      # activation quantizers inside the unit on while reconstructing
    drop: bool = False                  # QDrop on the unit's activation quantizers
    drop_prob: float = 0.5              # QDrop: keep the quantized value with this probability (1: as BRECQ)
    targets: str = "fp_model"           # fp_model | rounded_so_far (qcard's AdaRound before the engine)
    label: str = "brecq"                # the step's name in the card's record


def fp_copy(model: nn.Module) -> nn.Module:
    """An FP copy of a simulated model: every quantizer off, rounded weights back to their FP values."""
    memo: Dict[int, Any] = {}
    fp = copy.deepcopy(model, memo)
    if getattr(fp, "qcard_sim", None) is None:      # fx's deepcopy keeps only the graph's own attributes
        fp.qcard_sim = copy.deepcopy(sim_info(model), memo)
    info = sim_info(fp)
    mods = {id(m) for m in fp.modules()}
    if any(id(li.module) not in mods for li in info.gemm_layers() if li.module is not None):
        raise RuntimeError("the FP copy's layer records do not point into the copy")
    for q in list(info.weight_quantizers()) + list(info.act_quantizers.values()):
        q.enabled = False
    if info.input_quantizer is not None:
        info.input_quantizer.enabled = False
    with torch.no_grad():
        for m in fp.modules():
            w = m.__dict__.get("qcard_fp_weight")
            if w is not None:
                m.weight.copy_(w)
    for p in fp.parameters():
        p.requires_grad_(False)
    return fp


def _act(name: Optional[str]):
    if name == "relu":
        return torch.relu
    if name == "relu6":
        return F.relu6
    return lambda y: y


class UnitView:
    """A unit as seen in one model (the simulated model, or its FP copy)."""

    def __init__(self, model: nn.Module, unit: Unit, names: Dict[int, str]):
        self.model, self.unit = model, unit
        if unit.kind == "layer" and not unit.nodes:
            m = model.get_submodule(names[id(unit.modules[0])])
            info = sim_info(model)
            li = next(l for l in info.gemm_layers() if l.module is m)
            self.module = m
            self.act = _act(None) if li.bn == "kept" else _act(m.qcard_act)
        else:
            by_name = {n.name: n for n in model.graph.nodes}
            self.nodes = [by_name[n.name] for n in unit.nodes]
            self.input = by_name[unit.input.name]
            self.module = None

    def inputs(self, batches, device) -> torch.Tensor:
        return torch.cat(self.per_batch(batches, device))

    def per_batch(self, batches, device) -> List[torch.Tensor]:
        if self.module is not None:
            return capture_inputs(self.model, self.module, batches, device)
        return node_values(self.model, batches, self.input.name, device)

    def capture(self, batches, device) -> Captured:
        """The unit's input for every calibration image, captured one batch at a time into a bounded store."""
        store = Captured()
        for b in batches:
            for x in self.per_batch([b], device):
                store.append(x)
        return store

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            m = self.module
            wq = m.weight_quantizer
            w = wq(m.weight) if (wq is not None and wq.enabled) else m.weight
            return self.act(layer_forward(m, x, w))
        return run_nodes(self.model, self.nodes, {self.input: x})


def _sq_err(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y - t).pow(2).flatten(1).sum(1).mean()


_CHUNK = 256          # samples per no-grad forward when computing targets and losses


@torch.no_grad()
def _loss(view: UnitView, x: Captured, target: Captured, chunk: int = _CHUNK) -> float:
    total = 0.0
    for i in range(0, len(x), chunk):
        y = view(x.slice(i, i + chunk))
        total += float((y - target.slice(i, i + chunk)).pow(2).flatten(1).sum(1).sum())
    return total / len(x)


@torch.no_grad()
def _fp_targets(fview: UnitView, batches, device, x_q: Captured) -> Tuple[Captured, float]:
    """The FP unit's outputs (targets), streamed: the FP input is captured one calibration batch at a
    time and run through the FP unit in chunks of _CHUNK samples of the whole set (the same chunks as
    when the whole input was held), so memory holds one chunk, not the set. Also mean |x_fp − x_q|."""
    target = Captured()
    pending: List[torch.Tensor] = []
    held, pos, gap, count = 0, 0, 0.0, 0
    for b in batches:
        for x in fview.per_batch([b], device):
            xq = x_q.slice(pos, pos + x.shape[0])
            gap += float((x - xq).abs().double().sum())
            count += x.numel()
            pos += x.shape[0]
            pending.append(x)
            held += x.shape[0]
            while held >= _CHUNK:
                whole = torch.cat(pending) if len(pending) > 1 else pending[0]
                target.append(fview(whole[:_CHUNK]))
                pending, held = [whole[_CHUNK:]], held - _CHUNK
    if held:
        target.append(fview(torch.cat(pending) if len(pending) > 1 else pending[0]))
    return target, gap / max(1, count)


def reconstruct(model: nn.Module, batches: Sequence[torch.Tensor], s: Settings, device: str = "cpu",
                seed: int = 0, progress: bool = False, only: Optional[Sequence[str]] = None,
                checkpoint=None) -> Dict[str, Any]:
    """Reconstruct every unit of `model` (or the units named in `only`) in place; returns the card's
    record (settings, units, losses per unit). checkpoint: a qcard.checkpoint.Checkpointer of this loop
    (saves after every unit and, on its schedule, inside one; a rerun goes on from the last save)."""
    allowed = {"unit": ("layer", "block"), "input": ("quantized", "fp_activations"),
               "targets": ("fp_model", "rounded_so_far")}
    for key, ok in allowed.items():
        if getattr(s, key) not in ok:
            raise ValueError(f"reconstruction {key}: '{getattr(s, key)}' is not one of {', '.join(ok)}")
    if not 0.0 < s.drop_prob <= 1.0:
        raise ValueError(f"reconstruction drop_prob must be in (0, 1], got {s.drop_prob}")
    t_start = time.perf_counter()
    units = layer_units(model) if s.unit == "layer" else block_units(model, s.max_block_layers)
    if only is not None:
        unknown = sorted(set(only) - {u.name for u in units})
        if unknown:
            raise ValueError(f"no reconstruction unit named {unknown}; units: {', '.join(u.name for u in units)}")
        units = [u for u in units if u.name in set(only)]
    names = {id(m): n for n, m in model.named_modules()}
    # taken before a resume puts the model of the units done back: the same FP copy as an uninterrupted run's
    fp = fp_copy(model) if s.targets == "fp_model" else None
    gen = torch.Generator().manual_seed(seed)
    drop_gen = torch.Generator().manual_seed(seed + 1)
    record: Dict[str, Any] = {**asdict(s), "units": units_record(units), "per_unit": []}
    ck = _Checkpoints(checkpoint, model, s, len(units), gen, drop_gen, seed, record) if checkpoint is not None else None
    first = ck.resume() if ck is not None else 0
    while True:
        try:
            _run_units(model, units[first:], first, batches, s, device, progress, names, fp, gen, drop_gen,
                       record, ck)
            break
        except _RestoreFailed as exc:        # the saved loop state did not fit: everything starts over
            ck.start_over(exc.__cause__)
            first = 0
    record["wall_s"] = round(time.perf_counter() - t_start + (ck.seconds_before if ck is not None else 0.0), 3)
    return record


def _run_units(model, units: Sequence[Unit], offset: int, batches, s: Settings, device, progress, names, fp,
               gen, drop_gen, record, ck: Optional["_Checkpoints"]) -> None:
    acts_on = None if s.input == "quantized" else False
    it: Sequence[Unit] = units
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(units, desc=s.label, leave=False)
    for k, unit in enumerate(it, offset):
        t0 = time.perf_counter()
        if ck is not None:
            ck.begin(k)
        view = UnitView(model, unit, names)
        if fp is not None:
            with quant_state(model, activations=acts_on):
                x_q = view.capture(batches, device)
            target, gap = _fp_targets(UnitView(fp, unit, names), batches, device, x_q)
        else:                                           # the old AdaRound's way, kept as it was
            with quant_state(model, weights=False, activations=False):
                x_fp = view.inputs(batches, device)
                with torch.no_grad():
                    target = Captured()
                    target.append(view(x_fp))
            with quant_state(model, activations=acts_on):
                x_q = view.capture(batches, device)
            gap = float((x_fp - x_q.slice(0, len(x_q))).abs().double().mean())
            del x_fp
        try:
            row = _reconstruct_unit(model, view, unit, x_q, target, s, gen, drop_gen, ck)
        finally:
            x_q.close()
            target.close()
        seconds = ck.unit_seconds() if ck is not None else time.perf_counter() - t0
        row.update(unit=unit.name, seconds=round(seconds, 3), input_gap=gap)
        record["per_unit"].append(row)
        if ck is not None:
            ck.unit_done()


def _reconstruct_unit(model, view: UnitView, unit: Unit, x_q, target, s: Settings, gen, drop_gen,
                      ck: Optional["_Checkpoints"] = None) -> Dict[str, Any]:
    info = sim_info(model)
    act_on = s.quant_activations and s.input == "quantized"
    acts: List[FakeQuantize] = []
    if act_on and unit.nodes:
        qs = {id(q) for q in info.act_quantizers.values()}
        for n in view.nodes:
            if n.op == "call_module":
                q = model.get_submodule(str(n.target))
                if id(q) in qs and q.enabled and q.calibrated and not q.dynamic and q.estimator is None:
                    acts.append(q)
    with quant_state(model, activations=None if act_on else False):
        before = _loss(view, x_q, target)
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved:              # only what this unit learns takes gradients
            p.requires_grad_(False)
        ests = []
        for m in unit.modules:
            est = LearnedRounding(m.weight_quantizer, m.weight)
            attach(m.weight_quantizer, est)
            ests.append((m, est))
        scale_params = []
        for q in acts:
            if q.spec.scale_format != "power_of_two":
                make_lsq(q)
                scale_params += [p for p in (q.scale, q.zero_point) if p.requires_grad]
            if s.drop:
                attach(q, QDrop(s.drop_prob, drop_gen, q.estimator))
        for m, _ in ests:               # the simulated layers route the weight through its quantizer under grad
            m.weight.requires_grad_(True)
        opt = torch.optim.Adam([e.v for _, e in ests], lr=s.lr)
        opt_s = torch.optim.Adam(scale_params, lr=s.scale_lr) if scale_params else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=max(1, s.iters)) if opt_s else None
        n = len(x_q)
        bs = min(s.batch_size, n)
        warm = int(s.warm_start * s.iters)
        first, last, k = 0.0, 0.0, max(1, s.iters // 20)
        start, t_before = 0, 0.0
        loop = ck.take_loop() if ck is not None else None
        t_loop = time.perf_counter()
        try:
            if loop is not None:        # a resumed run: this unit goes on after the saved iteration
                try:
                    start, first, last, t_before = _restore_loop(loop, ests, acts, opt, opt_s, sched)
                except Exception as exc:
                    for m, _ in ests:
                        detach(m.weight_quantizer)
                    raise _RestoreFailed() from exc
            for i in range(start, s.iters):
                idx = torch.randint(0, n, (bs,), generator=gen)
                out = view(x_q.take(idx))
                rec = _sq_err(out, target.take(idx))
                loss = rec
                if i >= warm and s.reg > 0:
                    t = (i - warm) / max(1, s.iters - warm)
                    beta = s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - t)
                    reg = None
                    for _, e in ests:
                        r = e.regulariser(beta)
                        reg = r if reg is None else reg + r
                    loss = loss + s.reg * reg
                opt.zero_grad(set_to_none=True)
                if opt_s is not None:
                    opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if opt_s is not None:
                    opt_s.step()
                    sched.step()
                    for q in acts:
                        clamp_learned(q)
                if i < k:
                    first += float(rec.detach()) / k
                if i >= s.iters - k:
                    last += float(rec.detach()) / k
                if ck is not None and i + 1 < s.iters and ck.due(i + 1):   # the unit's end saves anyway
                    ck.save_loop(i + 1, {
                        "iteration": i + 1, "v": [e.v.detach() for _, e in ests],
                        "grids": [[q.scale.detach(), q.zero_point.detach()] for q in acts],
                        "opt": opt.state_dict(), "opt_s": opt_s.state_dict() if opt_s is not None else None,
                        "sched": sched.state_dict() if sched is not None else None,
                        "first": first, "last": last, "loop_s": t_before + time.perf_counter() - t_loop})
            t_loop = time.perf_counter() - t_loop + t_before
        finally:
            for p, r in saved:
                p.requires_grad_(r)
                p.grad = None
            for q in acts:
                if isinstance(q.estimator, QDrop):
                    detach(q, q.estimator.inner)
                freeze(q)
        changed = []
        with torch.no_grad():
            for m, e in ests:
                w_new = e.weight_for(e.hard())
                detach(m.weight_quantizer)
                if "qcard_fp_weight" not in m.__dict__:
                    m.__dict__["qcard_fp_weight"] = m.weight.detach().clone()
                m.weight.copy_(w_new)
                m.weight_quantizer.rounding_label = "adaround"      # AdaRound's rounding, in every unit kind
                changed.append(e.changed_vs_nearest())
        after = _loss(view, x_q, target)
    return {"loss_nearest": before, "loss_after": after, "loss_first_iters": first, "loss_last_iters": last,
            "changed_vs_nearest": sum(changed) / max(1, len(changed)), "layers": list(unit.layers),
            "iter_s": t_loop / max(1, s.iters)}


# ----------------------------------------------------------------------------- checkpoints

class _RestoreFailed(Exception):
    """A checkpoint's loop state did not fit the unit it was saved for (the cause is chained)."""


def _restore_loop(loop: Dict[str, Any], ests, acts, opt, opt_s, sched) -> Tuple[int, float, float, float]:
    """Put a unit's saved loop back (after its estimators and optimizers were set up as at its start);
    returns (next iteration, running loss sums first/last, loop seconds so far). A state that does not
    fit raises (shapes are checked before anything is copied); the caller then rolls the whole run back."""
    vs, grids = loop["v"], loop["grids"]
    if len(vs) != len(ests) or len(grids) != len(acts) or any(len(g) != 2 for g in grids):
        raise ValueError(f"it holds {len(vs)} rounding tensors and {len(grids)} activation grids, "
                         f"the unit has {len(ests)} and {len(acts)}")
    pairs = [(e.v, v) for (_, e), v in zip(ests, vs)]
    pairs += [(t, g) for q, gr in zip(acts, grids) for t, g in zip((q.scale, q.zero_point), gr)]
    for t, v in pairs:
        if not isinstance(v, torch.Tensor) or v.shape != t.shape or v.dtype != t.dtype:
            raise ValueError(f"a saved tensor does not match the unit's {tuple(t.shape)} {t.dtype}")
    if (opt_s is None) != (loop["opt_s"] is None):
        raise ValueError("it was saved with another set of learned activation steps")
    with torch.no_grad():
        for t, v in pairs:
            t.copy_(v)
    opt.load_state_dict(loop["opt"])
    if opt_s is not None:
        opt_s.load_state_dict(loop["opt_s"])
        sched.load_state_dict(loop["sched"])
    return int(loop["iteration"]), float(loop["first"]), float(loop["last"]), float(loop["loop_s"])


def _model_state(model: nn.Module) -> Dict[str, Any]:
    """What reconstruction changes in a model, on the CPU, in the form torch.load(weights_only=True) reads:
    parameters and buffers (rounded weights, frozen activation grids), and two attributes state_dict
    leaves out: each layer's FP weight (`qcard_fp_weight`) and each quantizer's rounding label."""
    mods = list(model.named_modules())
    return {"tensors": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "fp_weights": {n: m.__dict__["qcard_fp_weight"].detach().to("cpu", copy=True) for n, m in mods
                           if "qcard_fp_weight" in m.__dict__},
            "rounding_labels": {n: m.rounding_label for n, m in mods if isinstance(m, FakeQuantize)}}


def _set_model_state(model: nn.Module, st: Dict[str, Any]) -> None:
    mods = dict(model.named_modules())
    unknown = sorted((set(st["fp_weights"]) | set(st["rounding_labels"])) - set(mods))
    if unknown:
        raise ValueError(f"it names modules this model does not have: {unknown[:3]}")
    model.load_state_dict(st["tensors"])
    for n, m in mods.items():
        w = st["fp_weights"].get(n)
        if w is not None:
            m.__dict__["qcard_fp_weight"] = w.to(m.weight.device)
        else:
            m.__dict__.pop("qcard_fp_weight", None)
        if isinstance(m, FakeQuantize):
            if n in st["rounding_labels"]:
                m.rounding_label = st["rounding_labels"][n]
            m._vbase += 1               # the grids' tensors changed in place: no cached weight survives
            m.drop_caches()


class _Checkpoints:
    """The engine's checkpoints (a qcard.checkpoint.Checkpointer `ck` of its own stage): after every
    finished unit, and inside a unit after the iterations the Checkpointer's schedule says are due (its
    step counts iterations over the units: iteration i of the k-th unit is step k·iters + i), so a
    killed run loses at most that many iterations.

    A save holds the model as it was when the current unit started (the units done: their rounded
    weights, FP weights, rounding labels and frozen activation grids), the per-unit rows so far, both
    generators (the mini-batch draws and QDrop's), and, inside a unit, its loop: the rounding logits V,
    the learned activation grids, both Adam states, the cosine schedule, the iteration and the running
    loss sums. A resumed run puts the model back and captures the unit's inputs and targets from it
    again, as an uninterrupted run does when the unit starts (tests/test_checkpoint_reconstruction.py
    checks that the cards are the same)."""

    def __init__(self, ck, model: nn.Module, s: Settings, n_units: int, gen, drop_gen, seed: int,
                 record: Dict[str, Any]):
        self.ck, self.model, self.s, self.n_units = ck, model, s, n_units
        self.gen, self.drop_gen, self.seed, self.record = gen, drop_gen, seed, record
        self.unit = 0
        self.base: Optional[Dict[str, Any]] = None     # the model when this unit started (None: as found)
        self.seconds_before = 0.0                      # wall time of the runs this one went on from
        self.started = time.perf_counter()
        self._loop: Optional[Dict[str, Any]] = None    # the resumed unit's saved loop (taken once)
        self._initial: Optional[Dict[str, Any]] = None  # the model as found, while a resume may be undone
        self._unit_before, self._t_unit = 0.0, time.perf_counter()

    # -- resuming ------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the last save, if any, and put it back; returns the index of the unit to go on with."""
        state = self.ck.load()
        if state is None:
            return 0
        self._initial = _model_state(self.model)
        try:
            nxt, rows, loop = int(state["next_unit"]), list(state["per_unit"]), state["loop"]
            if not 0 <= nxt <= self.n_units or len(rows) != nxt or (loop is not None and nxt == self.n_units):
                raise ValueError(f"it is at unit {nxt} with {len(rows)} rows done; this run has {self.n_units} units")
            if state["model"] is not None:
                _set_model_state(self.model, state["model"])
            set_generator_state(self.gen, state["gen"])
            set_generator_state(self.drop_gen, state["drop_gen"])
        except Exception as exc:
            self.start_over(exc)
            return 0
        self.base, self._loop, self.seconds_before = state["model"], loop, float(state["seconds"])
        self.record["per_unit"][:] = rows
        where = (f"unit {nxt + 1} of {self.n_units}, iteration {loop['iteration']} of {self.s.iters}"
                 if loop is not None else f"{nxt} of {self.n_units} units done")
        self.ck.log(f"{self.s.label}: resumed from the checkpoint of step {self.ck.resumed_from['step']} ({where})")
        return nxt

    def start_over(self, exc: BaseException) -> None:
        """A saved state that could not be applied: the model, generators and rows as found; from unit 0."""
        if self._initial is not None:
            _set_model_state(self.model, self._initial)
        self.gen.manual_seed(self.seed)
        self.drop_gen.manual_seed(self.seed + 1)
        self.record["per_unit"].clear()
        self.base, self._loop, self._initial, self.seconds_before = None, None, None, 0.0
        self.ck.restore_failed(exc)

    def take_loop(self) -> Optional[Dict[str, Any]]:
        loop, self._loop = self._loop, None
        self._unit_before = float(loop["unit_s"]) if loop is not None else 0.0
        return loop

    # -- saving --------------------------------------------------------------------------------
    def begin(self, k: int) -> None:
        self.unit, self._t_unit = k, time.perf_counter()

    def unit_seconds(self) -> float:
        return self._unit_before + time.perf_counter() - self._t_unit

    def due(self, i: int) -> bool:
        return self.ck.due(self.unit * self.s.iters + i)

    def save_loop(self, i: int, loop: Dict[str, Any]) -> None:
        self._save(self.unit * self.s.iters + i, self.unit, dict(loop, unit_s=self.unit_seconds()))

    def unit_done(self) -> None:
        self.base, self._initial = _model_state(self.model), None
        self._save((self.unit + 1) * self.s.iters, self.unit + 1, None)

    def _save(self, step: int, next_unit: int, loop: Optional[Dict[str, Any]]) -> None:
        self.ck.save(step, {"next_unit": next_unit, "model": self.base, "per_unit": self.record["per_unit"],
                            "gen": generator_state(self.gen), "drop_gen": generator_state(self.drop_gen),
                            "seconds": self.seconds_before + time.perf_counter() - self.started, "loop": loop})
