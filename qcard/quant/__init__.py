"""The quantization simulation core: QSpec and fake quantizers, range setting, graph placement (fx +
eager fallback), BN folding, and the PTQ algorithms (CLE, bias correction, AdaRound, sensitivity,
mixed precision). Submodules import torch; this package itself does not (presets stay torch-free).

    from qcard.quant.graph import build_simulated      # place quantizers
    from qcard.quant.calibrate import set_weight_ranges, calibrate_activations
    from qcard.quant.report import quantization_block, layer_records
"""
from .qspec import QSpec

__all__ = ["QSpec"]
