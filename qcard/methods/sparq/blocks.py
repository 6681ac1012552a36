"""The card's blocks for a SPARQ run: method_stats.sparq and the quantization block, in the card's
vocabulary (qcard/cards/schema.py)."""
from __future__ import annotations

from typing import Dict, Optional

from .kernels import WINDOW_SETS
from .params import PLAIN_BITS, WINDOW_VARIANTS, SparqParams


def act_words(p: SparqParams) -> str:
    if p.variant == "sparq":
        return f"SPARQ (vSPARQ pairs + bSPARQ {p.bits}-bit windows, {p.options}opt, {p.rounding}) of 8-bit codes"
    if p.variant == "bsparq":
        return f"bSPARQ {p.bits}-bit windows ({p.options}opt, {p.rounding}) of 8-bit codes"
    if p.variant == "vsparq":
        return f"vSPARQ only (zero partner: exact 8 bits; else window 7:4, {p.rounding}) of 8-bit codes"
    if p.variant in ("a2", "a3", "a4"):
        n = PLAIN_BITS[p.variant]
        return f"plain {n}-bit unsigned per tensor (grid {1 << (8 - n)}*dx)"
    return "plain 8-bit unsigned per tensor (the base model)"


def layer_summary(per_layer: Dict[str, dict], names) -> Dict[str, Optional[float]]:
    tot = sum(per_layer[n]["values"] for n in names)
    if not tot:
        return {"zero_fraction": None, "zero_partner_fraction": None, "mean_bits": None, "mse": None}

    def wmean(key, weight="values"):
        num = den = 0.0
        for n in names:
            v = per_layer[n].get(key)
            if v is not None:
                num += v * per_layer[n][weight]
                den += per_layer[n][weight]
        return num / den if den else None
    return {"zero_fraction": wmean("zero_fraction"), "zero_partner_fraction": wmean("zero_partner_fraction", "pairs"),
            "mean_bits": wmean("mean_bits"), "mse": wmean("mse")}


def stats_block(p, per_layer, roles, excluded, comparison, n_cal, n_stats, folded, edge) -> dict:
    sparq_names = [n for n in per_layer if n not in edge and not any(e["name"] == n for e in excluded)]
    summary = layer_summary(per_layer, sparq_names)
    layers = {}
    for n, st in per_layer.items():
        st = dict(st)
        st["bits_distribution"] = {f"{b:g}": f for b, f in st["bits_distribution"].items()}
        st["role"] = roles[n]
        layers[n] = st
    own = comparison.get("this_run") or {}
    return {
        "variant": p.variant, "base": p.base,
        "bits": p.bits if p.variant in WINDOW_VARIANTS else PLAIN_BITS[p.variant],
        "options": p.options, "rounding": p.rounding if p.variant in WINDOW_VARIANTS else None,
        "window_tops": list(WINDOW_SETS[(p.bits, p.options)]) if p.variant in ("sparq", "bsparq") else
                       ([7] if p.variant == "vsparq" else None),
        # value-weighted over the SPARQ layers (first/last and excluded layers not included)
        "zero_fraction": summary["zero_fraction"],
        "zero_partner_fraction": summary["zero_partner_fraction"],
        "mean_effective_bits": summary["mean_bits"],
        "mse_codes": summary["mse"],
        "pe_mode": own.get("pe_mode"),
        "speedup_vs_a8w8": own.get("speedup_vs_a8w8"),     # this run on its PE (cost_comparison.this_run)
        "stats_source": f"calibration set (training split), first {n_stats} images, eval mode, after "
                        f"calibration{' and BN recalibration' if p.base == 'paper' and p.bn_recalibration else ''}",
        "stats_images": n_stats,
        "calibration_images": n_cal,
        "calibration_note": ("the paper calibrates on about 2,048 training images (17 batches of 128); "
                             "this run used the config's dataset.calibration.size"),
        "excluded_layers": excluded,
        "folded_batch_norms": [{"layer": g, "batch_norm": b} for g, b in folded],
        "layers": layers,
        "cost_comparison": comparison,
        "notes": [
            "mse_codes: mean squared difference from the 8-bit codes, in code units (times dx^2 = mse_real)",
            "bits_distribution: fraction of values by bits used (0 = zero code; 8 = partner budget at n=4)",
            "pairs are adjacent input channels (2c, 2c+1); for depthwise convs and Linear layers "
            "the same channel/feature pairing is used (a choice)",
        ],
    }


def quantization_block(p, traced, first, last, edge, roles, unquantized, overrides, per_layer,
                        has_bn, had_bn) -> dict:
    ops = {r.op for r in traced}
    has_add = "add" in ops
    fp32_ops = [o for o in ("add", "concat", "avgpool", "maxpool", "mul") if o in ops]
    if p.base == "paper" and has_bn:
        fp32_ops.insert(0, "batch_norm")
    act_bits = p.bits if p.variant in WINDOW_VARIANTS else PLAIN_BITS[p.variant]
    edge_bits = None if p.first_last == "fp32" else 8
    unfriendly = []
    if p.first_last == "fp32":
        unfriendly.append("first/last layers FP32")
    if has_add:
        unfriendly.append("residual adds unquantized (FP32)")
    if "concat" in ops:
        unfriendly.append("concat unquantized (FP32)")
    if p.base == "paper" and has_bn:
        unfriendly.append("batch norm kept in FP32 (not folded)")
    unfriendly.append("float scales (not power of two)")
    if any(r == "s8" for n, r in roles.items() if n not in edge):
        unfriendly.append("some layers at plain signed 8-bit (SPARQ excluded)")
    return {
        "preset": None, "graph_mode": "eager",
        "weights": {"bits": 8, "granularity": "per_channel", "group_size": None, "symmetric": True,
                    "signed": True, "scale_format": "float",
                    "range_setting": "max_abs_255" if p.base == "paper" else "max_abs_127",
                    "rounding": "nearest"},
        "activations": {"bits": act_bits, "granularity": "per_tensor", "symmetric": False, "signed": False,
                        "range_setting": p.activation_range if p.activation_range != "percentile"
                        else f"percentile_{p.percentile:g}",
                        "dynamic": False, "quant_point": "after_activation",
                        "storage_bits": 8,
                        "note": (f"{act_words(p)}; inputs of each quantized conv/linear (after the "
                                 f"ReLU that feeds them); 8-bit codes in memory"
                                 if p.variant in WINDOW_VARIANTS else act_words(p))},
        "first_layer": {"weight_bits": edge_bits, "activation_bits": edge_bits, "name": first},
        "last_layer": {"weight_bits": edge_bits, "activation_bits": edge_bits, "name": last},
        "batch_norm": "none" if not had_bn else ("kept" if has_bn else "folded"),
        "residual_add": "gemm_inputs_only" if has_add else "not_present",
        "concat": None if "concat" in ops else "not_present",
        "avg_pool": None if "avgpool" in ops else "not_present",
        "fp32_ops": fp32_ops,
        "bias_bits": None, "accumulator_bits": None,
        "accumulator": "float32 sums of integer products, rescaled by dx*dw[c]; float bias",
        "cross_layer_equalization": {"applied": False, "bias_absorption": False},
        "bias_correction": "none",
        "mixed_precision": {"enabled": False},
        "dynamic_precision": ({"kind": "sparq", "mean_effective_activation_bits":
                               layer_summary(per_layer, [n for n, r in roles.items()
                                                         if r in WINDOW_VARIANTS])["mean_bits"]}
                              if p.variant in WINDOW_VARIANTS else None),
        "overrides": overrides,
        "unquantized_layers": unquantized,
        "hardware_unfriendly": unfriendly,
    }
