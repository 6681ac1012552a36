"""A user's own method, plugged in as 'user_methods:ScaleWeights' without editing qcard.

Standalone on purpose: it uses only the method protocol (qcard.methods.base), no sibling method,
and hands the card its own section (a table of its tags) through card_sections.
"""
import time
from typing import List

import torch

from qcard.methods.base import Method, MethodParams, QuantResult
from qcard.records import LayerRecord


def not_quantized() -> dict:
    """The card's quantization block: nothing quantized (weights stay float32); the card schema
    fills every key not named here with its default."""
    return {"weights": {"bits": None, "granularity": None, "symmetric": None, "signed": None},
            "activations": {"bits": None, "granularity": None, "symmetric": None, "signed": None, "dynamic": False},
            "batch_norm": "kept"}


class ScaleWeights(Method):
    name = "scale_weights"
    family = "other"

    class Params(MethodParams):
        factor: float = 1.0
        noise: float = 0.0          # std of seeded Gaussian noise added to weights (seed-dependent results)
        delay: float = 0.0          # seconds to sleep, to interrupt a run in tests
        fail: bool = False
        nan: bool = False
        tags: List[str] = []        # a list-typed field: a list here is a value, not a sweep
        records: List[str] = []     # conv layer names to report 8-bit weights for (names the tracer may not know)

    def apply(self, model, data, params, ctx):
        if params.delay:
            time.sleep(params.delay)
        if params.fail:
            raise RuntimeError("this method was asked to fail")
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(params.factor)
                    if params.noise:
                        p.add_(torch.randn_like(p) * params.noise)
                    if params.nan:
                        p.fill_(float("nan"))
        layers = [LayerRecord(name=n, op="conv2d", weight_bits=8) for n in params.records]
        return QuantResult(model=model, quantization=not_quantized(), pipeline=["scale"], layers=layers,
                           stats={"tags": list(params.tags)})

    def card_sections(self, stats):
        tags = stats.get("tags") or []
        if not tags:
            return []
        return [{"kind": "table", "title": "Tags", "note": None, "columns": [("tag", "l")],
                 "rows": [[str(t)] for t in tags], "left_out": 0}]


class NotAMethod:
    pass
