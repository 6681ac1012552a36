"""The work a marvin point implies before it runs: the training, with fixed-point simulation of every
layer and the histograms of the precision switching (qcard.methods.work's vocabulary)."""
from __future__ import annotations

from typing import Any, Dict

from ..work import empty_work, train_work


def planned_work(p: Any, facts: Dict[str, Any]) -> Dict[str, Any]:
    work = empty_work()
    work["train"] = train_work(p.train, facts["train_size"], model="quantized")
    work["evals"] = p.train.epochs if p.train.eval_every_epoch else 0
    work["notes"].append("the precision switches' KL tests (every lookback steps) are not counted")
    return work
