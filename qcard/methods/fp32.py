"""The identity method: the FP32 model itself, so a baseline gets a card like any other point."""
from __future__ import annotations

from ..cards.schema import unquantized_block
from .base import Method, MethodParams, QuantResult


class FP32(Method):
    name = "fp32"
    family = "none"

    class Params(MethodParams):
        pass

    def apply(self, model, data, params, ctx) -> QuantResult:
        return QuantResult(model=model, quantization=unquantized_block(), pipeline=[], calibration=None)
