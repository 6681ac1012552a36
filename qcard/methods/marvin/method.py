"""The marvin method: MARViN / AdaPT adaptive per-layer fixed-point precision during training
(the rules are in rules.py; the switching loop in controller.py)."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, model_validator

from ...training import TrainRecipe, train
from ..base import Method, MethodParams, QuantResult
from . import card, work
from .blocks import build_result
from .controller import MarvinController


class Marvin(Method):
    name = "marvin"
    family = "adaptive_precision_training"
    planned_work = staticmethod(work.planned_work)     # `qcard run --dry-run` (qcard.methods.work)

    class Params(MethodParams):
        train: TrainRecipe = Field(default_factory=TrainRecipe, description="the training recipe")
        initial_wl: int = Field(8, ge=2, le=32, description="starting word length of every layer (sign included)")
        initial_fl: int = Field(4, ge=0, le=31, description="starting fractional length of every layer")
        max_lookback: int = Field(100, ge=1, description="MAX_LOOKBACK")
        min_lookback: int = Field(10, ge=1, description="MIN_LOOKBACK")
        max_resolution: int = Field(100, ge=1, description="MAX_RESOLUTION (histogram bins)")
        min_resolution: int = Field(1, ge=1, description="MIN_RESOLUTION (histogram bins)")
        lookback_momentum: float = Field(0.33, ge=0, le=1, description="LOOKBACK_MOMENTUM")
        results_buffer: int = Field(8, ge=0, le=31, description="RESULTS_BUFFER: integer bits kept above fl")
        strategy: Literal["min", "mean", "max"] = Field("min", description="initial push-up strategy")
        adapt_strategy: bool = Field(True, description="escalate min → mean → max while the loss does not improve")
        wl_cap: int = Field(32, ge=2, le=32, description="word-length cap")
        fl_floor: int = Field(4, ge=0, le=31, description="lowest fl push-down may choose")
        kl_mode: Literal["true", "reference"] = Field("true", description="push-down test: true KL or the reference code's")
        kl_threshold: float = Field(1e-6, ge=0, description="τ: KL <= τ means no information lost (true mode)")
        kl_epsilon: float = Field(1e-10, gt=0, description="ε added to histogram probabilities (true mode)")
        quantize_grads: bool = Field(True, description="round gradients onto the layer's <wl, fl> (stochastic)")
        unit_norm_grads: bool = Field(True, description="divide every gradient tensor by its L2 norm (reference optimizer)")
        eval_rounding: Literal["nearest", "stochastic"] = Field(
            "nearest", description="activation rounding of the delivered model at inference")
        target_accuracy: Optional[float] = Field(
            None, gt=0, le=100, description="for the iso-accuracy speedup (needs train.eval_every_epoch)")

        @model_validator(mode="after")
        def _check(self):
            if self.min_lookback > self.max_lookback:
                raise ValueError(f"min_lookback ({self.min_lookback}) must not exceed max_lookback ({self.max_lookback})")
            if self.min_resolution > self.max_resolution:
                raise ValueError(f"min_resolution ({self.min_resolution}) must not exceed max_resolution "
                                 f"({self.max_resolution})")
            if self.initial_fl > self.initial_wl:
                raise ValueError(f"initial_fl ({self.initial_fl}) must not exceed initial_wl ({self.initial_wl})")
            if self.initial_wl > self.wl_cap:
                raise ValueError(f"initial_wl ({self.initial_wl}) exceeds wl_cap ({self.wl_cap})")
            if self.results_buffer >= self.wl_cap:
                raise ValueError(f"results_buffer ({self.results_buffer}) must be below wl_cap ({self.wl_cap})")
            if self.target_accuracy is not None and not self.train.eval_every_epoch:
                raise ValueError("target_accuracy needs train.eval_every_epoch: true (the iso-accuracy speedup "
                                 "reads the per-epoch eval accuracy)")
            return self

    def apply(self, model, data, params, ctx) -> QuantResult:
        controller = MarvinController(model, data, params, ctx)
        try:
            log = train(model, data, params.train, ctx, hooks=[controller])
        except BaseException:
            controller.close()
            raise
        return build_result(controller, log)

    def card_sections(self, stats: Dict[str, Any]) -> List[Dict[str, Any]]:
        return card.card_sections(stats)
