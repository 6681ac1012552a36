"""The work a qat point implies before it runs: the ptq engine's range initialization, then training of
the simulated model (qcard.methods.work's vocabulary)."""
from __future__ import annotations

from typing import Any, Dict

from ..ptq.work import planned_work as ptq_work
from ..work import train_work
from .params import QATParams


def planned_work(p: QATParams, facts: Dict[str, Any]) -> Dict[str, Any]:
    work = ptq_work(p.ptq_params(), facts)
    for row in work["passes"]:
        row["what"] = f"range init: {row['what']}"
    work["train"] = train_work(p.train, facts["train_size"], model="quantized")
    work["evals"] = p.train.epochs if p.train.eval_every_epoch else 0
    return work
