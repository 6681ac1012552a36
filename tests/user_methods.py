"""A user's own method, plugged in as 'user_methods:ScaleWeights' without editing qcard."""
import time
from typing import List

import torch

from qcard.methods.base import Method, MethodParams, QuantResult
from qcard.methods.fp32 import fp32_quantization_block


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
        return QuantResult(model=model, quantization=fp32_quantization_block(), pipeline=["scale"],
                           stats={"tags": list(params.tags)})


class NotAMethod:
    pass
