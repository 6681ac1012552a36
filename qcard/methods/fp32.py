"""The identity method: the FP32 model itself, so a baseline gets a card like any other point."""
from __future__ import annotations

from .base import Method, MethodParams, QuantResult


def fp32_quantization_block() -> dict:
    """The card's quantization block for a model that is not quantized at all."""
    none_side = {"bits": None, "granularity": None, "symmetric": None, "signed": None}
    return {
        "preset": None, "graph_mode": None,
        "weights": dict(none_side, group_size=None, scale_format=None, range_setting=None, rounding=None),
        "activations": dict(none_side, range_setting=None, dynamic=False, quant_point=None),
        "first_layer": {"weight_bits": None, "activation_bits": None},
        "last_layer": {"weight_bits": None, "activation_bits": None},
        "batch_norm": "kept", "residual_add": None, "concat": None, "avg_pool": None,
        "bias_bits": None, "accumulator_bits": None,
        "cross_layer_equalization": {"applied": False, "bias_absorption": False},
        "bias_correction": "none",
        "mixed_precision": {"enabled": False},
        "overrides": [], "unquantized_layers": [], "hardware_unfriendly": [],
    }


class FP32(Method):
    name = "fp32"
    family = "none"

    class Params(MethodParams):
        pass

    def apply(self, model, data, params, ctx) -> QuantResult:
        return QuantResult(model=model, quantization=fp32_quantization_block(), pipeline=[], calibration=None)
