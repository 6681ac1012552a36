"""fp32_train: train the FP32 model with a recipe — the baseline of the training methods.

Give it the same `train:` recipe as marvin or qat in the same config, so the card of each training
method can be read against an FP32 model trained the same way (same data, epochs, optimizer, seed).
"""
from __future__ import annotations

from pydantic import Field

from ..training import TrainRecipe, train
from .base import Method, MethodParams, QuantResult
from .fp32 import fp32_block


class FP32Train(Method):
    name = "fp32_train"
    family = "none"

    class Params(MethodParams):
        train: TrainRecipe = Field(default_factory=TrainRecipe, description="the training recipe")

    def apply(self, model, data, params, ctx) -> QuantResult:
        log = train(model, data, params.train, ctx)
        return QuantResult(
            model=model,
            quantization=fp32_block(model),
            stats={"training": log.to_stats()},
            pipeline=["reinitialize" if params.train.from_scratch else "start_from_given_weights", "train_fp32"],
            calibration={"split": "train", "size": len(data.train), "seed": ctx.seed, "labels_used": True,
                         "used_for": "training"},
            warnings=list(log.warnings),
        )
