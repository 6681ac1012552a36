"""qcard.stats.significance against two libraries: the exact McNemar p-value against scipy's binomial test
and statsmodels' mcnemar, Benjamini–Hochberg against scipy's false_discovery_control and statsmodels'
multipletests, on grids including 0 and all-correct cases; and the Benjamini–Yekutieli level."""
import random

import numpy as np
import pytest
from scipy import stats

from qcard.stats.significance import benjamini_hochberg, discordant_counts, fcr_level, mcnemar_exact


def scipy_mcnemar(b, c):
    return 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue


@pytest.mark.parametrize("b,c", [(b, c) for b in range(0, 13) for c in range(0, 13)]
                         + [(0, 40), (3, 1000), (120, 150), (480, 520), (0, 2000), (1, 1), (25000, 25600),
                            (0, 5000), (997, 3)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    ours, ref = mcnemar_exact(b, c), scipy_mcnemar(b, c)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(c, b) == ours          # symmetric in the two cards


def test_mcnemar_known_answers():
    assert mcnemar_exact(0, 0) == 1.0             # no discordant pair (both all correct, or identical)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 1) == 1.0             # one discordant image proves nothing
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_discordant_counts_lists_and_arrays_and_all_correct():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    assert discordant_counts(a, b) == (2, 1)
    assert discordant_counts(np.array(a), np.array(b)) == (2, 1)
    every = np.ones(1000, dtype=bool)
    assert discordant_counts(every, every) == (0, 0) and mcnemar_exact(0, 0) == 1.0
    none = np.zeros(1000, dtype=bool)
    assert discordant_counts(every, none) == (1000, 0) and mcnemar_exact(1000, 0) < 1e-300
    with pytest.raises(ValueError, match="same images"):
        discordant_counts([True], [True, False])


def _grid():
    rng = random.Random(13)
    cases = [[0.0], [1.0], [0.0, 0.0, 1.0], [0.01, 0.02, 0.03, 0.04, 0.05], [0.5] * 7, [0.04, 0.2, 0.049, 0.001]]
    cases += [[rng.random() ** 3 for _ in range(n)] for n in (2, 3, 10, 50, 400)]
    return cases


@pytest.mark.parametrize("ps", _grid())
def test_benjamini_hochberg_matches_scipy(ps):
    adjusted, rejected = benjamini_hochberg(ps)
    ref = stats.false_discovery_control(np.array(ps), method="bh")
    assert adjusted == pytest.approx(list(ref), rel=1e-12, abs=1e-15)
    assert rejected == [a <= 0.05 for a in ref]
    # monotone: a smaller raw p-value never gets a larger adjusted one; adjusted >= raw
    pairs = sorted(zip(ps, adjusted))
    assert all(x[1] <= y[1] for x, y in zip(pairs, pairs[1:]))
    assert all(a >= p for p, a in zip(ps, adjusted))


def test_benjamini_hochberg_raw_significant_adjusted_not():
    adjusted, rejected = benjamini_hochberg([0.04, 0.3, 0.6])
    assert adjusted[0] == pytest.approx(0.12) and rejected == [False, False, False]
    assert benjamini_hochberg([]) == ([], [])
    with pytest.raises(ValueError):
        benjamini_hochberg([1.5])


# --- against statsmodels (a second library, independent of scipy) -------------------------------------

@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (0, 5), (1, 10), (4, 15), (2, 0), (12, 7), (40, 60), (3, 1000),
                                 (480, 520), (0, 2000), (997, 3)])
def test_mcnemar_matches_statsmodels(b, c):
    from statsmodels.stats.contingency_tables import mcnemar
    # statsmodels takes the 2x2 table; its exact test is the binomial test on the off-diagonal cells
    ref = mcnemar([[900, b], [c, 50]], exact=True).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, ref), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("ps", _grid())
def test_benjamini_hochberg_matches_statsmodels(ps):
    from statsmodels.stats.multitest import multipletests
    rejected_ref, adjusted_ref, _, _ = multipletests(ps, alpha=0.05, method="fdr_bh")
    adjusted, rejected = benjamini_hochberg(ps)
    assert adjusted == pytest.approx(list(adjusted_ref), rel=1e-12, abs=1e-15)
    assert rejected == list(rejected_ref)


def test_fcr_level_known_values():
    assert fcr_level(0, 7) == pytest.approx(1 - 0.05 / 7)        # nothing selected: 1 - q/m
    assert fcr_level(1, 1) == pytest.approx(0.95)
    assert fcr_level(3, 7) == pytest.approx(1 - 3 * 0.05 / 7)
    assert fcr_level(5, 5) == pytest.approx(0.95)                 # all selected: the unadjusted level
    assert fcr_level(2, 10, q=0.1) == pytest.approx(0.98)
    for bad in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(ValueError):
            fcr_level(*bad)


@pytest.mark.parametrize("ps", _grid())
def test_fcr_level_separates_the_rejected_from_the_rest(ps):
    """What makes the intervals agree with the marks: at alpha = 1 - fcr_level, every rejected p is <= alpha
    and every other p is > alpha (so an interval that inverts the test excludes 0 exactly for the rejected)."""
    _, rejected = benjamini_hochberg(ps)
    alpha = 1 - fcr_level(sum(rejected), len(ps))
    for p, r in zip(ps, rejected):
        assert (p <= alpha + 1e-15) if r else (p > alpha)
