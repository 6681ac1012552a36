"""Paired significance on per-sample outcomes: the exact McNemar test, Benjamini–Hochberg, and the
Benjamini–Yekutieli level for intervals that go with BH's selection.

Written out here (exact binomial tails, the BH step-up) rather than imported from scipy: importing
scipy.stats alone costs more than a whole `qcard compare` of a thousand cards should take. The tests check
both against scipy and statsmodels. No torch, no scipy at runtime.

    b, c = discordant_counts(bits_a, bits_b)    # images only A got right, images only B got right
    p = mcnemar_exact(b, c)                     # two-sided exact p-value
    adjusted, rejected = benjamini_hochberg([p1, p2, ...], q=0.05)
    level = fcr_level(sum(rejected), len(rejected))   # confidence level of the intervals shown with them
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

FDR_Q = 0.05


def discordant_counts(a: Sequence[bool], b: Sequence[bool]) -> Tuple[int, int]:
    """(images A got right and B wrong, images B got right and A wrong) over the same images in the same
    order. Takes lists or numpy boolean arrays of equal length."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same images: {len(a)} vs {len(b)} outcomes")
    if hasattr(a, "dtype") and hasattr(b, "dtype"):    # numpy arrays: one vectorised pass each
        import numpy as np
        return int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: the exact binomial test of b
    successes in b + c trials at p = 1/2 (the null distribution is symmetric, so this is twice the
    smaller tail, capped at 1); no discordant image (0, 0) gives 1."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"discordant counts must be non-negative integers, not {b}, {c}")
    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    return min(1.0, 2.0 * _binomial_half_tail(min(b, c), b + c))


# Up to this many trials the tail is summed exactly in integers; above it, in log space (relative error
# ~1e-12, far below the two significant digits a p-value is printed with).
_EXACT_TRIALS = 3000


def _binomial_half_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if n <= _EXACT_TRIALS:
        from fractions import Fraction
        term, total = 1, 1                       # C(n, 0); then C(n, i) from C(n, i - 1)
        for i in range(1, k + 1):
            term = term * (n - i + 1) // i
            total += term
        return float(Fraction(total, 1 << n))
    import math
    log_half = n * math.log(0.5)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(x - top) for x in logs)


def benjamini_hochberg(pvalues: Sequence[float], q: float = FDR_Q) -> Tuple[List[float], List[bool]]:
    """Benjamini–Hochberg step-up over m tests: (adjusted p-values, rejected at false discovery rate q), both
    in input order. The adjusted p-values (as scipy's false_discovery_control(method="bh")):
    p_(i) * m / i made monotone from the largest down, capped at 1. A test is rejected when its adjusted
    p-value is <= q, which is the step-up rule p_(i) <= i * q / m for the largest such i."""
    for p in pvalues:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p-values must lie in [0, 1], not {p}")
    if not pvalues:
        return [], []
    import numpy as np
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    monotone = np.minimum.accumulate(scaled[::-1])[::-1]      # from the largest p down
    adjusted_sorted = np.minimum(monotone, 1.0)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    out = [float(a) for a in adjusted]
    return out, [a <= q for a in out]


def fcr_level(n_rejected: int, m: int, q: float = FDR_Q) -> float:
    """Confidence level of the intervals shown beside BH's marks: 1 - R * q / m, with R of the m tests in
    the family rejected by BH at q (Benjamini & Yekutieli 2005, "False discovery rate-adjusted multiple
    confidence intervals for selected parameters", JASA 100:71, the FCR-adjusted intervals). With R = 0
    it is 1 - q / m. Intervals that invert the tests then exclude 0 exactly for the rejected tests: a
    rejected p is <= R * q / m, and every other p is > (R + 1) * q / m (> q / m when R = 0)."""
    if m < 1 or not 0 <= n_rejected <= m:
        raise ValueError(f"need 0 <= rejected <= m and m >= 1, not {n_rejected} of {m}")
    return 1.0 - max(n_rejected, 1) * q / m
