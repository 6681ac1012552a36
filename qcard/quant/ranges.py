"""Range setting: observers that turn calibration data into a clipping range [min, max].

  minmax         running min / max                              (per tensor or per channel)
  ema_minmax     exponential moving average of batch min / max  (momentum 0.9 by default)
  percentile     the p-th and (100−p)-th percentiles (99.99 by default); per tensor from a
                 2048-bin histogram, per channel exactly when all data was kept (weights)
  mse            the clipping range that minimises ‖x − x̂‖² over a grid of 100 shrink factors of
                 the min-max range: exact on the data for weights, on the histogram for activations
  kl             TensorRT's entropy calibration: the threshold whose quantized histogram has the
                 smallest KL divergence from the clipped reference histogram (per tensor)
  bn             data-free: [β − α·γ, β + α·γ] (α = 6) from the batch norm feeding the tensor,
                 clipped by the activation that follows (ReLU, ReLU6)
  cross_entropy  for the logits: the range minimising the cross-entropy between the softmax of the
                 FP logits and of the quantized logits (white paper, §4.2)

An observer sees tensors through update(x) and answers compute_range(spec) -> (min, max) tensors of
shape () or (C,). Per-channel observers take `axis`, the channel axis of the tensors they see.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Type, get_args

import numpy as np
import torch

from .qspec import QSpec
from .quantizer import compute_qparams, fake_quantize, group_rows
from .scheme import WeightRange

__all__ = ["Observer", "MinMaxObserver", "EMAMinMaxObserver", "PercentileObserver", "MSEObserver",
           "KLObserver", "BNObserver", "CrossEntropyObserver", "OBSERVERS", "make_observer",
           "tensor_range", "Histogram"]

Range = Tuple[torch.Tensor, torch.Tensor]


def _spec_of(q) -> QSpec:
    return q if isinstance(q, QSpec) else q.spec


def _channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    name = "observer"
    needs_data = True

    def __init__(self, axis: Optional[int] = None):
        self.axis = axis
        self.fallback_reason: Optional[str] = None   # set when the observer had to use min-max instead
        self.reset()

    def reset(self) -> None:
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def _batch_minmax(self, x: torch.Tensor) -> Range:
        x = x.detach().float()
        if self.axis is None:
            return x.min(), x.max()
        flat = _channels_first(x, self.axis)
        return flat.amin(1), flat.amax(1)

    def _track_minmax(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)

    def update(self, x: torch.Tensor) -> None:
        self._track_minmax(x)

    def _require_data(self) -> None:
        if self.min_val is None:
            raise RuntimeError(f"{self.name} observer has seen no data: was the calibration set empty?")

    def compute_range(self, q) -> Range:
        self._require_data()
        return self.min_val.clone(), self.max_val.clone()


class MinMaxObserver(Observer):
    name = "minmax"


class EMAMinMaxObserver(Observer):
    name = "ema_minmax"

    def __init__(self, axis: Optional[int] = None, momentum: float = 0.9):
        self.momentum = momentum
        super().__init__(axis)

    def update(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            m = self.momentum
            self.min_val = m * self.min_val + (1 - m) * mn
            self.max_val = m * self.max_val + (1 - m) * mx


# ---------------------------------------------------------------------------------------------
# histogram shared by percentile / mse / kl

class Histogram:
    """A streaming histogram of fixed bin count whose range grows to cover every value seen.
    When the range grows, the old counts are re-binned by interpolating their cumulative sum."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.counts: Optional[np.ndarray] = None
        self.lo = self.hi = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        mn, mx = float(x.min()), float(x.max())
        if self.counts is None:
            lo, hi = mn, mx
            if hi <= lo:
                hi = lo + max(abs(lo), 1.0) * 1e-6
            self.lo, self.hi = lo, hi
            self.counts = np.zeros(self.bins, dtype=np.float64)
        elif mn < self.lo or mx > self.hi:
            lo, hi = min(mn, self.lo), max(mx, self.hi)
            cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
            new_edges = np.linspace(lo, hi, self.bins + 1)
            self.counts = np.diff(np.interp(new_edges, self.edges, cdf, left=0.0, right=cdf[-1]))
            self.lo, self.hi = lo, hi
        h = torch.histc(x, self.bins, self.lo, self.hi).double().numpy()
        self.counts = self.counts + h

    @property
    def total(self) -> float:
        return float(self.counts.sum()) if self.counts is not None else 0.0

    def percentile(self, p: float) -> float:
        """Value below which p percent of the mass lies (linear within a bin)."""
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
        target = p / 100.0 * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(max(i, 1), self.bins)
        c0, c1 = cdf[i - 1], cdf[i]
        frac = 0.0 if c1 <= c0 else (target - c0) / (c1 - c0)
        e = self.edges
        return float(e[i - 1] + frac * (e[i] - e[i - 1]))


class PercentileObserver(Observer):
    name = "percentile"

    def __init__(self, axis: Optional[int] = None, percentile: float = 99.99, bins: int = 2048,
                 exact: bool = False):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.bins = bins
        self.exact = exact or axis is not None
        super().__init__(axis)

    def reset(self) -> None:
        super().reset()
        self.hist = Histogram(self.bins)
        self._lows, self._highs, self._weights = [], [], []

    def update(self, x: torch.Tensor) -> None:
        self._track_minmax(x)
        if self.exact:
            # exact per batch; batches are combined by a size-weighted mean (weights: one batch)
            x = x.detach().float()
            flat = x.reshape(1, -1) if self.axis is None else _channels_first(x, self.axis)
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            vals = _quantile_rows(flat, q)
            self._lows.append(vals[0])
            self._highs.append(vals[1])
            self._weights.append(flat.shape[1])
        else:
            self.hist.update(x)

    def compute_range(self, q) -> Range:
        self._require_data()
        if self.exact:
            w = torch.tensor(self._weights, dtype=torch.float32)
            w = w / w.sum()
            lo = sum(wi * v for wi, v in zip(w, self._lows))
            hi = sum(wi * v for wi, v in zip(w, self._highs))
            if self.axis is None:
                lo, hi = lo.reshape(()), hi.reshape(())
            return lo, hi
        lo = self.hist.percentile(100.0 - self.percentile)
        hi = self.hist.percentile(self.percentile)
        return torch.tensor(lo), torch.tensor(hi)


def _quantile_rows(flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile over dim 1 (linear interpolation), chunked by kthvalue for large rows."""
    n = flat.shape[1]
    out = []
    for qi in q.tolist():
        pos = qi * (n - 1)
        lo_i, hi_i = int(math.floor(pos)), int(math.ceil(pos))
        lo_v = flat.kthvalue(lo_i + 1, dim=1).values
        hi_v = lo_v if hi_i == lo_i else flat.kthvalue(hi_i + 1, dim=1).values
        out.append(lo_v + (hi_v - lo_v) * (pos - lo_i))
    return torch.stack(out)


class MSEObserver(Observer):
    """Search the shrink factor a ∈ {0.01, 0.02, …, 1} of the min-max range [a·min, a·max] that
    minimises the squared quantization error (white paper §4.1). `exact` (weights, per channel)
    searches on the data itself; otherwise on a 2048-bin histogram (error at bin centres)."""
    name = "mse"

    def __init__(self, axis: Optional[int] = None, grid: int = 100, bins: int = 2048, exact: bool = False):
        self.grid = grid
        self.bins = bins
        self.exact = exact or axis is not None
        super().__init__(axis)

    def reset(self) -> None:
        super().reset()
        self.hist = Histogram(self.bins)
        self.data = []

    def update(self, x: torch.Tensor) -> None:
        self._track_minmax(x)
        if self.exact:
            x = x.detach().float()
            self.data.append(x.reshape(1, -1) if self.axis is None else _channels_first(x, self.axis))
        else:
            self.hist.update(x)

    def compute_range(self, q) -> Range:
        self._require_data()
        spec = _spec_of(q)
        if self.exact:
            data = torch.cat(self.data, dim=1)
            return mse_range_exact(data, self.min_val.reshape(-1), self.max_val.reshape(-1), spec, self.grid,
                                   per_tensor=self.axis is None)
        return _mse_range_hist(self.hist, spec, self.grid)


def mse_range_exact(rows: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, spec: QSpec, grid: int = 100,
                    per_tensor: bool = False) -> Range:
    """Per-row search (rows: (C, N)); per_tensor=True means one row and 0-d results."""
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_lo, best_hi = mn.clone(), mx.clone()
    tmp_spec = spec.model_copy(update={"granularity": "per_channel", "axis": 0, "group_size": None})
    for k in range(grid, 0, -1):
        a = k / grid
        lo, hi = mn * a, mx * a
        scale, zp = compute_qparams(lo, hi, tmp_spec)
        err = (fake_quantize(rows, scale, zp, spec.qmin, spec.qmax, axis=0) - rows).pow_(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if per_tensor:
        return best_lo.reshape(()), best_hi.reshape(())
    return best_lo, best_hi


def _mse_range_hist(hist: Histogram, spec: QSpec, grid: int) -> Range:
    c = torch.from_numpy(hist.centers).float()
    w = torch.from_numpy(hist.counts).float()
    mn, mx = min(hist.lo, 0.0), max(hist.hi, 0.0)
    a = torch.arange(grid, 0, -1, dtype=torch.float32) / grid
    lo, hi = mn * a, mx * a
    scale, zp = compute_qparams(lo, hi, spec.model_copy(update={"granularity": "per_channel", "axis": 0,
                                                                "group_size": None}))
    cc = c.unsqueeze(0).expand(grid, -1).contiguous()
    err = ((fake_quantize(cc, scale, zp, spec.qmin, spec.qmax, axis=0) - cc) ** 2 * w).sum(1)
    best = int(torch.argmin(err))        # ties: the first, i.e. the widest range
    return lo[best].clone(), hi[best].clone()


class KLObserver(Observer):
    """TensorRT entropy calibration on a histogram of |x| (of x when x ≥ 0 everywhere)."""
    name = "kl"

    def __init__(self, axis: Optional[int] = None, bins: int = 2048):
        if axis is not None:
            raise ValueError("the kl range setting is per tensor only (TensorRT's entropy calibration)")
        self.bins = bins
        super().__init__(axis)

    def reset(self) -> None:
        super().reset()
        self.hist = Histogram(self.bins)
        self.hist.lo = 0.0

    def update(self, x: torch.Tensor) -> None:
        self._track_minmax(x)
        a = x.detach().float().abs().reshape(-1)
        if self.hist.counts is None:       # anchor the histogram at 0 so its bins are [0, max|x|]
            self.hist.counts = np.zeros(self.bins)
            self.hist.lo, self.hist.hi = 0.0, max(float(a.max()), 1e-12)
        self.hist.update(a)

    def compute_range(self, q) -> Range:
        self._require_data()
        spec = _spec_of(q)
        nonneg = float(self.min_val) >= 0
        levels = spec.qmax - spec.qmin + 1 if nonneg else 2 ** (spec.bits - 1)
        t = kl_threshold(self.hist.counts, self.hist.edges, levels)
        lo = torch.maximum(self.min_val, torch.tensor(-t))
        hi = torch.minimum(self.max_val, torch.tensor(t))
        return lo, hi


def kl_threshold(counts: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """Upper edge of the bin count i (levels ≤ i ≤ bins) minimising KL(P_i ‖ Q_i), where P_i is the
    histogram cut at i with the outliers added to its last bin and Q_i is P_i's first i bins merged
    into `levels` buckets and spread back evenly over their non-empty bins (TensorRT's entropy
    calibration; bin 0 takes bin 1's count first)."""
    bins = len(counts)
    if levels >= bins:
        return float(edges[-1])
    # the spike of exact zeros (after ReLU) would make every merged first bucket look bad and push the
    # threshold to its minimum; like NVIDIA's pytorch-quantization, give bin 0 its neighbour's count
    counts = np.asarray(counts, dtype=np.float64).copy()
    counts[0] = counts[1]
    best_i, best_kl = bins, float("inf")
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])   # tail[i] = sum(counts[i:])
    for i in range(levels, bins + 1):
        p = counts[:i].astype(np.float64).copy()
        p[-1] += tail[i]
        if p.sum() == 0:
            continue
        src = counts[:i]
        idx = (np.arange(i) * levels) // i
        bucket_sum = np.bincount(idx, weights=src, minlength=levels)
        bucket_nz = np.bincount(idx, weights=(src > 0).astype(np.float64), minlength=levels)
        per = np.divide(bucket_sum, bucket_nz, out=np.zeros(levels), where=bucket_nz > 0)
        qd = np.where(src > 0, per[idx], 0.0)
        pn = p / p.sum()
        qs = qd.sum()
        if qs == 0:
            continue
        qn = qd / qs
        mask = pn > 0
        qn_m = np.maximum(qn[mask], 1e-12)        # the outlier-laden last bin may be empty in Q
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn_m)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


class BNObserver(Observer):
    """Data-free range [β − α·γ, β + α·γ] from the batch norm that produced the tensor.

    The graph builder calls set_bn(beta, gamma, act) before calibration. Tensors without a batch norm
    in front fall back to min-max on the calibration data, and `fallback_reason` says so."""
    name = "bn"
    needs_data = False

    def __init__(self, axis: Optional[int] = None, alpha: float = 6.0):
        self.alpha = alpha
        self.bn = None
        super().__init__(axis)

    def set_bn(self, beta: torch.Tensor, gamma: torch.Tensor, act: Optional[str]) -> None:
        self.bn = (beta.detach().float(), gamma.detach().float().abs(), act)

    def compute_range(self, q) -> Range:
        if self.bn is None:
            self.fallback_reason = "no batch norm feeds this tensor: min-max on calibration data"
            return super().compute_range(q)
        beta, gamma, act = self.bn
        lo, hi = beta - self.alpha * gamma, beta + self.alpha * gamma
        if act in ("relu", "relu6"):
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        if act == "relu6":
            lo, hi = lo.clamp(max=6), hi.clamp(max=6)
        if self.axis is None:
            return lo.min(), hi.max()
        return lo, hi


class CrossEntropyObserver(Observer):
    """For the logits (last dim = classes): the shrink factor of the min-max range minimising
    E[−Σ softmax(z)·log softmax(ẑ)] over the calibration logits (white paper §4.2)."""
    name = "cross_entropy"

    def __init__(self, axis: Optional[int] = None, grid: int = 100):
        if axis is not None:
            raise ValueError("the cross_entropy range setting is per tensor only")
        self.grid = grid
        super().__init__(axis)

    def reset(self) -> None:
        super().reset()
        self.logits = []

    def update(self, x: torch.Tensor) -> None:
        self._track_minmax(x)
        self.logits.append(x.detach().float().reshape(-1, x.shape[-1]))

    def compute_range(self, q) -> Range:
        self._require_data()
        spec = _spec_of(q)
        z = torch.cat(self.logits)
        p = torch.softmax(z, -1)
        best, best_ce = (self.min_val, self.max_val), float("inf")
        for k in range(self.grid, 0, -1):
            a = k / self.grid
            lo, hi = self.min_val * a, self.max_val * a
            s, zp = compute_qparams(lo, hi, spec)
            zq = fake_quantize(z, s, zp, spec.qmin, spec.qmax)
            ce = float(-(p * torch.log_softmax(zq, -1)).sum(-1).mean())
            if ce < best_ce - 1e-9:
                best_ce, best = ce, (lo, hi)
        return best[0].clone(), best[1].clone()


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver, "ema_minmax": EMAMinMaxObserver, "percentile": PercentileObserver,
    "mse": MSEObserver, "kl": KLObserver, "bn": BNObserver, "cross_entropy": CrossEntropyObserver,
}


def make_observer(name: str, axis: Optional[int] = None, **options) -> Observer:
    """An observer by name; options the observer does not take are ignored (e.g. percentile for mse)."""
    if name not in OBSERVERS:
        from ..errors import UnknownNameError
        raise UnknownNameError("range setting", name, OBSERVERS)
    cls = OBSERVERS[name]
    import inspect
    accepted = inspect.signature(cls.__init__).parameters
    return cls(axis=axis, **{k: v for k, v in options.items() if k in accepted})


WEIGHT_RANGES = get_args(WeightRange)


def tensor_range(w: torch.Tensor, spec: QSpec, method: str = "minmax", axis: Optional[int] = None,
                 **options) -> Range:
    """The range of a whole tensor (a weight) for spec's granularity, computed on the data itself.
    axis: the channel axis for per_channel / per_group specs (defaults to spec.axis)."""
    if method not in WEIGHT_RANGES:
        from ..errors import UnknownNameError
        raise UnknownNameError("weight range setting", method, WEIGHT_RANGES)
    axis = spec.axis if axis is None else axis
    if spec.granularity == "per_group":
        data, obs_axis = group_rows(w.detach(), axis, spec.group_size)[0], 0
    elif spec.granularity == "per_channel":
        data, obs_axis = w.detach(), axis
    else:
        data, obs_axis = w.detach(), None
    obs = make_observer(method, axis=obs_axis, exact=True, **options)
    obs.update(data)
    return obs.compute_range(spec)
