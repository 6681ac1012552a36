"""Merge a method's per-layer records into the traced shape records (pure Python, no torch).

The traced records (qcard.cost.trace_layers) carry shapes, MACs and parameters; a method's records
carry bits, granularity and the like, under the same layer names (qcard.ops.naming). A method record
whose name matches no traced record is never added (it has no shapes, so it would cost nothing, or
count a layer twice). When its op is one the tracer records (a conv, linear, matmul, add, ...), the
names disagree, and that is reported. Other ops (a batch norm left unfolded, a GELU, an op with no
integer simulation) are not cost layers; the quantization block lists them already.
"""
from __future__ import annotations

from typing import Iterable, List

from ..ops.opnames import COST_OPS
from ..records import LayerRecord

__all__ = ["merge_layer_records", "QUANT_FIELDS"]

# the fields a method's record sets on the traced record of the same name
QUANT_FIELDS = ("weight_bits", "activation_bits", "output_bits", "weight_granularity", "weight_symmetric",
                "activation_granularity", "activation_symmetric", "weight_sparsity",
                "activation_bits_distribution", "weight_bits_distribution", "quantized", "reason")
_LISTED = 8     # names quoted in the warning


def merge_layer_records(traced: List[LayerRecord], method_layers: Iterable[LayerRecord]) -> List[str]:
    """Copy each method record's quantization fields onto the traced record of the same name, in
    place; `extra` is merged (the method's keys win). Nothing is appended. Returns warnings: one
    naming the method records of traced op kinds that match no traced record (empty if none)."""
    by_name = {r.name: r for r in traced}
    strangers: List[LayerRecord] = []
    for layer in method_layers or []:
        target = by_name.get(layer.name)
        if target is None:
            if layer.op in COST_OPS:
                strangers.append(layer)
            continue
        for f in QUANT_FIELDS:
            setattr(target, f, getattr(layer, f))
        target.extra = {**target.extra, **layer.extra}
    if not strangers:
        return []
    names = ", ".join(f"{r.name} ({r.op})" for r in strangers[:_LISTED])
    more = f" and {len(strangers) - _LISTED} more" if len(strangers) > _LISTED else ""
    return [f"{len(strangers)} layer record(s) of the method match no traced layer and are left out of the "
            f"cost estimate: {names}{more}"]
