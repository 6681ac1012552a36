"""95 % intervals for accuracies and for paired accuracy differences, from per-sample outcomes.

Every function here works in PERCENT (points, 0-100), like the card. Counts may be fractional: over
several seeds a card's accuracy is the seeds' mean, and the intervals treat the n eval images (the same
images for every seed) as the sample, with each image's outcome the fraction of seeds that got it right.

- `wilson_interval(k, n)`: the Wilson score interval of k correct out of n. It stays inside [0, 100],
  is sensible at k = 0 and k = n (where the Wald interval collapses to a point), and has close to
  nominal coverage down to small n.
- `paired_delta_interval(a, b)`: the interval of mean(a) - mean(b) for two sets of outcomes on the SAME
  images: Newcombe's hybrid score interval for paired proportions (Newcombe 1998, Stat. Med. 17:2635,
  method 10, with its continuity-corrected correlation: AD - BC is reduced by n/2 when it exceeds n/2 and
  set to 0 when it lies in [0, n/2]; known answer 59/6/16/80 -> [-0.1186, -0.0046]), built from the two
  Wilson intervals and the correlation of the paired outcomes. Images
  both models get right (or both wrong) do not widen it, so it is much narrower than an unpaired interval
  when the outcomes are correlated, as a quantized model's and its FP32 model's are.

- `paired_delta_pvalue(a, b)`: the p-value of the same procedure (the level at which that interval
  reaches 0), so that an interval and its test can never tell two stories.

Nothing random: the same outcomes always give the same interval. numpy only (no scipy at runtime).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence, Tuple

import numpy as np

Interval = Tuple[float, float]


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _wilson_fraction(k: float, n: float, z: float) -> Tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    # exact at the edges (rounding can leave 1e-17 outside [0, 1])
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def wilson_interval(k: float, n: float, confidence: float = 0.95) -> Optional[Interval]:
    """The Wilson score interval of k successes in n trials, in percent; None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n={n}, got {k}")
    lo, hi = _wilson_fraction(k, n, _z(confidence))
    return 100.0 * lo, 100.0 * hi


def per_image(outcomes: Sequence) -> np.ndarray:
    """Per-image correctness in [0, 1] from one boolean vector or several (one per seed, same images):
    the fraction of seeds that got each image right."""
    arr = np.asarray(outcomes, dtype=float)
    if arr.ndim == 2:
        arr = arr.mean(axis=0)
    if arr.ndim != 1:
        raise ValueError(f"outcomes must be one vector or a list of vectors, got shape {arr.shape}")
    return arr


def accuracy_interval(outcomes: Sequence, confidence: float = 0.95) -> Optional[Interval]:
    """The Wilson interval of the (seed-mean) accuracy over the images: k = the mean correct count, n =
    the number of images (not seeds x images: the seeds see the same images, so pooling them as
    independent trials would overstate the precision)."""
    p = per_image(outcomes)
    return wilson_interval(float(p.sum()), len(p), confidence)


def _corrected_cross(both: float, only_a: float, only_b: float, neither: float, n: float) -> float:
    """AD - BC of the paired table with Newcombe's (1998) continuity correction, as method 10 publishes it
    (also Newcombe & Altman, Statistics with Confidence, 2nd ed., ch. 7): minus n/2 above n/2, 0 within
    [0, n/2], unchanged when negative."""
    cross = both * neither - only_a * only_b
    if cross > n / 2:
        return cross - n / 2
    return 0.0 if cross >= 0 else cross


def _paired_table(a: Sequence, b: Sequence) -> Tuple[float, float, float, float, int]:
    """(both right, only a, only b, neither, n) of two sets of outcomes on the same images (each a boolean
    vector or one per seed: fractional over seeds)."""
    x, y = per_image(a), per_image(b)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes must cover the same images: {len(x)} vs {len(y)}")
    both, only_a = float((x * y).sum()), float((x * (1 - y)).sum())
    only_b, neither = float(((1 - x) * y).sum()), float(((1 - x) * (1 - y)).sum())
    return both, only_a, only_b, neither, len(x)


def _newcombe(table: Tuple[float, float, float, float, int], z: float) -> Interval:
    """Newcombe's method 10 limits, as fractions, of the paired table at normal quantile z."""
    both, only_a, only_b, neither, n = table
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = _wilson_fraction(both + only_a, n, z)
    l2, u2 = _wilson_fraction(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = _corrected_cross(both, only_a, only_b, neither, n) / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lower = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return max(-1.0, d - lower), min(1.0, d + upper)


def paired_delta_interval(a: Sequence, b: Sequence, confidence: float = 0.95) -> Optional[Interval]:
    """The interval of accuracy(a) - accuracy(b), in points, for outcomes on the same images in the same
    order (each a boolean vector or one per seed): Newcombe's paired hybrid score interval."""
    table = _paired_table(a, b)
    if table[4] == 0:
        return None
    lo, hi = _newcombe(table, _z(confidence))
    return 100.0 * lo, 100.0 * hi


# past z = 38 the two-sided normal tail is below the smallest double: such a difference has p = 0
_Z_MAX = 38.0


def paired_delta_pvalue(a: Sequence, b: Sequence) -> float:
    """The p-value that goes with `paired_delta_interval`: the largest alpha at which the 1 - alpha
    interval still reaches 0, i.e. 2 * (1 - Phi(z*)) for the z* at which the limit nearer 0 touches it.
    The test and the interval are then one procedure: the 1 - alpha interval excludes 0 exactly when
    p < alpha (the limits move away from the difference as z grows). Equal accuracies give 1; outcomes
    on several seeds count per image as the fraction of seeds right, as in the interval. Found by
    bisection on z to double precision: deterministic."""
    table = _paired_table(a, b)
    both, only_a, only_b, neither, n = table
    if n == 0:
        raise ValueError("no outcomes: a p-value needs at least one image")
    d = (only_a - only_b) / n
    if d == 0:
        return 1.0
    gap = (lambda z: _newcombe(table, z)[0]) if d > 0 else (lambda z: -_newcombe(table, z)[1])
    lo, hi = 0.0, _Z_MAX                # gap(lo) = |d| > 0; find where it reaches 0
    if gap(hi) > 0:
        return 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return math.erfc(hi / math.sqrt(2.0))


def method_text(n: int, n_seeds: int, confidence: float = 0.95) -> str:
    """What the card's `ci_method` says: how its intervals were computed, short enough for a legend."""
    seeds = f" ({n_seeds} seeds: their mean correct count on the same images)" if n_seeds > 1 else ""
    return (f"{confidence * 100:g} % Wilson score intervals over the {n:,} eval images{seeds}; "
            f"Δ: Newcombe's paired score interval (1998, method 10, continuity-corrected φ) against FP32 "
            f"on the same {n:,} images")
