"""What a SPARQ layer measures: the range of its input during calibration, and the statistics of a
plain (non-window) activation quantizer in the kernel's vocabulary."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels import mark_pairs_

class Observer:
    """Range statistics of one layer's input over the calibration pass."""

    def __init__(self, percentile: Optional[float]):
        self.n = 0
        self.sum_max = self.sum_absmax = 0.0
        self.max = self.absmax = 0.0
        self.min = math.inf
        self.pct = percentile
        self.sum_pct = self.sum_abspct = 0.0
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        flat = x.detach().reshape(x.shape[0], -1).float()
        mn, mx = torch.aminmax(flat, dim=1)
        absmax = torch.maximum(mx, -mn)
        self.n += flat.shape[0]
        self.sum_max += float(mx.sum())
        self.sum_absmax += float(absmax.sum())
        self.max = max(self.max, float(mx.max()))
        self.absmax = max(self.absmax, float(absmax.max()))
        self.min = min(self.min, float(mn.min()))
        if self.pct is not None:
            v = flat.reshape(-1)
            if v.numel() > 1 << 24:                       # torch.quantile's size limit: a strided sample
                v = v[:: math.ceil(v.numel() / (1 << 24))]
            q = torch.tensor([self.pct / 100.0], device=v.device)
            self.sum_pct += float(torch.quantile(v, q))
            self.sum_abspct += float(torch.quantile(v.abs(), q))
            self.batches += 1

    def range(self, how: str, signed: bool) -> float:
        if self.n == 0:
            return 0.0
        if how == "max_mean":
            return (self.sum_absmax if signed else self.sum_max) / self.n
        if how == "minmax":
            return self.absmax if signed else self.max
        return (self.sum_abspct if signed else self.sum_pct) / max(1, self.batches)


class PlainStats:
    """Statistics of a plain (non-window) activation quantizer, in the kernel's vocabulary."""

    def __init__(self, mode: str, bits: int):
        self.mode, self.bits = mode, bits
        self.values = self.zeros = self.pairs = self.zero_pairs = 0
        self.sq = 0.0

    def update(self, q8: torch.Tensor, result: torch.Tensor, dim: int) -> None:
        idx = q8.abs().to(torch.int32, memory_format=torch.contiguous_format)
        dim = dim % idx.dim()
        odd = mark_pairs_(idx, dim)
        C = idx.shape[dim]
        flagged = int((idx >= 256).sum())
        self.values += idx.numel()
        self.pairs += idx.numel() // C * ((C + 1) // 2)
        self.zero_pairs += (flagged - odd) // 2 + odd
        self.zeros += int((q8 == 0).sum())
        self.sq += float((result.double() - q8.double()).pow_(2).sum())

    def stats(self) -> dict:
        t = self.values
        return {"mode": self.mode, "bits": self.bits, "options": None, "rounding": "round", "window_tops": None,
                "values": t, "nonzero": t - self.zeros, "pairs": self.pairs,
                "zero_fraction": self.zeros / t if t else None,
                "zero_partner_fraction": self.zero_pairs / self.pairs if self.pairs else None,
                "window_hist": None, "bits_distribution": {float(self.bits): 1.0} if t else {},
                "mean_bits": float(self.bits) if t else None,
                "mean_bits_nonzero": float(self.bits) if t > self.zeros else None,
                "mse": self.sq / t if t else None}

