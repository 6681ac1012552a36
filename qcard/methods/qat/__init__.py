"""Quantization-aware training: the white paper's standard QAT pipeline, every tradeoff a switch.

    methods: [{name: qat, params: {w_bits: 4, a_bits: 4, estimator: lsq, train: {epochs: 2, optimizer: adam, lr: 1.0e-4}}}]

Pipeline (Nagel et al. 2021, §5.3), in order:
  1. optional cross-layer equalization (+ high-bias absorption) on the folded model (`cle: true`);
  2. quantizers placed by the PTQ engine, with batch norm handled per `bn`:
       static_fold     BN folded into the weights before training (per-tensor weights);
       keep_then_fold  BN kept (training in batch-statistics mode) and, after training, its scale γ/σ folded
                       into the per-channel weight scales (exact: the integer weights do not change);
       kept            BN kept and never folded (what a preset without folding runs);
       auto            the white paper's rule: static_fold for per-tensor, keep_then_fold for per-channel
                       weights (kept where the preset does not fold);
  3. ranges initialized by the PTQ engine: `init_range: auto` is MSE, min-max for per-channel weights;
     optional bias correction;
  4. training (qcard.training.train, labels of the training split) with
       estimator: lsq  learnable scale and zero point (LSQ, straight-through gradients,
                       optional gradient scale 1/√(N·q_max): `lsq_grad_scale`; the network input's grid
                       stays at its initial range unless `learn_input_grid: true`), or
       estimator: ste  ranges fixed at their initial values, straight-through gradients to the weights;
                       `pact: true` learns the clip of non-negative activations (PACT);
  5. convert: learned grids frozen (z rounded), BN folded where asked; the card is read from the result.
Fine-tuning starts from the given (bundled or user) weights; `train.from_scratch: true` re-initializes
the model before ranges are set.

    params.py   QATParams (the shared scheme plus the training switches), QAT_RECIPE
    run.py      run_qat: build, initialize ranges (the ptq engine), make quantizers learnable, train, convert
    bn_fold.py  fold_kept_bn: batch norm kept during training folded into per-channel weight scales
"""
from __future__ import annotations

from ..base import Method, PointData, QuantResult, RunContext
from . import work
from .params import QAT_RECIPE, QATParams

__all__ = ["QAT", "QATParams", "QAT_RECIPE", "fold_kept_bn"]


def __getattr__(name: str):
    if name == "fold_kept_bn":                 # imports torch: loaded on first use
        from .bn_fold import fold_kept_bn
        return fold_kept_bn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QAT(Method):
    name = "qat"
    family = "qat"
    Params = QATParams
    planned_work = staticmethod(work.planned_work)     # `qcard run --dry-run` (qcard.methods.work)

    def apply(self, model, data: PointData, params: QATParams, ctx: RunContext) -> QuantResult:
        from .run import run_qat               # torch is imported on use, not on `qcard validate`
        return run_qat(model, data, params, ctx)
