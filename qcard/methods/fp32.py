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
        return QuantResult(model=model, quantization=fp32_block(model), pipeline=[], calibration=None)


def fp32_block(model) -> dict:
    """The card's quantization block of an FP32 model: nothing quantized; batch norm "kept" where the
    model has batch norm layers and "none" (absent) where it has none, as the PTQ cards of it say."""
    from torch import nn
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {**unquantized_block(), "batch_norm": "kept" if has_bn else "none"}
