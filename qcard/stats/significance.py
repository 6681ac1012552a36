"""Paired significance on per-sample outcomes: the exact McNemar test and Benjamini–Hochberg.

Pure Python (math only): `qcard compare` runs it over up to thousands of card pairs without importing
scipy or torch. The known-answer tests check it against scipy.stats.binomtest and
scipy.stats.false_discovery_control.

    b, c = discordant_counts(bits_a, bits_b)    # images only A got right, images only B got right
    p = mcnemar_exact(b, c)                     # two-sided exact p-value
    adjusted, rejected = benjamini_hochberg([p1, p2, ...], q=0.05)
"""
from __future__ import annotations

import math
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
    """Two-sided exact McNemar p-value from the discordant counts: the binomial test of min(b, c) successes
    in b + c trials at p = 1/2. The null distribution is symmetric, so the two-sided p-value (every outcome
    no more likely than the observed one) is twice the lower tail, capped at 1; b = c (including 0, 0)
    gives 1."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"discordant counts must be non-negative integers, not {b}, {c}")
    b, c = int(b), int(c)
    n, k = b + c, min(b, c)
    if 2 * k == n:
        return 1.0
    # P(X <= k) for X ~ Binomial(n, 1/2), summed from k downwards: each term is the last times i/(n-i+1);
    # the first term in logs so that n = 50,000 does not overflow
    log_first = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)
    total, term = 1.0, 1.0
    for i in range(k, 0, -1):
        term *= i / (n - i + 1)
        total += term
        if term < 1e-17 * total:     # the rest cannot change a double
            break
    return min(1.0, 2.0 * math.exp(log_first) * total)


def benjamini_hochberg(pvalues: Sequence[float], q: float = FDR_Q) -> Tuple[List[float], List[bool]]:
    """Benjamini–Hochberg step-up over m tests: (adjusted p-values, rejected at false discovery rate q), both
    in input order. Adjusted p_(i) = min over j >= i of m/j * p_(j) (sorted ascending), capped at 1, so
    they are monotone in the raw p-values; a test is rejected when its adjusted p-value is <= q."""
    m = len(pvalues)
    for p in pvalues:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p-values must lie in [0, 1], not {p}")
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 1.0
    for rank in range(m, 0, -1):           # from the largest p-value down: running minimum
        i = order[rank - 1]
        running = min(running, pvalues[i] * m / rank)
        adjusted[i] = running
    return adjusted, [a <= q for a in adjusted]
