"""BN folding for base "qcard": the package's one place that finds BN-after-conv pairs and folds them
(to be replaced by the shared op tracer's BN-fold helper)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .params import SparqError

def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold every batch norm that directly consumes the output of a conv/linear into it and
    replace the BN with Identity. Pairs are found from one forward pass (the BN's input is the
    very tensor the layer returned). Checked: the FP32 outputs must not change."""
    from ...quant.bn import can_fold, fold_bn

    names = {id(m): n for n, m in model.named_modules()}
    produced: Dict[int, Tuple[str, torch.Tensor]] = {}
    pairs: List[Tuple[str, str]] = []
    handles = []

    def after_gemm(mod, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[id(mod)], out)

    def before_bn(mod, args):
        src = produced.get(id(args[0])) if args else None
        if src is not None and src[1] is args[0]:
            pairs.append((src[0], names[id(mod)]))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(after_gemm))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn))
    model.eval()
    try:
        with torch.no_grad():
            ref = model(example)
    finally:
        for h in handles:
            h.remove()
    produced.clear()
    counts: Dict[str, int] = {}
    for g, b in pairs:
        counts[g] = counts.get(g, 0) + 1
        counts[b] = counts.get(b, 0) + 1
    folded = []
    for g, b in dict.fromkeys(pairs):
        layer, bn = model.get_submodule(g), model.get_submodule(b)
        if counts[g] > 1 or counts[b] > 1 or can_fold(layer, bn):
            continue                                    # shared or unfoldable: BN stays (recorded)
        fold_bn(layer, bn)
        parent, _, attr = b.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        folded.append((g, b))
    if isinstance(ref, torch.Tensor) and folded:
        with torch.no_grad():
            new = model(example)
        err = float((new - ref).abs().max())
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not err <= tol:
            raise SparqError(f"folding batch norm changed the FP32 outputs by {err:.3g} (tolerance {tol:.3g}): "
                             f"a batch norm's input is also used elsewhere; use base: paper (BN kept)")
    return folded

