"""The work a method implies, as data, before it runs (`qcard run --dry-run`, `--estimate`).

A method class may have `planned_work(params, facts) -> dict` (each package's work.py); `facts` holds the
point's sizes: calibration_size, train_size, eval_size, batch_size, layers (conv/linear layers of the model,
None when not counted), blocks (reconstruction blocks, None when not counted). The dict it returns:

    passes          [{"what", "images", "count", "model": "fp32"|"quantized"}]  forward passes over images
    train           {"steps", "images", "model"}     optimizer steps; images forward+backward
    reconstruction  [{"step", "unit", "iters", "batch", "units"}]  iterations per unit x units (None: not counted)
    evals           extra evaluations of the eval set inside the method (eval_every_epoch)
    notes           [str]   what is not counted

A method without the hook gets default_work: the training of a `train:` recipe when its Params have one,
else nothing declared (the plan says so).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

__all__ = ["empty_work", "train_work", "default_work", "count_units"]


def empty_work() -> Dict[str, Any]:
    return {"passes": [], "train": None, "reconstruction": [], "evals": 0, "notes": []}


def train_work(recipe: Any, train_size: int, model: str = "fp32") -> Dict[str, Any]:
    """Steps and images of a qcard.training.TrainRecipe on a training split of train_size images."""
    batches = math.ceil(train_size / recipe.batch_size)
    steps = math.ceil(batches / recipe.grad_accumulation) * recipe.epochs
    if recipe.max_steps is not None:
        steps = min(steps, recipe.max_steps)
    images = min(steps * recipe.grad_accumulation * recipe.batch_size, recipe.epochs * train_size)
    return {"steps": int(steps), "images": int(images), "model": model}


def count_units(unit: str, facts: Dict[str, Any]) -> Optional[int]:
    return facts.get("layers") if unit == "layer" else facts.get("blocks")


def default_work(params: Any, facts: Dict[str, Any]) -> Dict[str, Any]:
    work = empty_work()
    recipe = getattr(params, "train", None)
    if recipe is not None and hasattr(recipe, "epochs"):
        work["train"] = train_work(recipe, facts["train_size"])
        work["evals"] = recipe.epochs if getattr(recipe, "eval_every_epoch", False) else 0
    else:
        work["notes"].append("the method declares no work of its own (no planned_work): only the evaluations "
                             "are counted")
    return work


def passes(what: str, images: int, count: int = 1, model: str = "quantized") -> List[Dict[str, Any]]:
    return [{"what": what, "images": int(images), "count": int(count), "model": model}] if count and images else []
