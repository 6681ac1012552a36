"""Accuracy of a model on a dataset (top-1 / top-5 in points, 0-100).

Ties between logits (8-bit logits tie often) break toward the lowest class index, for top-1 and
top-5 alike (top-1 is the first of the top-5 and equals `argmax`): `topk` does not promise an
order among equal values, so the top classes come from a stable descending sort instead.

Besides the two accuracies, `evaluate` returns which images were right at top-1 ("correct": a bool
numpy array in eval order), the per-sample outcomes behind the card's intervals (qcard.stats).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

import torch
from tqdm.auto import tqdm

from .errors import QcardError


class NonFiniteOutputError(QcardError):
    """The model produced NaN or infinite outputs."""


def top_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest logits per row, largest first; equal logits in class-index order."""
    k = min(int(k), logits.shape[1])
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()  # not inference_mode: methods may cache tensors whose version counter they read later
def evaluate(model: torch.nn.Module, dataset, *, batch_size: int = 256, device: str = "cpu",
             progress: bool = False, desc: str = "evaluate", num_workers: Any = 0, loaders=None) -> Dict[str, Any]:
    """{"top1", "top5" (points, 0-100), "n" (images), "correct" (bool array, top-1 right, eval order)}.

    `loaders` (qcard.data.loaders.PointLoaders): the point's loaders, whose workers are kept between the
    passes of a point; without it a loader with `num_workers` (an int or "auto") is made for this pass."""
    from .data.loaders import PointLoaders
    model.eval()
    own = loaders is None
    if own:
        loaders = PointLoaders(num_workers, device)
    loader = loaders.get(dataset, batch_size)
    non_blocking = loaders.pin_memory
    correct1 = correct5 = total = 0
    outcomes = []
    # counted in images, so the bar shows images/s and an ETA over the whole eval set
    bar = tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False, unit="img", unit_scale=True,
               smoothing=0.1)
    try:
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
            logits = model(x)
            if not torch.isfinite(logits).all():
                raise NonFiniteOutputError(f"{desc}: the model produced NaN or infinite outputs on batch {i} "
                                           f"(images {i * batch_size}..{i * batch_size + len(x) - 1})")
            top = top_classes(logits, 5)
            hits = top.eq(y.view(-1, 1))
            outcomes.append(hits[:, 0].cpu().numpy())
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            total += len(y)
            bar.update(len(y))
    finally:
        bar.close()
        if own:
            loaders.close()
    if total == 0:
        raise QcardError(f"{desc}: the evaluation set is empty")
    return {"top1": round(100.0 * correct1 / total, 4), "top5": round(100.0 * correct5 / total, 4), "n": total,
            "correct": np.concatenate(outcomes).astype(bool)}


def chance_check(fp32: Dict[str, Any], evaluation, num_classes: int) -> Dict[str, Any]:
    """The card's results.chance: whether the FP32 baseline is informative at all, from the eval labels
    (dataset.targets(), no images decoded) and FP32's per-image outcomes, so no prediction is re-run:
      chance_top1  the top-1 of always answering the eval set's most common class (100/K when balanced);
      at_chance    FP32's 95 % interval reaches down to that level (a random-weight model, say);
      one_class    the class FP32 is right on exactly (and only) — what a model answering one class gets;
      eval_classes how many classes the eval images hold (1: `eval_subset: first` on a sorted folder);
      num_classes  the classes the model picks among (top-5 of 5 or fewer is 100 % by construction)."""
    from .stats.intervals import accuracy_interval
    from .stats.outcomes import unpack_outcomes
    targets = np.asarray(evaluation.targets())
    classes, counts = np.unique(targets, return_counts=True)
    out: Dict[str, Any] = {"num_classes": int(num_classes), "eval_classes": int(len(classes)),
                           "chance_top1": round(100.0 * counts.max() / len(targets), 4) if len(targets) else None,
                           "at_chance": None, "one_class": None}
    n, packed = fp32.get("n"), fp32.get("outcomes")
    if not packed or n != len(targets):
        return out          # an FP32 baseline without outcomes (older cache): say only what the labels say
    right = np.asarray(unpack_outcomes(packed, n), dtype=bool)
    lo, _ = accuracy_interval([right])
    out["at_chance"] = bool(lo <= out["chance_top1"])
    hit = np.unique(targets[right])
    if len(hit) == 1 and len(classes) > 1 and np.array_equal(right, targets == hit[0]):
        out["one_class"] = int(hit[0])
    return out
