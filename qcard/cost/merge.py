"""Merge a method's per-layer records into the traced shape records (pure Python).

The traced records (qcard.cost.trace_layers) carry shapes, MACs and parameters; a method's records
carry bits, granularity and the like, under the same layer names (qcard.ops.naming). A method record
whose name matches no traced op is not added (it has no shapes, so it would count as nothing, or
twice): it is reported, so the card can say which layers it could not place.
"""
from __future__ import annotations

from typing import Iterable, List

from ..records import LayerRecord

__all__ = ["merge_layer_records", "QUANT_FIELDS"]

# the fields a method's record sets on the traced record of the same name
QUANT_FIELDS = ("weight_bits", "activation_bits", "output_bits", "weight_granularity", "weight_symmetric",
                "activation_granularity", "activation_symmetric", "weight_sparsity",
                "activation_bits_distribution", "weight_bits_distribution", "quantized", "reason")


def merge_layer_records(traced: List[LayerRecord], method_layers: Iterable[LayerRecord]) -> List[str]:
    """Copy each method record's quantization fields onto the traced record of the same name, in
    place; `extra` is merged (the method's keys win). Returns one warning per method record whose name
    matches no traced op."""
    by_name = {r.name: r for r in traced}
    unmatched: List[LayerRecord] = []
    for layer in method_layers or []:
        target = by_name.get(layer.name)
        if target is None:
            unmatched.append(layer)
            continue
        for f in QUANT_FIELDS:
            setattr(target, f, getattr(layer, f))
        target.extra = {**target.extra, **layer.extra}
    return [f"layer '{r.name}' ({r.op}) of the method's records matches no traced op: "
            f"left out of the cost estimate" for r in unmatched]
