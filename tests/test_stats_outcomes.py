"""Per-sample outcome packing: round trip, size, and corrupted strings rejected."""
import numpy as np
import pytest

from qcard.errors import QcardError
from qcard.stats.outcomes import pack_outcomes, unpack_outcomes


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 50_000])
def test_round_trip(n):
    bits = np.random.default_rng(n).random(n) < 0.9
    text = pack_outcomes(bits)
    assert np.array_equal(unpack_outcomes(text, n), bits)
    assert len(text) <= 4 * ((n + 7) // 8 + 2) // 3     # base64 of ceil(n/8) bytes


def test_first_image_is_the_high_bit():
    assert pack_outcomes([True] + [False] * 7) == "gA=="      # 0x80


@pytest.mark.parametrize("text, n", [("gA==", 20), ("not base64!", 8), ("gQ==", 7)])
def test_bad_strings_are_errors(text, n):
    with pytest.raises(QcardError):
        unpack_outcomes(text, n)
