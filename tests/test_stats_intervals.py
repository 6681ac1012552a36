"""95 % intervals (qcard.stats.intervals): Wilson against scipy, shrinking as 1/sqrt(n), and the paired
interval of a difference (covers the truth; narrower than unpaired when the outcomes are correlated)."""
import math

import numpy as np
import pytest
from scipy import optimize, stats

from qcard.stats.intervals import (accuracy_interval, method_text, paired_delta_interval, paired_delta_pvalue,
                                   per_image, wilson_interval)

GRID = [(k, n) for n in (1, 2, 10, 37, 200, 1000, 50000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n})]


@pytest.mark.parametrize("k,n", GRID)
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_agrees_with_scipy(k, n, confidence):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence)
    assert lo == pytest.approx(100 * ref.low, abs=1e-9)
    assert hi == pytest.approx(100 * ref.high, abs=1e-9)
    assert 0.0 <= lo <= 100 * k / n <= hi <= 100.0


def test_wilson_edges():
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 1000)
    assert lo == 0.0 and 0 < hi < 0.5            # nothing right: not a zero-width interval
    lo, hi = wilson_interval(1000, 1000)
    assert hi == 100.0 and 99.5 < lo < 100
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(1, 4, confidence=1.0)


def test_intervals_shrink_as_one_over_sqrt_n():
    # the same 98 % accuracy on 4x, 16x, 64x the images: the width halves each time (large n)
    widths = []
    for n in (1000, 4000, 16000, 64000):
        lo, hi = wilson_interval(0.98 * n, n)
        widths.append(hi - lo)
    for a, b in zip(widths, widths[1:]):
        assert a / b == pytest.approx(2.0, rel=0.02)
    # and about 2 * 1.96 * the standard error 0.44 points the issue quotes for 1,000 images
    assert widths[0] == pytest.approx(2 * 1.96 * 100 * math.sqrt(0.98 * 0.02 / 1000), rel=0.05)


def test_paired_interval_of_identical_models_is_centred_and_of_a_fraction_from_seeds():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.9
    lo, hi = paired_delta_interval(a, a)
    assert lo < 0 < hi and lo == pytest.approx(-hi, abs=1e-9)
    # several seeds: each image counts as the fraction of seeds that got it right
    seeds = [a, ~a]
    assert per_image(seeds).tolist() == [0.5] * 500
    assert accuracy_interval(seeds) == pytest.approx(wilson_interval(250, 500))


def _correlated(rng, n, p_ref, flips):
    """A reference model right with probability p_ref, and a second model that differs from it on a
    `flips` fraction of the images (a quantized model and its FP32 model disagree on few images)."""
    ref = rng.random(n) < p_ref
    other = ref.copy()
    change = rng.random(n) < flips
    other[change] = rng.random(change.sum()) < 0.5     # a coin on the disagreeing images
    return ref, other


def _unpaired_width(a, b):
    """Width of Newcombe's interval for two INDEPENDENT samples (the paired one with the correlation 0)."""
    p1, p2 = 100 * a.mean(), 100 * b.mean()
    (l1, u1), (l2, u2) = wilson_interval(a.sum(), len(a)), wilson_interval(b.sum(), len(b))
    return math.hypot(p1 - l1, u2 - p2) + math.hypot(u1 - p1, p2 - l2)


def test_paired_interval_covers_the_true_difference_and_beats_unpaired():
    # a population of 200,000 images; the true difference is known there; draws of 1,000 images
    rng = np.random.default_rng(1)
    ref, other = _correlated(rng, 200_000, 0.98, 0.06)
    true = 100 * (other.mean() - ref.mean())
    covered, paired_w, unpaired_w, trials = 0, [], [], 400
    for _ in range(trials):
        idx = rng.integers(0, len(ref), 1000)
        lo, hi = paired_delta_interval(other[idx], ref[idx])
        covered += lo <= true <= hi
        paired_w.append(hi - lo)
        unpaired_w.append(_unpaired_width(other[idx], ref[idx]))
    assert covered / trials >= 0.92                 # nominal 95 %
    assert np.mean(paired_w) < 0.8 * np.mean(unpaired_w)


def test_paired_interval_finds_a_real_gap():
    # 5 points worse on 1,000 images: the interval excludes 0; 0.3 points: it does not
    rng = np.random.default_rng(2)
    ref = rng.random(1000) < 0.98
    worse = ref.copy()
    worse[np.flatnonzero(ref)[:50]] = False
    lo, hi = paired_delta_interval(worse, ref)
    assert hi < 0 and lo < -5 < hi
    slightly = ref.copy()
    slightly[np.flatnonzero(ref)[:3]] = False
    lo, hi = paired_delta_interval(slightly, ref)
    assert lo < -0.3 < 0 < hi


def test_paired_interval_is_deterministic_and_checks_its_input():
    rng = np.random.default_rng(3)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.8
    assert paired_delta_interval(a, b) == paired_delta_interval(a.copy(), b.copy())
    assert paired_delta_interval([], []) is None
    with pytest.raises(ValueError, match="same images"):
        paired_delta_interval(a, b[:-1])


def test_method_text_names_the_methods():
    one, three = method_text(1000, 1), method_text(1000, 3)
    assert "Wilson" in one and "Newcombe" in one and "1,000" in one and "seeds" not in one
    assert "3 seeds" in three


def _table_outcomes(both, only_a, only_b, neither):
    """Per-image outcome vectors (a, b) that make the given paired 2x2 table."""
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a, bool), np.array(b, bool)


def _newcombe10_written_out(e, f, g, h, z=1.959963984540054):
    """Newcombe (1998) method 10 written out independently of qcard, as fractions: Wilson limits of
    the two marginals, the continuity-corrected phi, then the square-and-add combination."""
    n = e + f + g + h
    def wilson(k):
        p = k / n
        mid, rad = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (mid - rad) / (1 + z * z / n), (mid + rad) / (1 + z * z / n)
    p1, p2 = (e + f) / n, (e + g) / n
    (l1, u1), (l2, u2) = wilson(e + f), wilson(e + g)
    adbc = e * h - f * g
    adbc = adbc - n / 2 if adbc > n / 2 else (0.0 if adbc >= 0 else adbc)
    denom = (e + f) * (g + h) * (e + g) * (f + h)
    phi = adbc / math.sqrt(denom) if denom else 0.0
    dl = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    du = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2 - dl, p1 - p2 + du


@pytest.mark.parametrize("table,expected", [
    # Newcombe (1998), Stat. Med. 17:2635, Table II example (e/f/g/h = 59/6/16/80): method 10
    ((59, 6, 16, 80), (-0.1186, -0.0046)),
])
def test_paired_interval_known_answers_newcombe_1998(table, expected):
    a, b = _table_outcomes(*table)
    lo, hi = paired_delta_interval(a, b)
    assert lo / 100 == pytest.approx(expected[0], abs=5e-5)
    assert hi / 100 == pytest.approx(expected[1], abs=5e-5)


@pytest.mark.parametrize("table", [(59, 6, 16, 80), (980, 0, 5, 15), (970, 12, 3, 15), (40, 10, 10, 40),
                                   (500, 30, 20, 450), (1, 2, 3, 4), (990, 3, 4, 3)])
def test_paired_interval_matches_an_independent_method_10(table):
    a, b = _table_outcomes(*table)
    lo, hi = paired_delta_interval(a, b)
    ref = _newcombe10_written_out(*table)
    assert (lo / 100, hi / 100) == pytest.approx(ref, abs=1e-12)


def test_the_continuity_correction_widens_where_the_raw_phi_would_not():
    # b=0, c=5 out of 1,000: exact McNemar p = 0.0625, so the interval must include 0 (the raw phi excludes it)
    a, b = _table_outcomes(980, 0, 5, 15)
    lo, hi = paired_delta_interval(a, b)
    assert lo < 0 < hi


# --- Wilson against statsmodels; the p-value that goes with the paired interval ------------------------

@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (985, 1000), (974, 1000), (49123, 50000), (1, 1)])
def test_wilson_matches_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint
    ref = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((100 * ref[0], 100 * ref[1]), abs=1e-9)


PVALUE_TABLES = [(59, 6, 16, 80), (970, 15, 4, 11), (980, 0, 5, 15), (500, 30, 20, 450), (1, 2, 3, 4),
                 (40, 10, 10, 40), (900, 60, 2, 38), (10, 0, 1, 0)]


def _independent_p(table):
    """The alpha at which the written-out method 10 interval reaches 0, by brentq on z (scipy)."""
    e, f, g, h = table
    if f == g:
        return 1.0
    near = (lambda z: _newcombe10_written_out(*table, z=z)[0]) if f > g else \
        (lambda z: -_newcombe10_written_out(*table, z=z)[1])
    z = optimize.brentq(near, 1e-9, 37, xtol=1e-14)
    return 2 * stats.norm.sf(z)


@pytest.mark.parametrize("table", PVALUE_TABLES)
def test_paired_pvalue_is_where_the_interval_reaches_zero(table):
    a, b = _table_outcomes(*table)
    p = paired_delta_pvalue(a, b)
    assert p == pytest.approx(_independent_p(table), rel=1e-7, abs=1e-300)
    if table[1] == table[2]:
        assert p == 1.0
        return
    # duality: a little above the level 1 - p the interval includes 0, a little below it excludes it
    lo, hi = paired_delta_interval(a, b, 1 - p * 0.999)
    assert lo < 0 < hi
    lo, hi = paired_delta_interval(a, b, 1 - p * 1.001)
    assert lo > 0 or hi < 0


def test_paired_pvalue_known_answer_and_edges():
    # Newcombe's 59/6/16/80: the 95 % interval [-0.1186, -0.0046] excludes 0, so p < 0.05; at its level
    # the upper limit is 0
    a, b = _table_outcomes(59, 6, 16, 80)
    p = paired_delta_pvalue(a, b)
    assert 0.01 < p < 0.05
    assert paired_delta_interval(a, b, 1 - p)[1] == pytest.approx(0.0, abs=1e-9)
    # b = 0, c = 5 of 1,000 (exact McNemar 0.0625): the continuity-corrected interval keeps 0, p > 0.05
    assert paired_delta_pvalue(*_table_outcomes(980, 0, 5, 15)) > 0.05
    # symmetric in the direction; huge gaps give 0, not an error
    assert paired_delta_pvalue(b, a) == pytest.approx(p, rel=1e-12)
    assert paired_delta_pvalue(*_table_outcomes(0, 1000, 0, 0)) == 0.0
    with pytest.raises(ValueError):
        paired_delta_pvalue([], [])


def test_paired_pvalue_over_seeds_is_the_seed_means_and_order_free():
    rng = np.random.default_rng(5)
    ref = rng.random(1000) < 0.985
    s1, s2 = ref.copy(), ref.copy()
    s2[np.flatnonzero(ref)[:40]] = False
    p = paired_delta_pvalue([s1, s2], ref)
    assert p == paired_delta_pvalue([s2, s1], ref) == paired_delta_pvalue(per_image([s1, s2]), ref)
    assert p < 0.01 and paired_delta_pvalue([s1, s1], ref) == 1.0


def test_paired_interval_limits_move_away_as_the_level_grows():
    """The duality rests on this: over tables of whole and fractional (seed-mean) counts, the lower limit
    never rises and the upper never falls as the confidence level grows."""
    rng = np.random.default_rng(6)
    levels = np.linspace(0.5, 0.999999, 120)
    for _ in range(150):
        n = int(rng.choice([20, 200, 1000]))
        x = rng.random(n) < rng.uniform(0.5, 1)
        y = np.where(rng.random(n) < rng.uniform(0, 0.3), rng.random(n) < 0.5, x)
        seeds = [x, np.where(rng.random(n) < 0.05, ~x, x)] if rng.random() < 0.5 else x
        limits = np.array([paired_delta_interval(seeds, y, c) for c in levels])
        assert np.all(np.diff(limits[:, 0]) <= 1e-12) and np.all(np.diff(limits[:, 1]) >= -1e-12)


def test_paired_pvalue_holds_its_level_when_the_models_are_equally_good():
    """Two models that disagree on 3 % of 1,000 images at random (equal accuracy by construction): the
    test should reject at 0.05 in at most about 5 % of draws (measured: 4 % over 2,000 draws)."""
    rng = np.random.default_rng(7)
    rejected, draws = 0, 500
    for _ in range(draws):
        a = rng.random(1000) < 0.97
        b = a.copy()
        differ = rng.random(1000) < 0.03
        coin = rng.random(1000) < 0.5
        a[differ], b[differ] = coin[differ], ~coin[differ]
        rejected += paired_delta_pvalue(a, b) <= 0.05
    assert rejected / draws <= 0.065
