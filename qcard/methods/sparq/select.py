"""Which layers SPARQ quantizes: the candidates (window rule), the first/last layer (edge) and the
layers left FP32, each with its reason, read from the traced ops in execution order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from torch import nn

from .params import SparqError, SparqParams


@dataclass
class Selection:
    first: str
    last: str
    candidates: List[str] = field(default_factory=list)      # conv/linear layers under the variant's rule
    edge: List[str] = field(default_factory=list)            # first/last layer at plain 8-bit
    unquantized: List[Dict[str, Any]] = field(default_factory=list)


def _edge_or_fp32(sel: Selection, r, m, p: SparqParams) -> bool:
    """The first/last layer: FP32 (paper) or plain 8-bit. True when the layer is settled here."""
    why = ("first layer: its input (the normalized image) is signed" if r.name == sel.first
           else "last layer (the classifier)")
    if p.first_last == "fp32":
        sel.unquantized.append({"name": r.name, "op": r.op, "reason": f"{why}; kept FP32 as in the paper"})
        return True
    if type(m) in (nn.Conv2d, nn.Linear):
        sel.edge.append(r.name)
        return True
    return False


def select_layers(model: nn.Module, traced, p: SparqParams) -> Selection:
    modules = dict(model.named_modules())
    gemms = [r for r in traced if r.op in ("conv2d", "linear") and r.name in modules]
    if not gemms:
        raise SparqError("sparq: the model has no Conv2d or Linear layer to quantize")
    sel = Selection(first=gemms[0].name, last=gemms[-1].name)
    for r in gemms:
        m = modules[r.name]
        if r.name in sel.candidates or r.name in sel.edge:
            continue
        if r.name in (sel.first, sel.last) and _edge_or_fp32(sel, r, m, p):
            continue
        if type(m) not in (nn.Conv2d, nn.Linear):
            sel.unquantized.append({"name": r.name, "op": r.op,
                                    "reason": f"{type(m).__name__} is not a plain nn.Conv2d/nn.Linear "
                                              f"(its forward is its own); left FP32"})
        elif r.op == "linear" and p.hidden_linear == "fp32":
            sel.unquantized.append({"name": r.name, "op": r.op, "reason": "hidden Linear layer kept FP32 "
                                    "(hidden_linear: fp32; the paper quantizes convs only)"})
        else:
            sel.candidates.append(r.name)
    seen = {u["name"] for u in sel.unquantized} | set(sel.candidates) | set(sel.edge)
    for r in traced:
        base_name, _, suffix = r.name.rpartition("_")
        if suffix.isdigit() and base_name in seen:   # a second call of a layer already handled
            continue
        if r.macs > 0 and r.name not in seen:
            sel.unquantized.append({"name": r.name, "op": r.op,
                                    "reason": "not a Conv2d/Linear layer: SPARQ quantizes conv and linear inputs only"})
            seen.add(r.name)
    return sel
