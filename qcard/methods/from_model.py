"""What a method's QuantResult leaves out, read from its simulated model (or said to be missing).

The per-layer records are the one interface between a method and the cost model. qcard's own methods
return them; a user's method may not (README: "A method of your own"). Without records the cost table
would count every layer as FP32 while the quantization block says "4 bits": a card that contradicts
itself. So, when a method returns no records:

  - a model built by qcard.quant (it carries `qcard_sim`): the records and the block's missing keys are
    read from it exactly as for PTQ (qcard.quant.report);
  - a model holding qcard quantizers (FakeQuantize) some other way, on a layer's `weight_quantizer` /
    `input_quantizer`, as a child module of the layer, or as a parametrization of its weight: one record
    per such layer with the bits of its quantizers;
  - no quantizers at all while the block claims bits: the card is flagged, its cost said not to be
    derived from the quantized model, never shown as a measurement.

A key the method's block leaves out is listed in `quantization.not_reported` (when nothing was read
for it), and the card renders it as "not reported" instead of the schema's default.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..records import LayerRecord

__all__ = ["complete_from_model", "NOT_DERIVED", "REPORTABLE"]

# keys of the quantization block whose schema default would read as a fact ("first layer FP32",
# "bias correction none", ...) when a method's block leaves them out
REPORTABLE = ("first_layer", "last_layer", "batch_norm", "residual_add", "concat", "avg_pool",
              "bias_bits", "accumulator_bits", "cross_layer_equalization", "bias_correction",
              "mixed_precision", "overrides", "graph_mode")

NOT_DERIVED = ("cost not derived from the quantized model: the method returned no per-layer records and its "
               "model holds no qcard quantizers, so the cost table counts every layer as FP32 although the "
               "method reports {claim}; return QuantResult(layers=[LayerRecord(...)]) per quantized layer "
               "(README: \"A method of your own\")")


def _claims_bits(block: Dict[str, Any]) -> Optional[str]:
    w = (block.get("weights") or {}).get("bits")
    a = (block.get("activations") or {}).get("bits")
    if w is None and a is None:
        return None
    return " / ".join(f"{side} {b:g} bits" for side, b in (("weights", w), ("activations", a)) if b is not None)


def _fq_bits(q) -> Optional[int]:
    from ..quant.quantizer import FakeQuantize
    return q.bits if isinstance(q, FakeQuantize) and q.enabled else None


def _layer_quantizers(module) -> Tuple[Optional[int], Optional[int]]:
    """(weight bits, input bits) of one layer's own quantizers, wherever a method put them."""
    from ..quant.quantizer import FakeQuantize
    w = _fq_bits(getattr(module, "weight_quantizer", None))
    a = _fq_bits(getattr(module, "input_quantizer", None))
    if w is None:
        plist = getattr(getattr(module, "parametrizations", None), "weight", None)
        for p in plist or []:
            w = w if w is not None else _fq_bits(p)
    if w is None:   # a quantizer registered as a child of the layer (not one of its named slots)
        named = {"input_quantizer", "weight_quantizer", "parametrizations"}
        kids = [m for n, m in module.named_children() if n not in named and isinstance(m, FakeQuantize)]
        if len(kids) == 1:
            w = _fq_bits(kids[0])
    return w, a


def _found_records(model) -> List[LayerRecord]:
    """One record per conv/linear holding a quantizer, named by its module path (the tracer's names)."""
    import torch
    from torch import nn
    out = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)   # a Parameter, or a tensor computed by a parametrization
        if not name or not torch.is_tensor(weight) or weight.dim() < 2:
            continue
        w, a = _layer_quantizers(m)
        if w is None and a is None:
            continue
        op = "linear" if isinstance(m, nn.Linear) else f"conv{weight.dim() - 2}d"
        out.append(LayerRecord(name=name, op=op, weight_bits=w, activation_bits=a, quantized=True,
                               extra={"read_from": "the method's FakeQuantize modules"}))
    return out


def complete_from_model(result):
    """The QuantResult with its per-layer records read from its model when the method gave none, the
    block's left-out keys listed (or filled from a qcard-built model), and a warning where the cost
    cannot be derived. Returns the same object, changed in place."""
    block = result.quantization
    missing = [k for k in REPORTABLE if k not in block]
    if result.layers or result.model is None:
        if missing and _claims_bits(block):
            block["not_reported"] = missing
        return result
    from ..quant.sim import SimInfo
    built_by_qcard = isinstance(getattr(result.model, "qcard_sim", None), SimInfo)
    if built_by_qcard:
        from ..quant.report import layer_records, quantization_block
        result.layers = layer_records(result.model)
        measured = quantization_block(result.model)
        for k in missing:
            block[k] = measured.get(k)
        for side in ("weights", "activations"):
            claimed, read = (block.get(side) or {}).get("bits"), measured[side].get("bits")
            if claimed != read:
                result.warnings.append(f"the method's quantization block says {side} {claimed} bits; its "
                                       f"simulated model's quantizers are {read} bits (the cost uses these)")
        block["layer_records"] = "read from the simulated model (the method returned none)"
        return result
    found = _found_records(result.model)
    claim = _claims_bits(block)
    if found:
        result.layers = found
        block["layer_records"] = "read from the method's quantizers (the method returned none)"
        if missing and claim:
            block["not_reported"] = missing
    elif claim:
        result.warnings.append(NOT_DERIVED.format(claim=claim))
        block["layer_records"] = "missing"
        if missing:
            block["not_reported"] = missing
    return result
