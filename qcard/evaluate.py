"""Accuracy of a model on a dataset (top-1 / top-5 in points, 0-100)."""
from __future__ import annotations

from typing import Dict

import torch
from tqdm.auto import tqdm

from .errors import QcardError


class NonFiniteOutputError(QcardError):
    """The model produced NaN or infinite outputs."""


@torch.no_grad()  # not inference_mode: methods may cache tensors whose version counter they read later
def evaluate(model: torch.nn.Module, dataset, *, batch_size: int = 256, device: str = "cpu",
             progress: bool = False, desc: str = "evaluate", num_workers: int = 0) -> Dict[str, float]:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct1 = correct5 = total = 0
    for i, (x, y) in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch")):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(f"{desc}: the model produced NaN or infinite outputs on batch {i} "
                                       f"(images {i * batch_size}..{i * batch_size + len(x) - 1})")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y.view(-1, 1))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += len(y)
    if total == 0:
        raise QcardError(f"{desc}: the evaluation set is empty")
    return {"top1": round(100.0 * correct1 / total, 4), "top5": round(100.0 * correct5 / total, 4), "n": total}
