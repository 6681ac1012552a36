"""BN folding for base "qcard": the shared BN-fold helper (qcard.quant.bn.fold_batch_norms, one traced
forward pass), checked against the FP32 outputs."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ...quant.bn import fold_batch_norms as fold_traced
from .params import SparqError


def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold every batch norm that directly and solely reads a conv/linear output into it and replace the
    BN with Identity; the others stay (the quantization block lists them). The FP32 outputs must not change."""
    model.eval()
    with torch.no_grad():
        ref = model(example)
    folded, _ = fold_traced(model, example)
    if isinstance(ref, torch.Tensor) and folded:
        with torch.no_grad():
            new = model(example)
        err = float((new - ref).abs().max())
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not err <= tol:
            raise SparqError(f"folding batch norm changed the FP32 outputs by {err:.3g} (tolerance {tol:.3g}); "
                             f"use base: paper (BN kept)")
    return folded
