"""The work a sparq point implies before it runs: its calibration, BN recalibration and statistics passes
(qcard.methods.work's vocabulary)."""
from __future__ import annotations

from typing import Any, Dict

from ..work import empty_work, passes
from .params import SparqParams


def planned_work(p: SparqParams, facts: Dict[str, Any]) -> Dict[str, Any]:
    work = empty_work()
    cal = facts["calibration_size"]
    work["passes"] += passes("calibration (BN statistics on the paper base)", cal, model="fp32")
    if p.base == "paper" and p.bn_recalibration:
        work["passes"] += passes("BN recalibration with SPARQ on (models with batch norm)", cal)
    work["passes"] += passes("statistics", min(p.stats_size, cal))
    return work
