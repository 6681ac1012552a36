"""Read the card's `quantization` block and the per-layer records from a simulated model.

Everything here is read from the quantizer modules and the SimInfo the builder recorded, not from
the settings that were asked for: a setting that could not be honoured shows up as what was done.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..records import LayerRecord
from .calibrate import sim_info
from .quantizer import FakeQuantize
from .sim import LayerInfo, SimInfo

__all__ = ["quantization_block", "layer_records", "bit_accounting", "layer_accounting", "reconcile_with_layers"]

_BITS_HW = {2, 4, 8, 16}


def _mode(values: Iterable[Any]) -> Any:
    c = Counter(v for v in values if v is not None)
    return c.most_common(1)[0][0] if c else None


def _qbits(q: Optional[FakeQuantize]) -> Optional[int]:
    return q.bits if q is not None and q.enabled else None


def _in_bits(li: LayerInfo) -> Optional[int]:
    bits = [_qbits(q) for q in li.input_quantizers]
    bits = [b for b in bits if b is not None]
    return max(bits) if bits else None


def _w_bits(li: LayerInfo) -> Optional[int]:
    return _qbits(li.weight_quantizer)


def bit_accounting(model) -> Dict[str, Any]:
    """Element-weighted mean weight bits, mean activation bits and the largest activation map in bits
    (Garg et al.: mean bits and peak feature-map memory are two different costs)."""
    info = sim_info(model)
    wsum = wn = 0
    seen = set()
    for li in info.gemm_layers():
        if li.module is None or id(li.module) in seen:
            continue
        seen.add(id(li.module))
        n = li.module.weight.numel()
        b = _w_bits(li)
        wsum += n * (b if b is not None else 32)
        wn += n
    asum = an = 0
    peak = 0
    for q in _unique_quantizers(info.act_quantizers.values()):
        n = int(getattr(q, "numel", 0) or 0)
        if not n or not q.enabled:
            continue
        asum += n * q.bits
        an += n
        peak = max(peak, n * q.bits)
    return {"mean_weight_bits": round(wsum / wn, 4) if wn else None,
            "mean_activation_bits": round(asum / an, 4) if an else None,
            "max_activation_map_bits": int(peak) if peak else None}


def _unique_quantizers(qs: Iterable[FakeQuantize]) -> List[FakeQuantize]:
    seen, out = set(), []
    for q in qs:
        if id(q) not in seen:
            seen.add(id(q))
            out.append(q)
    return out


def _range_label(values: List[Optional[str]]) -> Optional[str]:
    c = Counter(v for v in values if v)
    if not c:
        return None
    if len(c) == 1:
        return next(iter(c))
    main, _ = c.most_common(1)[0]
    rest = ", ".join(f"{k} on {n}" for k, n in sorted(c.items()) if k != main)
    return f"{main} ({rest})"


def quantization_block(model, preset: Optional[str] = None) -> Dict[str, Any]:
    """The card's `quantization` block (cards/schema.py: Quantization), read from the simulated model."""
    info: SimInfo = sim_info(model)
    cfg = info.config
    gemms = info.gemm_layers()
    wqs = _unique_quantizers(li.weight_quantizer for li in gemms if li.weight_quantizer is not None)
    aqs = _unique_quantizers(q for q in info.act_quantizers.values())
    # one value per field (the card's schema wants enums and booleans): the most common one; where
    # the model mixes values, a "<field>_detail" key says how
    weights = {
        "bits": _mode(q.bits for q in wqs),
        "granularity": _mode(q.spec.granularity for q in wqs),
        "group_size": _mode(q.spec.group_size for q in wqs),
        "symmetric": _mode(q.spec.symmetric for q in wqs),
        "signed": _mode(q.spec.signed for q in wqs),
        "scale_format": _mode(q.spec.scale_format for q in wqs),
        "range_setting": _range_label([q.range_setting for q in wqs]),
        "rounding": _mode(q.rounding_label for q in wqs),
    }
    activations = {
        "bits": _mode(q.bits for q in aqs),
        "granularity": _mode(q.spec.granularity for q in aqs),
        "symmetric": _mode(q.spec.symmetric for q in aqs),
        "signed": _mode(q.spec.signed for q in aqs),
        "range_setting": _range_label([q.range_setting for q in aqs if not q.dynamic]) if aqs else None,
        "dynamic": bool(aqs) and all(q.dynamic for q in aqs),
        "quant_point": (cfg.quant_point if info.graph_mode == "fx" else "after_activation") if aqs else None,
    }
    if len({q.spec.signed for q in aqs}) > 1:
        n_uns = sum(1 for q in aqs if not q.spec.signed)
        activations["signed_detail"] = f"unsigned on {n_uns} of {len(aqs)} tensors (those with no negative values)"
    for side, qs in (("weights", wqs), ("activations", aqs)):
        bits = sorted({q.bits for q in qs})
        if len(bits) > 1:
            (weights if side == "weights" else activations)["bits_detail"] = f"mixed: {bits}"
    first = next((li for li in gemms if li.position and "first" in li.position), None)
    last = next((li for li in gemms if li.position and "last" in li.position), None)

    def side(li: Optional[LayerInfo]) -> Dict[str, Any]:
        if li is None:
            return {"weight_bits": None, "activation_bits": None}
        return {"weight_bits": _w_bits(li), "activation_bits": _in_bits(li), "name": li.name}

    acc = bit_accounting(model)
    w_bits_used = sorted({b for b in (_w_bits(li) for li in gemms) if b is not None})
    a_bits_used = sorted({q.bits for q in aqs if q.enabled})
    mp = dict(info.mixed_precision)
    mp.setdefault("enabled", False)
    mp.setdefault("granularity", "layer" if mp["enabled"] else None)
    mp.setdefault("allowed_bits", sorted(set(w_bits_used) | set(a_bits_used)) or None)
    mp.update(acc)
    block = {
        "preset": preset,
        "graph_mode": info.graph_mode,
        "weights": weights,
        "activations": activations,
        "first_layer": side(first),
        "last_layer": side(last),
        "batch_norm": info.batch_norm,
        "residual_add": info.residual_add,
        # eager mode: the concat itself runs in FP32 (listed in unquantized_layers); its output is
        # quantized where a conv/linear reads it
        "concat": (cfg.concat if info.graph_mode == "fx" else "requantized") if info.has_concat else "not_present",
        "avg_pool": cfg.avg_pool if info.has_avgpool else "not_present",
        "bias_bits": 32 if wqs else None,
        "accumulator_bits": 32 if wqs or aqs else None,
        "cross_layer_equalization": {"applied": bool(info.cle.get("applied")),
                                     "bias_absorption": bool(info.cle.get("bias_absorption"))},
        "bias_correction": info.bias_correction,
        "mixed_precision": mp,
        "overrides": list(info.overrides_applied),
        "unquantized_layers": list(info.unquantized),
        "hardware_unfriendly": hardware_unfriendly(info, wqs, aqs, first, last, preset, w_bits_used, a_bits_used),
    }
    if info.graph_mode_reason:
        block["graph_mode_reason"] = info.graph_mode_reason
    return block


def hardware_unfriendly(info: SimInfo, wqs, aqs, first, last, preset, w_bits_used, a_bits_used) -> List[str]:
    flags: List[str] = []
    if any(not q.spec.symmetric for q in aqs):
        flags.append("asymmetric activations (zero-point correction terms in every integer layer)")
    if any(q.spec.granularity == "per_channel" for q in aqs):
        flags.append("per-channel activations (no integer kernel can factor the scales out of the accumulator)")
    if any(q.dynamic for q in aqs):
        flags.append("dynamic activation ranges (ranges computed at run time)")
    if any(q.spec.granularity == "per_group" for q in wqs):
        flags.append("per-group weight scales (rescaling inside the accumulation)")
    if wqs and first is not None and first.weight_quantizer is None:
        flags.append("FP32 first layer")
    if wqs and last is not None and last.weight_quantizer is None:
        flags.append("FP32 last layer")
    if info.has_add and info.residual_add in ("gemm_inputs_only", "relu_only"):
        flags.append(f"unquantized residual adds ({info.residual_add})")
    if info.batch_norm == "kept" and wqs:
        flags.append("batch norm kept (not folded into the integer weights)")
    if preset:
        from .presets import load_preset
        want = load_preset(preset)["settings"].get("scale_format", {}).get("value")
        if want == "power_of_two" and any(q.spec.scale_format == "float" for q in list(wqs) + list(aqs)):
            flags.append(f"float scales where {preset} wants power-of-two")
    odd = sorted({b for b in list(w_bits_used) + list(a_bits_used) if b not in _BITS_HW})
    if odd:
        flags.append(f"bit widths outside {{2, 4, 8, 16}}: {odd}")
    if any(q.spec.rounding == "stochastic" for q in wqs):
        flags.append("stochastic rounding of weights (results vary from run to run unless seeded)")
    others = [u for u in info.unquantized if u.get("op") not in ("batchnorm",)]
    fp32_gemms = [u for u in others if u.get("op", "").startswith(("conv", "linear"))
                  and "first_layer" not in u["reason"] and "last_layer" not in u["reason"]]
    if fp32_gemms:
        flags.append(f"{len(fp32_gemms)} conv/linear layer(s) left in FP32")
    return flags


def layer_records(model) -> List[LayerRecord]:
    """One LayerRecord per conv/linear/matmul and per data-moving op, bits filled in, named so the
    runner can merge them with the cost tracer's shape records (module paths; "<scope>.add")."""
    info: SimInfo = sim_info(model)
    out: List[LayerRecord] = []
    for li in info.layers:
        wq = li.weight_quantizer
        ins = [q for q in li.input_quantizers if q is not None and q.enabled]
        oq = li.output_quantizer if li.output_quantizer is not None and li.output_quantizer.enabled else None
        w_bits = _w_bits(li)
        a_bits = _in_bits(li)
        operands = [_qbits(q) for q in li.input_quantizers]
        if li.kind != "gemm" and None in operands:
            a_bits = None               # an operand read in FP32: the op is not an integer op
        if li.kind == "matmul" and len(operands) == 2 and len(set(operands)) == 2:
            # two activations on different grids: the cost model multiplies activation_bits (the wider,
            # FP32 = None) by weight_bits (the narrower) for this op's BOPs (qcard.cost.model)
            w_bits = min(FP32 if b is None else b for b in operands)
        sparsity = 0.0
        if li.module is not None:
            w = li.module.quantized_weight().detach()
            sparsity = float((w == 0).float().mean())
        quantized = (w_bits is not None or a_bits is not None) if li.kind == "gemm" else bool(ins or oq)
        reason = None
        if not quantized:
            reason = li.fp32_reason or _op_reason(info, li)
        extra: Dict[str, Any] = {"kind": li.kind}
        if li.fused_act:
            extra["fused_activation"] = li.fused_act
        if li.bn:
            extra["batch_norm"] = li.bn
        if li.position:
            extra["position"] = li.position
        if li.override:
            extra["override"] = li.override
        if li.kind == "matmul":
            extra["operand_bits"] = [FP32 if b is None else b for b in operands]
        if li.note:
            extra["note"] = li.note
        if wq is not None:
            extra.update(weight_signed=wq.spec.signed, scale_format=wq.spec.scale_format,
                         weight_range=wq.range_setting, rounding=wq.rounding_label,
                         group_size=wq.spec.group_size)
        if ins:
            extra["activation_range"] = ins[0].range_setting
            extra["activation_signed"] = ins[0].spec.signed
            extra["input_quantizers"] = [q.qname for q in ins]
        out.append(LayerRecord(
            name=li.name, op=li.op,
            weight_bits=w_bits, activation_bits=a_bits, output_bits=oq.bits if oq is not None else None,
            weight_granularity=wq.spec.granularity if wq is not None else None,
            weight_symmetric=wq.spec.symmetric if wq is not None else None,
            activation_granularity=ins[0].spec.granularity if ins else None,
            activation_symmetric=ins[0].spec.symmetric if ins else None,
            weight_sparsity=sparsity, quantized=quantized, reason=reason, extra=extra))
    names = {r.name for r in out}
    for u in info.unquantized:
        if u["name"] not in names:
            out.append(LayerRecord(name=u["name"], op=u["op"], quantized=False, reason=u["reason"]))
            names.add(u["name"])
    return out


def _op_reason(info: SimInfo, li: LayerInfo) -> str:
    if info.config.a_bits is None:
        return "weight-only quantization: activations stay FP32"
    if info.residual_add != "quant_all" and li.kind in ("add", "mul", "concat", "avgpool", "nonlinear"):
        return f"residual_add: {info.residual_add} leaves this op's inputs in FP32"
    return "inputs and output stay FP32 in this configuration"


# ---------------------------------------------------------------------------- the card's per-layer records

FP32 = 32
# flags quantization_block derives from the simulated model's own layer list; reconcile_with_layers
# recomputes them from the card's per-layer records (every traced layer, not only those the sim saw)
_EDGE_FLAGS = re.compile(r"^(FP32 first layer|FP32 last layer|\d+ conv/linear layer\(s\) left in FP32)$")


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 0


def _weight_numel(r: LayerRecord) -> int:
    """Weights of a record, a shared weight counted at its first use only (the tracer's params)."""
    return min(_numel(r.weight_shape), r.params) if r.weight_shape else 0


def _activation_numel(r: LayerRecord) -> int:
    shapes = [r.input_shape] if (r.weight_shape or not (r.extra or {}).get("input_shapes")) \
        else list(r.extra["input_shapes"])
    return sum(_numel(s) for s in shapes if s)


def _b(bits: Optional[float]) -> float:
    return FP32 if bits is None else float(bits)


def _deliberate(r: LayerRecord) -> bool:
    """FP32 by the configuration (first_last / an override), which the card states elsewhere."""
    return bool(r.reason) and ("_layer: fp32" in r.reason or r.reason.startswith("override"))


def layer_accounting(records: Sequence[LayerRecord]) -> Dict[str, Any]:
    """The headline figures, from the card's per-layer records (the cost table: every traced layer,
    the method's bits merged in; bits None = FP32, counted as 32):
    mean W bits weighted by weight count over every layer with weights; mean A bits weighted by
    input elements over every layer with MACs; the first and last layers with weights; the layers
    with weights or MACs left in FP32."""
    weighted = [r for r in records if _weight_numel(r) > 0]
    macs = [r for r in records if r.macs > 0]
    wn = sum(_weight_numel(r) for r in weighted)
    an = sum(_activation_numel(r) for r in macs)
    edge = lambda r: ({"weight_bits": r.weight_bits, "activation_bits": r.activation_bits, "name": r.name}
                      if r is not None else {"weight_bits": None, "activation_bits": None})
    return {
        "mean_weight_bits": round(sum(_weight_numel(r) * _b(r.weight_bits) for r in weighted) / wn, 4) if wn else None,
        "mean_activation_bits": round(sum(_activation_numel(r) * _b(r.activation_bits) for r in macs) / an, 4)
        if an else None,
        "first_layer": edge(weighted[0] if weighted else None),
        "last_layer": edge(weighted[-1] if weighted else None),
        "fp32_weighted": [r for r in weighted if r.weight_bits is None],
        # attention matmuls with an FP32 operand while other layers' inputs are quantized (not weight-only)
        "fp32_matmuls": [r for r in macs if not r.weight_shape and r.activation_bits is None]
        if any(r.activation_bits is not None for r in macs) else [],
        "weights_total": wn, "macs_total": sum(r.macs for r in macs),
    }


def reconcile_with_layers(block: Dict[str, Any], records: Sequence[LayerRecord]) -> Tuple[Dict[str, Any], List[str]]:
    """(the quantization block with its headline figures read from the card's per-layer records,
    warnings for the banner). The simulated model only knows the layers it wrapped: a layer it left
    alone (nn.MultiheadAttention, a functional classifier) is FP32 in the table and must be so in the
    headline. Mean bits, first/last layer and the FP32 flags all come from layer_accounting."""
    acc = layer_accounting(records)
    if not any(r.weight_bits is not None or r.activation_bits is not None for r in records):
        return block, []            # nothing quantized: an FP32 card keeps its block
    out = dict(block)
    mp = dict(out.get("mixed_precision") or {})
    mp.update(mean_weight_bits=acc["mean_weight_bits"], mean_activation_bits=acc["mean_activation_bits"])
    out["mixed_precision"] = mp
    out["first_layer"], out["last_layer"] = acc["first_layer"], acc["last_layer"]
    flags = [f for f in out.get("hardware_unfriendly") or [] if not _EDGE_FLAGS.match(f)]
    fp32 = acc["fp32_weighted"]
    first, last = acc["first_layer"].get("name"), acc["last_layer"].get("name")
    if acc["first_layer"]["weight_bits"] is None and first is not None:
        flags.append("FP32 first layer")
    if acc["last_layer"]["weight_bits"] is None and last is not None:
        flags.append("FP32 last layer")
    inner = [r for r in fp32 if r.name not in (first, last)]
    if inner:
        flags.append(f"{len(inner)} conv/linear layer(s) left in FP32")
    out["hardware_unfriendly"] = flags
    return out, _fp32_warnings(acc)


def _grouped(names: List[str], listed: int = 4) -> str:
    """Layer names summarised by their parent module (12 attention blocks, not 48 projections)."""
    parents = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))
    more = f" and {len(parents) - listed} more" if len(parents) > listed else ""
    return f"{len(parents)} module(s): {', '.join(parents[:listed])}{more}"


def _fp32_warnings(acc: Dict[str, Any]) -> List[str]:
    out = []
    surprise = [r for r in acc["fp32_weighted"] if not _deliberate(r)]
    if surprise:
        w = sum(_weight_numel(r) for r in surprise) / acc["weights_total"] * 100
        m = sum(r.macs for r in surprise) / acc["macs_total"] * 100 if acc["macs_total"] else 0.0
        out.append(f"{len(surprise)} layer(s) with weights left in FP32 that the method did not quantize "
                   f"({w:.1f} % of the weights, {m:.1f} % of the MACs; counted as 32 bits in the mean bits), "
                   f"in {_grouped([r.name for r in surprise])}")
    if acc["fp32_matmuls"]:
        mm = acc["fp32_matmuls"]
        m = sum(r.macs for r in mm) / acc["macs_total"] * 100 if acc["macs_total"] else 0.0
        out.append(f"{len(mm)} matmul(s) of two activations (attention) with an operand in FP32 ({m:.1f} % of the "
                   "MACs), "
                   f"in {_grouped([r.name for r in mm])}")
    return out
