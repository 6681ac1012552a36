"""AdaRound (Nagel et al. 2020): learn, layer by layer, whether each weight rounds up or down.

The layer case of the reconstruction engine (quant.reconstruct): each conv/linear is a unit, in
topological order; W̃(V) = s·(clamp(⌊W/s⌋ + h(V) + z, q_min, q_max) − z) (quant.rounding), minimising
    ‖f(W x) − f(W̃ x̂)‖² + λ·Σ(1 − |2h(V) − 1|^β)
where x is the layer's input in the FP model (an untouched FP copy), x̂ its input in the quantized
model built so far (upstream layers already rounded, activations FP, as in AIMET), f the fused
activation; β anneals from 20 to 2 after a warm start (20% of the iterations, without the regulariser);
Adam, lr 1e-3; λ = 0.01. Defaults follow AIMET (10k iterations, 15k below 8 bits). The rounded weight
is written into the layer (on the quantizer's grid, so the frozen quantizer reproduces it exactly); the
FP weight is kept in `layer.qcard_fp_weight`.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from torch import nn

from .reconstruct import Settings, reconstruct

__all__ = ["adaround"]


def adaround(model: nn.Module, batches: Sequence, iters: int = 10000, reg: float = 0.01,
             beta_start: float = 20.0, beta_end: float = 2.0, warm_start: float = 0.2, batch_size: int = 32,
             lr: float = 1e-3, device: str = "cpu", seed: int = 0, progress: bool = False,
             targets: str = "fp_model", checkpoint=None) -> Dict[str, Any]:
    """`targets: rounded_so_far` is qcard's AdaRound before the engine (see quant.reconstruct);
    checkpoint: the engine's Checkpointer (a rerun goes on from its last save)."""
    s = Settings(unit="layer", iters=iters, reg=reg, beta_start=beta_start, beta_end=beta_end,
                 warm_start=warm_start, batch_size=batch_size, lr=lr, input="fp_activations",
                 quant_activations=False, targets=targets, label="adaround")
    rec = reconstruct(model, batches, s, device=device, seed=seed, progress=progress, checkpoint=checkpoint)
    layers = [{"name": u["unit"], "output_mse_nearest": u["loss_nearest"], "output_mse_adaround": u["loss_after"],
               "changed_vs_nearest": u["changed_vs_nearest"], "input_gap": u["input_gap"]}
              for u in rec["per_unit"]]
    return {"iterations": iters, "targets": targets, "wall_s": rec["wall_s"], "layers": layers}
