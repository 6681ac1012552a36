"""The work a ptq point implies before it runs (qcard.methods.work's vocabulary): the calibration passes
of its ordered steps and the iterations of its rounding steps."""
from __future__ import annotations

from typing import Any, Dict

from ..work import count_units, empty_work, passes
from .params import GPTQParams, PTQParams, ReconstructionParams


def planned_work(p: PTQParams, facts: Dict[str, Any]) -> Dict[str, Any]:
    work = empty_work()
    cal, layers = facts["calibration_size"], facts.get("layers")
    per_layer = layers if layers is not None else 1
    if layers is None:
        work["notes"].append("per-layer passes counted once: the model's layers were not counted")
    # the calibration images are read once and kept in memory; the steps below run the model over them
    work["passes"] += passes("read calibration images", cal, 1, model="none")
    if p.mixed_precision:
        # output noise of each weight and activation tensor at each width, on up to 128 images
        work["passes"] += passes("mixed-precision search (per tensor and width)", min(cal, 128),
                                 2 * per_layer * len(p.mp_allowed_bits))
    for step in p.steps:
        if step == "activation_ranges":
            work["passes"] += passes("activation ranges", cal)
        elif step == "bias_correction" and p.bias_correction == "empirical":
            work["passes"] += passes("empirical bias correction (node by node)", cal)
        elif step == "gptq":
            g = p.gptq or GPTQParams()
            work["passes"] += passes(f"gptq input capture (block {g.block})", cal, per_layer)
        elif step == "adaround":
            work["reconstruction"].append({"step": "adaround", "unit": "layer", "iters": p.adaround_iters,
                                           "batch": p.adaround_batch_size, "units": count_units("layer", facts)})
        elif step in ("brecq", "qdrop"):
            r = p.reconstruction or ReconstructionParams()
            work["reconstruction"].append({"step": step, "unit": r.unit, "iters": r.iters, "batch": r.batch_size,
                                           "units": count_units(r.unit, facts)})
    if p.sensitivity != "none":
        work["passes"] += passes(f"{p.sensitivity} sensitivity (one per layer, and the reference)", cal,
                                 per_layer + 1)
    return work
