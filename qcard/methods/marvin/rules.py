"""MARViN rules (pure functions): adaptive per-layer fixed-point precision during training.

Kummer, Sidak, Reichmann, Gansterer: "MARViN" (arXiv 2107.13490, 2021), extended as "AdaPT: Adaptive
Precision Training" (SDM 2023); rules read from the authors' code (lorenz0890/AdaPT).

Simulation. Every conv and linear layer (all of them, first and last included) owns a fixed-point
format <wl, fl> (start <8, 4>). Batch norm and average pooling use the format of the conv/linear
layer that ran just before them in the forward pass (as the reference, whose 1-D parameters copy the
preceding weight's format). Each of these layers quantizes its input and its output; its weight (and
bias, and BN's affine parameters) is a stochastically rounded copy of the FP32 master weights, redrawn
after every optimizer step; gradients reach the masters straight through.

Each optimizer step, per conv/linear weight (after the gradients of all accumulated mini-batches):
    g = fixed_point_stochastic(grad, wl, fl);  g = g / ||g||          (every parameter tensor)
    k += 1;  S += g;  GD = k / ||S||                                   (gradient diversity)
    lb = ceil(m · clip(MAX_LB / GD, MIN_LB, MAX_LB) + (1 − m) · lb)
    res ± 1 when lb hits MAX_LB / MIN_LB
    if k >= lb:  <wl, fl> = PUSH_UP(GD, PUSH_DOWN(W, wl, fl, res));  k, S = 0
then SGD updates the masters and the copies are redrawn with the new formats.

Choices (spec "(choice)" items): push-down uses a true ε-smoothed KL divergence between res-bin
histograms of the whole FP32 tensor and its nearest-rounded copy (copy clamped into [min W, max W] so
rounding at the edges stays in the edge bins), "no information lost" = KL <= τ, and a correct
bisection (smallest fl in [FL_FLOOR, fl], then smallest wl in [fl, wl], assuming a larger format never
loses more). kl_mode="reference" reproduces the authors' code instead: its loss
kl_div(P, Q, reduction="batchmean", log_target=True) of the normalized histograms (probabilities
passed as log-probabilities), stochastic rounding in the test, histograms of the first output filter
only, "lost" iff loss > 0, and its bisections (the fl search always tests the lower bound; the wl
search returns the lower bound).

The push-up strategy escalates min → mean → max while the step loss is not below the mean of the
previous ⌊mean lb⌋ step losses and returns to min otherwise (the reference divides a window of
⌊mean lb⌋ + 1 losses by ⌊mean lb⌋; this mean is a plain one).

Cost (bit-width-weighted multiply-accumulates; standard MACs of conv/linear layers from
qcard.cost.trace, batch 1). The reference code's analytics count every conv twice,
use their own "madds" formula (about 2 per MAC) and also charge batch norm and pooling; that changes
how layers are weighted against each other, not the figures of a uniform precision:
    training speedup  = 2·ΣF / (ΣQ + ΣF), summed over training steps (forward charged at the word
                        lengths and weight density used in that step, backward at float32);
                        switching overhead is not charged
    inference speedup = Σ 32·MACs / Σ nz·MACs·wl   (final state; nz = 1 − weight sparsity)
    model size ratio  = Σ wl·params·nz / Σ 32·params (conv/linear weight + bias elements)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

STRATEGIES = ("min", "mean", "max")


def gradient_diversity(k: int, sum_norm: float) -> float:
    """k unit-norm gradients whose sum has norm sum_norm: k / ||Σg|| (>= 1; inf when the sum is 0)."""
    if k <= 0:
        return float("nan")
    return float(k) / sum_norm if sum_norm > 0 else float("inf")


def _ceil(x: float) -> int:
    return int(math.ceil(round(x, 9)))    # 0.33·100 + 0.67·100 must give 100, not 101


def update_lookback(lb: int, gd: float, min_lb: int, max_lb: int, momentum: float) -> int:
    target = min_lb if not (gd > 0) or math.isinf(gd) else min(max(max_lb / gd, min_lb), max_lb)
    return int(min(max(_ceil(momentum * target + (1.0 - momentum) * lb), min_lb), max_lb))


def update_resolution(res: int, lb: int, min_lb: int, max_lb: int, min_res: int, max_res: int) -> int:
    if lb == max_lb:
        res = min(res + 1, max_res)
    if lb == min_lb:
        res = max(res - 1, min_res)
    return int(res)


def push_up_step(gd: float, fl: int, strategy: str, cap: int = 32) -> int:
    """How many fractional bits push-up adds (s); 1 when GD <= e or GD is not finite."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown push-up strategy '{strategy}'; allowed: {', '.join(STRATEGIES)}")
    s = 1
    if 0 < gd < float("inf"):
        L = math.log(gd) - 1.0
        if L > 0:
            L2 = L * L
            s1 = max(_ceil(min(1.0 / L2, 1e9)), 1)
            s2 = max(min(_ceil(cap * L2), cap) - fl, 0)
            if strategy == "min":
                s = min(s1, s2)
            elif strategy == "mean":
                s = _ceil(0.5 * (s1 + s2))
            else:
                s = max(s1, s2)
    return int(s)


def push_up(gd: float, wl: int, fl: int, strategy: str, results_buffer: int, cap: int = 32) -> Tuple[int, int]:
    """PUSH_UP: more fractional bits when gradients are diverse, then keep RB bits of headroom."""
    s = push_up_step(gd, fl, strategy, cap)
    fl = min(fl + s, cap)
    wl = min(max(wl, fl) + 1, cap)
    fl = min(fl, cap - results_buffer)
    wl = max(min(fl + results_buffer, cap), wl)
    return int(wl), int(fl)


def smallest_passing(lo: int, hi: int, lost: Callable[[int], bool]) -> int:
    """Smallest v in [lo, hi] with not lost(v), by bisection, taking hi as acceptable (the current
    format) and assuming monotonicity (if v passes, every larger v passes). Never evaluates hi."""
    if hi <= lo:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if lost(mid):
            lo = mid + 1
        else:
            hi = mid
    return hi


def push_down(wl: int, fl: int, lost: Callable[[int, int], bool], fl_floor: int = 4) -> Tuple[int, int]:
    """PUSH_DOWN (correct bisection): smallest fl in [fl_floor, fl] with no loss at word length wl,
    then smallest wl in [fl', wl] with no loss at fl'. lost(wl, fl) -> True when information is lost."""
    new_fl = smallest_passing(min(fl_floor, fl), fl, lambda f: lost(wl, f))
    new_wl = smallest_passing(min(new_fl, wl), wl, lambda w: lost(w, new_fl))
    return int(new_wl), int(new_fl)


def push_down_reference(wl: int, fl: int, lost: Callable[[int, int], bool], fl_floor: int = 4) -> Tuple[int, int]:
    """PUSH_DOWN as the authors' code does it (its bisections, including their slips)."""
    fl_min, fl_max = fl_floor, fl
    for _ in range(fl_max - fl_min):
        mid = _ceil((fl_max + fl_min) / 2)
        if lost(wl, fl_min):          # the code tests fl_min, not the midpoint
            fl_min = mid
        else:
            fl_max = mid
        if fl_max - fl_min <= 1:
            break
    wl_min, wl_max = fl_min, wl
    for _ in range(wl_max - wl_min):
        mid = _ceil((wl_max + wl_min) / 2)
        if lost(mid, fl_min):
            wl_min = mid
        else:
            wl_max = mid
        if wl_max - wl_min <= 1:
            break
    return int(wl_min), int(fl_min)       # the code returns the lower bound of the wl search


def kl_histograms(w, q, resolution: int, eps: float = 1e-10) -> float:
    """KL(P‖Q) of `resolution`-bin histograms over [min w, max w]; q is clamped into that range;
    both histograms are normalized and ε-smoothed. 0 for a constant tensor."""
    import torch
    w = w.detach().float().reshape(-1)
    lo, hi = float(w.min()), float(w.max())
    if not hi > lo:
        return 0.0
    p = torch.histc(w, bins=int(resolution), min=lo, max=hi)
    qh = torch.histc(q.detach().float().reshape(-1).clamp(lo, hi), bins=int(resolution), min=lo, max=hi)
    p = p / p.sum() + eps
    qh = qh / qh.sum() + eps
    p, qh = p / p.sum(), qh / qh.sum()
    return float((p * (p / qh).log()).sum())


def reference_kl_loss(w, q, resolution: int) -> float:
    """The reference code's push-down loss: kl_div(P, Q, 'batchmean', log_target=True) of histograms
    P (of w over its own range) and Q (of q over w's range, values outside dropped), normalized."""
    import torch
    import torch.nn.functional as F
    w = w.detach().float().reshape(-1)
    p = torch.histc(w, bins=int(resolution))
    qh = torch.histc(q.detach().float().reshape(-1), bins=int(resolution), min=float(w.min()), max=float(w.max()))
    p, qh = p / p.sum(), qh / qh.sum()
    return float(F.kl_div(p, qh, reduction="batchmean", log_target=True))


def make_lost_test(w, resolution: int, *, mode: str = "true", tau: float = 1e-6, eps: float = 1e-10,
                   generator=None) -> Callable[[int, int], bool]:
    """lost(wl, fl) for one weight tensor (whole tensor in 'true' mode, first output filter in 'reference')."""
    from ...quant.fixed_point import fixed_point_quantize
    w = w.detach()
    if mode == "true":
        def lost(wl: int, fl: int) -> bool:
            q = fixed_point_quantize(w, wl, fl, rounding="nearest")
            return kl_histograms(w, q, resolution, eps) > tau
    elif mode == "reference":
        w0 = w[0] if w.dim() > 1 else w

        def lost(wl: int, fl: int) -> bool:
            q = fixed_point_quantize(w0, wl, fl, rounding="stochastic", generator=generator)
            return reference_kl_loss(w0, q, resolution) > 0      # NaN (empty Q) counts as no loss, as there
    else:
        raise ValueError(f"unknown kl_mode '{mode}'; allowed: true, reference")
    return lost


class StrategySchedule:
    """Push-up strategy: escalate min → mean → max while the loss does not improve on the mean of
    the last `window` step losses, back to min when it does."""

    def __init__(self, start: str = "min", adaptive: bool = True, keep: int = 1000):
        if start not in STRATEGIES:
            raise ValueError(f"unknown push-up strategy '{start}'; allowed: {', '.join(STRATEGIES)}")
        self.strategy, self.adaptive, self.keep = start, adaptive, keep
        self.history: List[float] = []

    def update(self, loss: float, window: int) -> str:
        window = max(1, int(window))
        if self.adaptive and len(self.history) >= window:
            recent = sum(self.history[-window:]) / window
            if not (loss < recent):                 # no improvement (NaN included)
                self.strategy = STRATEGIES[min(STRATEGIES.index(self.strategy) + 1, 2)]
            else:
                self.strategy = "min"
        self.history.append(float(loss))
        if len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        return self.strategy


def marvin_cost(layers: List[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """Inference speedup and model size ratio of a final state.
    layers: [{macs, params, wl, sparsity}] (sparsity = fraction of exact-zero weights)."""
    f = sum(32.0 * l["macs"] for l in layers)
    q = sum((1.0 - l.get("sparsity", 0.0)) * l["macs"] * l["wl"] for l in layers)
    size_q = sum(l["wl"] * l["params"] * (1.0 - l.get("sparsity", 0.0)) for l in layers)
    size_f = sum(32.0 * l["params"] for l in layers)
    return {"inference_speedup": f / q if q > 0 else None,
            "model_size_ratio": size_q / size_f if size_f > 0 else None}


def training_speedup(sum_q: float, sum_f: float) -> Optional[float]:
    """2·ΣF / (ΣQ + ΣF): forward at the quantized cost, backward at float32."""
    return 2.0 * sum_f / (sum_q + sum_f) if sum_f > 0 else None

