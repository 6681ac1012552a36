"""Per-sample outcomes (was each eval image classified correctly?) packed for a card.

The encoding is the card's `results.outcomes.encoding` "packbits-base64": numpy.packbits of the booleans in
eval order (big-endian bit order: the first image is the highest bit of the first byte; the last byte is
zero-padded), then base64. 1,000 images -> 125 bytes -> 168 characters.
"""
from __future__ import annotations

import base64
import binascii
from typing import Iterable

import numpy as np

from ..errors import QcardError

ENCODING = "packbits-base64"


def pack_outcomes(correct: Iterable[bool]) -> str:
    bits = np.asarray(list(correct) if not isinstance(correct, np.ndarray) else correct, dtype=bool).ravel()
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def unpack_outcomes(text: str, n: int) -> np.ndarray:
    """The n booleans packed in text; a string that does not hold exactly n bits is an error, not a guess."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise QcardError("per-sample outcomes are not valid base64") from None
    if len(raw) != (n + 7) // 8:
        raise QcardError(f"per-sample outcomes hold {len(raw) * 8} bits, not the {n} images the card says "
                         f"({(n + 7) // 8} bytes expected)")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits[n:].any():
        raise QcardError("per-sample outcomes have bits set past the last image (not packbits-base64?)")
    return bits[:n].astype(bool)
