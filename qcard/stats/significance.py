"""Paired significance on per-sample outcomes: the exact McNemar test, Benjamini–Hochberg, and the
Benjamini–Yekutieli level for intervals that go with BH's selection.

scipy does the arithmetic (its binomial test and false_discovery_control); this module fixes the
conventions qcard uses around them. No torch.

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
    """Two-sided exact McNemar p-value from the discordant counts: scipy's exact binomial test of b
    successes in b + c trials at p = 1/2 (the null distribution is symmetric, so this is twice the
    smaller tail, capped at 1); no discordant image (0, 0) gives 1."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"discordant counts must be non-negative integers, not {b}, {c}")
    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest
    return float(binomtest(b, b + c, 0.5).pvalue)


def benjamini_hochberg(pvalues: Sequence[float], q: float = FDR_Q) -> Tuple[List[float], List[bool]]:
    """Benjamini–Hochberg step-up over m tests: (adjusted p-values, rejected at false discovery rate q), both
    in input order. The adjusted p-values are scipy's false_discovery_control(method="bh"):
    p_(i) * m / i made monotone from the largest down, capped at 1. A test is rejected when its adjusted
    p-value is <= q, which is the step-up rule p_(i) <= i * q / m for the largest such i."""
    for p in pvalues:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p-values must lie in [0, 1], not {p}")
    if not pvalues:
        return [], []
    from scipy.stats import false_discovery_control
    adjusted = [float(a) for a in false_discovery_control(list(pvalues), method="bh")]
    return adjusted, [a <= q for a in adjusted]


def fcr_level(n_rejected: int, m: int, q: float = FDR_Q) -> float:
    """Confidence level of the intervals shown beside BH's marks: 1 - R * q / m, with R of the m tests in
    the family rejected by BH at q (Benjamini & Yekutieli 2005, "False discovery rate-adjusted multiple
    confidence intervals for selected parameters", JASA 100:71, the FCR-adjusted intervals). With R = 0
    it is 1 - q / m. Intervals that invert the tests then exclude 0 exactly for the rejected tests: a
    rejected p is <= R * q / m, and every other p is > (R + 1) * q / m (> q / m when R = 0)."""
    if m < 1 or not 0 <= n_rejected <= m:
        raise ValueError(f"need 0 <= rejected <= m and m >= 1, not {n_rejected} of {m}")
    return 1.0 - max(n_rejected, 1) * q / m
