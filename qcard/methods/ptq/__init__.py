"""The ptq method: post-training quantization, the white paper's pipeline with every tradeoff a switch.

    params.py           PTQParams (the shared scheme, quant.scheme.SimScheme, plus pipeline, steps, algorithms)
    pipeline.py         run_ptq: calibration batches, build, ordered steps, sensitivity, the card block
    card.py             its card sections: the rounding steps' per-unit tables (adaround, brecq, qdrop, gptq)
    mixed_precision.py  the greedy bit allocation that `mixed_precision: true` runs before the pipeline
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..base import Method, PointData, QuantResult, RunContext
from . import work
from .params import PIPELINES, PTQParams

__all__ = ["PTQ", "PTQParams", "PIPELINES"]


class PTQ(Method):
    name = "ptq"
    family = "ptq"
    Params = PTQParams
    planned_work = staticmethod(work.planned_work)     # `qcard run --dry-run` (qcard.methods.work)

    def apply(self, model, data: PointData, params: PTQParams, ctx: RunContext) -> QuantResult:
        from .pipeline import run_ptq          # torch is imported on use, not on `qcard validate`
        return run_ptq(model, data, params, ctx)

    def card_sections(self, stats: Dict[str, Any]) -> List[Dict[str, Any]]:
        from .card import card_sections
        return card_sections(stats)
