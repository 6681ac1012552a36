"""Passes over data: calibration and BN-recalibration batches, batch norms in train mode."""
from __future__ import annotations

import contextlib
from typing import List

import torch
from torch import nn
from tqdm.auto import tqdm

def batch_norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def bn_train(model: nn.Module, how: str):
    """Everything in eval mode except batch norms, which use batch statistics and refresh their
    running statistics (cumulative: reset, then the plain average over the batches)."""
    bns = batch_norms(model)
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.train()
        if how == "cumulative":
            m.reset_running_stats()
            m.momentum = None
    try:
        yield bns
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def run_batches(model, loader, device, progress: bool, desc: str, skip_single: bool = False,
                 after_batch=None) -> int:
    n = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            x = images(batch)
            if skip_single and x.shape[0] < 2:      # BN in train mode cannot take one sample at 1x1
                continue
            model(x.to(device))
            n += x.shape[0]
            if after_batch is not None:
                after_batch()
    return n

