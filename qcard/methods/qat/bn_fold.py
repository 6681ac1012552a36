"""keep_then_fold: after training with batch norm kept, fold it into the per-channel weight scales."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ...quant.bn import bn_affine, fold_bn
from ...quant.calibrate import sim_info

__all__ = ["fold_kept_bn"]


def fold_kept_bn(sim) -> List[str]:
    """After training with BN kept: fold each kept batch norm into its conv/linear, its scale γ/σ going
    into the per-channel weight scales (s' = s·|γ/σ|; z mirrored where γ/σ < 0), the BN replaced by
    an identity. Returns the layers folded."""
    info = sim_info(sim)
    folded = []
    for li in info.gemm_layers():
        m = li.module
        meta = getattr(m, "qcard_bn", None)
        if not meta or meta.get("state") != "kept" or m.__dict__.get("_qat_folded"):
            continue
        bn = sim.get_submodule(meta["path"])
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        with torch.no_grad():
            factor = (bn.weight.detach().float() if bn.weight is not None else torch.ones(bn.num_features)) / \
                torch.sqrt(bn.running_var.float() + bn.eps)
            wq = m.weight_quantizer
            fold_bn(m, bn)
            if wq is not None:
                if wq.spec.granularity != "per_channel" or wq.scale.numel() != factor.numel():
                    raise RuntimeError(f"{li.name}: cannot fold batch norm into {wq.spec.granularity} weight scales")
                s = wq.scale.reshape(-1) * factor.abs()
                z = wq.zero_point.reshape(-1).round()
                if not wq.spec.symmetric:
                    z = torch.where(factor < 0, float(wq.qmin + wq.qmax) - z, z)
                wq.set_qparams(s.reshape(wq.scale.shape), z.reshape(wq.zero_point.shape))
        beta, gamma = bn_affine(bn)
        _set_module(sim, meta["path"], nn.Identity())
        m.qcard_bn = dict(meta, state="folded", beta=beta, gamma=gamma)
        m.__dict__["_qat_folded"] = True
        li.bn = "folded"
        folded.append(li.name)
    if folded:
        info.batch_norm = "folded"
    return folded


def _set_module(root, path: str, new) -> None:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)
