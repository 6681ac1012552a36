"""The shared training loop of the training methods (fp32_train, marvin, qat).

    log = train(model, data, recipe, ctx, hooks=[my_hooks])

A `TrainRecipe` (validated, strict) says how to train; `train` runs it deterministically from
ctx.seed (seeded shuffling, augmentation and re-initialization) and returns a `TrainLog` whose
curve goes on the card (method_stats.training).

Hooks let a method plug into the loop without copying it. A hook is any object with some of:

    on_train_start(state)            after (re-)initialization, before the first batch
    before_forward(state)            before each mini-batch's forward pass
    after_backward(state)            gradients of one optimizer step are in p.grad (all accumulated
                                     mini-batches), before the optimizer uses them: change them here
    after_step(state)                after optimizer.step() (and a per-step schedule)
    on_epoch_end(state, row)         row = this epoch's curve entry
    on_train_end(state)
    checkpoint_state()               what the hook must carry across a resume (tensors, numbers, strings,
                                     None, lists and dicts of them: torch.load(weights_only=True) reads it)
    restore_checkpoint_state(saved)  put it back (called after on_train_start, when a run resumes)

`state` is a TrainState: step (optimizer steps done, counting the current one), epoch (1-based),
batch / batches_per_epoch (mini-batch within the epoch), samples (in the current step), loss (mean
loss of the current step), model, optimizer. Hooks run in the order given.

Checkpoints: with ctx.checkpoint (a qcard.checkpoint.Checkpointer) the loop saves everything it and its
hooks hold after the optimizer steps the checkpointer says are due (and after the last one): model,
optimizer, scheduler, the curves so far, the random states (global, the shuffle stream at the epoch's
start, augmentation) and the place in the epoch. A rerun loads it and goes on from the next mini-batch,
mid-epoch included, so it ends bit-identical to a run that was never interrupted.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TrainRecipe", "TrainState", "TrainLog", "train", "LoaderBatches", "make_optimizer", "reinitialize",
           "shift_augment"]


class TrainRecipe(BaseModel):
    """How to train. One recipe is shared by the methods of a comparison (FP32 vs MARViN vs QAT)."""
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(64, ge=1, description="mini-batch size (one forward/backward)")
    grad_accumulation: int = Field(1, ge=1, description="mini-batches per optimizer step")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (adam/adamw: beta1)")
    weight_decay: float = Field(5e-4, ge=0, description="L2 decay through the optimizer")
    l1: float = Field(0.0, ge=0, description="L1 penalty on all trainable parameters, added to the loss")
    schedule: Literal["none", "cosine", "step", "plateau"] = "cosine"
    step_size: int = Field(30, ge=1, description="step schedule: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step/plateau schedule: lr factor")
    patience: int = Field(10, ge=0, description="plateau schedule: epochs without improvement of the train loss")
    plateau_threshold: float = Field(1e-4, ge=0, description="plateau schedule: relative improvement that counts")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    from_scratch: bool = Field(False, description="re-initialize all parameters (seeded by the run's seed)")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (quick runs)")
    augment: Literal["none", "shift"] = Field("none", description="shift: random shifts of up to shift_px pixels")
    shift_px: int = Field(2, ge=1, le=8)
    eval_every_epoch: bool = Field(False, description="evaluate on the eval split after each epoch (curve only)")

    @model_validator(mode="after")
    def _check(self) -> "TrainRecipe":
        if self.optimizer != "sgd" and self.momentum == 0:
            raise ValueError(f"optimizer '{self.optimizer}' uses momentum as beta1, which must be in (0, 1)")
        return self


@dataclass
class TrainState:
    model: Any
    optimizer: Any
    recipe: TrainRecipe
    step: int = 0
    epoch: int = 0
    batch: int = 0
    batches_per_epoch: int = 0
    total_steps: int = 0
    samples: int = 0
    loss: float = float("nan")
    lr: float = 0.0

    @property
    def epoch_progress(self) -> float:
        """Fraction of the current epoch done (1.0 at its last mini-batch)."""
        return self.batch / self.batches_per_epoch if self.batches_per_epoch else 0.0


STEP_CURVE_POINTS = 50      # points of the step-level training curve per run (a window of steps each)


@dataclass
class TrainLog:
    recipe: TrainRecipe
    curve: List[Dict[str, Any]] = field(default_factory=list)
    step_curve: List[Dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    epochs_run: float = 0.0
    samples_seen: int = 0
    seconds: float = 0.0
    stopped_by_max_steps: bool = False
    warnings: List[str] = field(default_factory=list)

    def to_stats(self) -> Dict[str, Any]:
        """The card's method_stats.training block."""
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "curve": self.curve,
            "steps": self.steps,
            "epochs_run": round(self.epochs_run, 4),
            "samples_seen": self.samples_seen,
            "seconds": round(self.seconds, 3),
            "stopped_by_max_steps": self.stopped_by_max_steps,
            "step_curve": self.step_curve,
            "curve_note": "loss and train_acc: running means over the epoch's mini-batches in train mode "
                          "(augmented); eval_acc: top-1 on the eval split after the epoch, when evaluated; "
                          f"step_curve: the same means over windows of optimizer steps (about {STEP_CURVE_POINTS} "
                          "points per run), so short runs and switches inside an epoch have a curve too",
        }


# ----------------------------------------------------------------------------- helpers

def make_optimizer(params, recipe: TrainRecipe):
    import torch
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=recipe.lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)


def reinitialize(model, seed: int) -> List[str]:
    """Re-initialize every module that has reset_parameters(), seeded; the caller's RNG is untouched.
    Returns the names of parameters that no reset_parameters() covers (left as they were)."""
    import torch
    covered = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for mname, module in model.named_modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters())
    return [n for n, _ in model.named_parameters() if n not in covered]


def shift_augment(x, max_shift: int, generator):
    """Each image shifted by a random (dy, dx) in [−max_shift, max_shift] pixels, zero padding
    at the normalized background value (the image's minimum), vectorized over the batch."""
    import torch
    import torch.nn.functional as F
    if x.dim() != 4:
        return x
    b, _, h, w = x.shape
    p = int(max_shift)
    shifts = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - fill, (p, p, p, p)) + fill
    rows = (torch.arange(h).view(1, h) + shifts[:, :1]).to(x.device)       # (b, h)
    cols = (torch.arange(w).view(1, w) + shifts[:, 1:]).to(x.device)       # (b, w)
    idx_b = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)]   # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def _call(hooks: Sequence[Any], name: str, *args) -> None:
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(*args)


def _evaluate(model, data, ctx) -> float:
    """Top-1 on the eval split. The global RNG is saved and restored (a DataLoader draws a seed from
    it), so evaluating every epoch or not leaves training bit-identical."""
    import torch
    with torch.random.fork_rng(devices=[]):
        if ctx.evaluate is not None:
            return float(ctx.evaluate(model, data.eval)["top1"])
        from .evaluate import evaluate
        return float(evaluate(model, data.eval, batch_size=data.batch_size, device=ctx.device)["top1"])


# ----------------------------------------------------------------------------- the loop

class LoaderBatches:
    """The default source of mini-batches: data.train shuffled from the run's seed, with the recipe's
    augmentation drawn from its own stream. A source is anything with len() (mini-batches per epoch) and
    epoch(n) -> iterable of (x, y)."""

    def __init__(self, data, recipe: TrainRecipe, seed: int, device: str):
        import torch
        self.loader = data.loader(data.train, shuffle=True, seed=seed, batch_size=recipe.batch_size)
        self.recipe, self.device = recipe, device
        self.aug_gen = torch.Generator().manual_seed(int(seed) * 7919 + 1)   # independent of the shuffle stream
        self._epoch_start = None          # the shuffle stream's state before the current epoch drew from it
        self._skip = 0                    # mini-batches the next epoch leaves out (a resumed run)

    def __len__(self) -> int:
        return len(self.loader)

    def checkpoint_state(self):
        return {"epoch_start": self._epoch_start, "augment": self.aug_gen.get_state()}

    def resumable(self) -> bool:
        from .checkpoint import ResumableShuffle
        return isinstance(self.loader.sampler, ResumableShuffle) and self.loader.generator is not None

    def restore_checkpoint_state(self, saved, batches_done: int) -> None:
        """The next epoch(n) is the saved epoch again, from its mini-batch batches_done + 1."""
        if saved["epoch_start"] is not None:          # None: saved before any epoch began
            self.loader.generator.set_state(saved["epoch_start"])
        self.aug_gen.set_state(saved["augment"])
        self._skip = int(batches_done)

    def epoch(self, n: int):
        self._epoch_start = self.loader.generator.get_state() if self.loader.generator is not None else None
        if self._skip:
            self.loader.sampler.start_at(self._skip * self.recipe.batch_size)   # skipped, not loaded
            self._skip = 0
        for x, y in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            if self.recipe.augment == "shift":
                x = shift_augment(x, self.recipe.shift_px, self.aug_gen)
            yield x, y


def _make_scheduler(optimizer, recipe: TrainRecipe, total_steps: int, lr_factor=None):
    import torch
    if lr_factor is not None:              # the caller's per-step factor replaces the recipe's schedule
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps))
    if recipe.schedule == "cosine":        # stepped per optimizer step
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    if recipe.schedule == "step":          # stepped per epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    if recipe.schedule == "plateau":       # stepped per epoch on the train loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=recipe.gamma, patience=recipe.patience, threshold=recipe.plateau_threshold)
    return None


@dataclass
class _Window:
    """Running sums over mini-batches: an epoch's curve row, or a step-curve window."""
    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss, self.correct, self.seen = self.loss + loss * n, self.correct + correct, self.seen + n

    def means(self) -> tuple:
        return self.loss / max(self.seen, 1), 100.0 * self.correct / max(self.seen, 1)


class _Loop:
    """One training run: the state shared by the epoch loop and the optimizer-step bookkeeping."""

    def __init__(self, model, data, recipe: TrainRecipe, ctx, hooks, params, log: TrainLog, batches, lr_factor):
        self.model, self.data, self.recipe, self.ctx, self.hooks, self.log = model, data, recipe, ctx, hooks, log
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_optimizer(list(params) if params is not None else self.trainable, recipe)
        self.batches = batches if batches is not None else LoaderBatches(data, recipe, ctx.seed, ctx.device)
        self.batches_per_epoch = len(self.batches)
        if self.batches_per_epoch == 0:
            raise ValueError("the training split is empty")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / recipe.grad_accumulation)
        total_steps = self.steps_per_epoch * recipe.epochs
        if recipe.max_steps is not None:
            total_steps = min(total_steps, recipe.max_steps)
        self.total_steps = total_steps
        self.per_step_schedule = lr_factor is not None or recipe.schedule == "cosine"
        self.scheduler = _make_scheduler(self.optimizer, recipe, total_steps, lr_factor)
        self.state = TrainState(model=model, optimizer=self.optimizer, recipe=recipe,
                                batches_per_epoch=self.batches_per_epoch, total_steps=total_steps,
                                lr=self.optimizer.param_groups[0]["lr"])
        self.curve_every = max(1, math.ceil(total_steps / STEP_CURVE_POINTS))
        self.window = _Window()           # the current step-curve window
        self.done = False
        self.checkpoint = None            # a Checkpointer, when the run keeps checkpoints (train() sets it)
        self.started = time.perf_counter()
        self.seconds_before = 0.0         # training time of the run this one resumed

    # -- checkpoints -----------------------------------------------------------------------------
    def snapshot(self, sums: _Window) -> Dict[str, Any]:
        """Everything the rest of the run depends on, after an optimizer step (references: save it at once)."""
        from .checkpoint import rng_state
        st, log = self.state, self.log
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "loop": {"step": st.step, "epoch": st.epoch, "batch": st.batch, "samples": st.samples, "loss": st.loss,
                     "lr": st.lr, "done": self.done, "window": [self.window.loss, self.window.correct, self.window.seen],
                     "sums": [sums.loss, sums.correct, sums.seen]},
            "log": {"curve": log.curve, "step_curve": log.step_curve, "samples_seen": log.samples_seen,
                    "stopped_by_max_steps": log.stopped_by_max_steps,
                    "seconds": self.seconds_before + time.perf_counter() - self.started},
            "batches": self.batches.checkpoint_state(),
            "rng": rng_state(),
            "hooks": [h.checkpoint_state() if callable(getattr(h, "checkpoint_state", None)) else None
                      for h in self.hooks],
        }

    def restore(self, snap: Dict[str, Any]) -> _Window:
        """Put a snapshot back; returns the running sums of its epoch so far."""
        from .checkpoint import set_rng_state
        if len(snap["hooks"]) != len(self.hooks):
            raise ValueError(f"it holds the state of {len(snap['hooks'])} hook(s), this run has {len(self.hooks)}")
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        lp, st = snap["loop"], self.state
        st.step, st.epoch, st.batch, st.samples, st.loss, st.lr = (lp["step"], lp["epoch"], lp["batch"], lp["samples"],
                                                                   lp["loss"], lp["lr"])
        self.done = lp["done"]
        self.window = _Window(*lp["window"])
        lg = snap["log"]
        self.log.curve, self.log.step_curve = list(lg["curve"]), list(lg["step_curve"])
        self.log.samples_seen, self.log.stopped_by_max_steps = lg["samples_seen"], lg["stopped_by_max_steps"]
        self.seconds_before = float(lg["seconds"])
        self.batches.restore_checkpoint_state(snap["batches"], st.batch)
        for h, saved in zip(self.hooks, snap["hooks"]):
            fn = getattr(h, "restore_checkpoint_state", None)
            if saved is not None and fn is None:
                raise ValueError(f"it holds state of a hook ({type(h).__name__}) that cannot take it back")
            if fn is not None:
                fn(saved)
        set_rng_state(snap["rng"])
        return _Window(*lp["sums"])

    def resume(self) -> Optional[_Window]:
        """Load the checkpoint, if there is a usable one; its epoch's running sums, or None (from step 0).
        A state that cannot be applied is rolled back whole: the run then starts from step 0."""
        snap = self.checkpoint.load()
        if snap is None:
            return None
        before = copy.deepcopy(self.snapshot(_Window()))
        try:
            return self.restore(snap)
        except Exception as exc:
            self.restore(before)
            self.checkpoint.restore_failed(exc)
            return None

    def maybe_save(self, sums: _Window) -> None:
        ck, step = self.checkpoint, self.state.step
        if ck is not None and ck.due(step, last=self.done or step >= self.total_steps):
            ck.save(step, self.snapshot(sums))

    def batch_loss(self, x, y):
        import torch.nn.functional as F
        recipe = self.recipe
        _call(self.hooks, "before_forward", self.state)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
        if recipe.l1 > 0:
            loss = loss + recipe.l1 * sum(p.abs().sum() for p in self.trainable)
        return logits, loss

    def optimizer_step(self, i: int, epoch: int, step_loss: float, step_samples: float, pending: int, bar) -> None:
        state, recipe, optimizer = self.state, self.recipe, self.optimizer
        state.step += 1
        state.samples = int(step_samples)
        state.loss = step_loss / pending
        _call(self.hooks, "after_backward", state)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()
        state.lr = optimizer.param_groups[0]["lr"]
        _call(self.hooks, "after_step", state)
        bar.update(1)
        if state.step % self.curve_every == 0 or state.step >= self.total_steps:
            loss, acc = self.window.means()
            self.log.step_curve.append({"step": state.step, "epoch": epoch,
                                        "epoch_progress": round(i / self.batches_per_epoch, 4),
                                        "loss": round(loss, 6), "train_acc": round(acc, 4), "lr": state.lr})
            self.window = _Window()
        if state.step >= self.total_steps and recipe.max_steps is not None:
            self.done = True
            self.log.stopped_by_max_steps = state.step < self.steps_per_epoch * recipe.epochs

    def run_epoch(self, epoch: int, bar, resumed: Optional[_Window] = None) -> _Window:
        """One pass over the training split (or up to max_steps); returns the epoch's running sums.
        resumed: the sums of a resumed epoch, which goes on after its state.batch-th mini-batch."""
        state, recipe = self.state, self.recipe
        state.epoch = epoch
        self.model.train()
        sums = resumed if resumed is not None else _Window()
        first = state.batch + 1 if resumed is not None else 1
        if self.done:                     # resumed after the last step: nothing left to run
            return sums
        pending = 0                       # mini-batches accumulated in the current step
        step_loss = step_samples = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(self.batches.epoch(epoch), first):
            state.batch = i
            logits, loss = self.batch_loss(x, y)
            # the last step of an epoch may hold fewer mini-batches: scale by its real count
            in_step = min(recipe.grad_accumulation, self.batches_per_epoch - (i - 1 - pending))
            (loss / in_step).backward()
            lv, n = float(loss.detach()), int(y.shape[0])
            batch_correct = float((logits.detach().argmax(1) == y).sum())
            sums.add(lv, batch_correct, n)
            self.window.add(lv, batch_correct, n)
            step_loss += lv
            step_samples += n
            pending += 1
            if pending < in_step:
                continue
            self.optimizer_step(i, epoch, step_loss, step_samples, pending, bar)
            pending, step_loss, step_samples = 0, 0.0, 0.0
            self.maybe_save(sums)
            if self.done:
                break
        return sums

    def end_epoch(self, epoch: int, sums: _Window, bar) -> None:
        state, recipe = self.state, self.recipe
        mean_loss, train_acc = sums.means()
        row: Dict[str, Any] = {"epoch": epoch, "step": state.step, "loss": round(mean_loss, 6),
                               "train_acc": round(train_acc, 4), "eval_acc": None, "lr": state.lr}
        if self.done and state.batch < self.batches_per_epoch:
            row["partial_epoch"] = round(state.batch / self.batches_per_epoch, 4)
        if recipe.eval_every_epoch:
            row["eval_acc"] = round(_evaluate(self.model, self.data, self.ctx), 4)
            self.model.train()
        self.log.curve.append(row)
        bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}")
        if recipe.schedule == "plateau" and not self.per_step_schedule:   # once per epoch, on the train loss
            self.scheduler.step(mean_loss)
        elif recipe.schedule == "step" and not self.per_step_schedule:    # once per epoch
            self.scheduler.step()
        state.lr = self.optimizer.param_groups[0]["lr"]
        _call(self.hooks, "on_epoch_end", state, row)
        self.log.samples_seen += int(sums.seen)


def _checkpointer(ctx, batches):
    """ctx's Checkpointer, when the batch source can be resumed (else None, and the log says why)."""
    ck = getattr(ctx, "checkpoint", None)
    if ck is None:
        return None
    ok = all(callable(getattr(batches, k, None)) for k in ("checkpoint_state", "restore_checkpoint_state"))
    if not ok or not getattr(batches, "resumable", lambda: True)():
        ctx.log(f"no checkpoints: the source of mini-batches ({type(batches).__name__}) cannot resume mid-epoch")
        return None
    return ck


def train(model, data, recipe: TrainRecipe, ctx, *, hooks: Optional[Iterable[Any]] = None,
          params: Optional[Iterable[Any]] = None, batches=None, lr_factor=None) -> TrainLog:
    """Train `model` in place on data.train following `recipe`; deterministic given ctx.seed.

    params: what the optimizer updates (tensors or param-group dicts); default every parameter
    that requires grad. batches: a source of mini-batches (see LoaderBatches; default: data.train
    shuffled from ctx.seed, with the recipe's augmentation). lr_factor(step, total_steps): a per-step
    learning-rate factor that replaces the recipe's schedule. The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    hooks = [hooks] if hooks is not None and not isinstance(hooks, (list, tuple)) else list(hooks or [])
    log = TrainLog(recipe=recipe)
    if recipe.from_scratch:
        left = reinitialize(model, ctx.seed)
        if left:
            msg = (f"from_scratch: {len(left)} parameter(s) have no reset_parameters() and keep their values: "
                   + ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
            log.warnings.append(msg)
            ctx.log(msg)
    model.to(ctx.device)
    loop = _Loop(model, data, recipe, ctx, hooks, params, log, batches, lr_factor)
    state = loop.state
    model.train()
    _call(hooks, "on_train_start", state)
    loop.checkpoint = _checkpointer(ctx, loop.batches)
    resumed = loop.resume() if loop.checkpoint is not None else None
    if resumed is not None:
        ctx.log(f"resumed from the checkpoint of step {state.step} (epoch {state.epoch}, mini-batch {state.batch})")
    bar = tqdm(total=loop.total_steps, initial=state.step, desc="train", unit="step", leave=False,
               disable=not ctx.progress)
    try:
        for epoch in range(state.epoch if resumed is not None else 1, recipe.epochs + 1):
            sums = loop.run_epoch(epoch, bar, resumed)
            resumed = None
            loop.end_epoch(epoch, sums, bar)
            if loop.done:
                break
    finally:
        bar.close()
    log.steps = state.step
    log.epochs_run = (state.epoch - 1) + (state.batch / loop.batches_per_epoch)
    log.seconds = loop.seconds_before + time.perf_counter() - loop.started
    model.eval()
    _call(hooks, "on_train_end", state)
    return log
