"""The card's blocks for a MARViN run, read from a finished MarvinController: method_stats.marvin,
the per-layer records and the quantization block, in the card's vocabulary (qcard/cards/schema.py)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from ...records import LayerRecord
from ..base import QuantResult
from .rules import marvin_cost, training_speedup
from .state import LayerState

_UNQUANTIZED_OPS = ("matmul", "attention", "layernorm", "softmax", "concat")


def stats_block(ctl, log) -> Dict[str, Any]:
    """method_stats.marvin of a finished run."""
    p = ctl.p
    owners = list(ctl.owners.values())
    steps = max(1, log.steps)
    final = {st.name: {"wl": st.wl, "fl": st.fl, "sparsity": round(st.sparsity, 6),
                       "lookback": st.lookback, "resolution": st.resolution, "decisions": st.decisions}
             for st in owners}
    cost = marvin_cost([{"macs": st.macs, "params": st.params, "wl": st.wl, "sparsity": st.sparsity}
                        for st in owners])
    train_su = training_speedup(ctl.sum_q, ctl.sum_f)
    iso = None
    if p.target_accuracy is not None and train_su is not None:
        hit = next((r for r in log.curve if r.get("eval_acc") is not None and r["eval_acc"] >= p.target_accuracy),
                   None)
        if hit is not None:
            iso = train_su / (hit["step"] / steps)
    have_macs = all(st.macs > 0 for st in owners)
    stats_marvin = {
        "trajectories": {st.name: st.trajectory for st in owners},
        "switches": ctl.switches,
        "switch_count": len(ctl.switches),
        "intra_epoch_switches": sum(1 for s in ctl.switches if s["intra_epoch"]),
        "final": final,
        "attached_layers": dict(ctl.attached_to),
        "training_speedup": _r(train_su) if have_macs else None,
        "inference_speedup": _r(cost["inference_speedup"]) if have_macs else None,
        "model_size_ratio": _r(cost["model_size_ratio"]),
        "iso_accuracy_speedup": _r(iso),
        "size_ratio_weighting": "params",
        "macs_counting": "standard MACs (one per multiply-add, batch 1) of conv/linear layers; the reference "
                         "counts every conv twice, uses 2·MACs and also charges BN/pooling",
        "switching_overhead": "not charged",
        "time_weighted_wl": {st.name: {str(b): round(c / steps, 6) for b, c in sorted(st.steps_at_wl.items())}
                             for st in owners},
        "bits_distribution_note": "per-layer records carry the FINAL word length (inference cost); the "
                                  "time-weighted word-length distribution over training steps is in "
                                  "time_weighted_wl and is not used for the card's cost",
        "strategy_steps": dict(ctl.strategy_steps),
        "kl_mode": p.kl_mode,
        "eval_rounding": p.eval_rounding,
    }
    return stats_marvin


def records(ctl, stats_marvin: Dict[str, Any]) -> List[LayerRecord]:
    """Per-layer records for the cost model: the FINAL word lengths."""
    owners = list(ctl.owners.values())
    layers: List[LayerRecord] = []
    for st in owners:
        extra = dict(st.trace_extra)
        extra.update({"fixed_point": [st.wl, st.fl], "marvin_time_weighted_wl": stats_marvin["time_weighted_wl"][st.name]})
        layers.append(LayerRecord(
            name=st.name, op=st.op, macs=st.macs, params=st.params, weight_bits=st.wl, activation_bits=st.wl,
            output_bits=st.wl, weight_granularity="per_tensor", weight_symmetric=True,
            activation_granularity="per_tensor", activation_symmetric=True,
            weight_sparsity=round(st.sparsity, 6), extra=extra))
        for a in st.attached:
            rec = ctl.trace.get(a)
            if rec is not None and rec.op == "avgpool":
                layers.append(LayerRecord(name=a, op="avgpool", activation_bits=st.wl, output_bits=st.wl,
                                          activation_granularity="per_tensor", activation_symmetric=True,
                                          extra=dict(rec.extra)))
    return layers


def build_result(ctl, log) -> QuantResult:
    """The QuantResult of a finished run (ctl: the MarvinController)."""
    p = ctl.p
    stats_marvin = stats_block(ctl, log)
    owners = list(ctl.owners.values())
    return QuantResult(
        model=ctl.model,
        quantization=quantization_block(ctl, owners),
        layers=records(ctl, stats_marvin),
        stats={"marvin": stats_marvin, "training": log.to_stats()},
        pipeline=["reinitialize" if p.train.from_scratch else "start_from_given_weights",
                  "convert_fixed_point(<%d,%d>)" % (p.initial_wl, p.initial_fl),
                  "train_adaptive_precision", "freeze_fixed_point_weights"],
        calibration={"split": "train", "size": len(ctl.data.train), "seed": ctl.ctx.seed, "labels_used": True,
                     "used_for": "training"},
        warnings=ctl.warnings + list(log.warnings),
    )


def quantization_block(ctl, owners: List[LayerState]) -> Dict[str, Any]:
    from torch import nn
    welems = {st.name: st.module.weight.numel() for st in owners}
    mean_w = sum(st.wl * welems[st.name] for st in owners) / sum(welems.values())
    aw = sum(st.act_elems for st in owners)
    mean_a = (sum(st.wl * st.act_elems for st in owners) / aw) if aw else mean_w
    first, last = owners[0], owners[-1]
    ops = {r.op for r in ctl.trace.values()}
    adds = any(r.op == "add" for r in ctl.trace.values())
    unq = [{"name": r.name, "op": r.op, "reason": "MARViN quantizes conv, linear, batch norm and average "
                                                   "pooling only; this op runs in float32"}
           for r in ctl.trace.values() if r.op in _UNQUANTIZED_OPS]
    unq += [{"name": n, "op": type(ctl.model.get_submodule(n)).__name__.lower(),
             "reason": "not executed in the forward pass"} for n in ctl.not_executed]
    unfriendly = ["per-layer arbitrary word lengths (needs bit-serial or bit-scalable hardware)",
                  "word lengths change during training (precision switching in the training loop)",
                  "stochastic rounding of weights, activations and gradients in training (needs a random source)"]
    if ctl.p.eval_rounding == "stochastic":
        unfriendly.append("stochastic rounding of activations at inference")
    if adds:
        unfriendly.append("residual adds not requantized (inputs on different fixed-point grids)")
    if unq:
        unfriendly.append("some ops left in float32 (see unquantized_layers)")
    mean_w, mean_a = round(mean_w, 4), round(mean_a, 4)
    return {
        "preset": None, "graph_mode": "eager",
        "weights": {"bits": mean_w, "granularity": "per_tensor", "group_size": None, "symmetric": True,
                    "signed": True, "scale_format": "power_of_two", "range_setting": "fixed_point",
                    "rounding": "stochastic", "format": "fixed point <wl, fl> per layer, no scale factor"},
        "activations": {"bits": mean_a, "granularity": "per_tensor", "symmetric": True, "signed": True,
                        "range_setting": "fixed_point", "dynamic": False, "quant_point": "before_activation",
                        "rounding_training": "stochastic", "rounding_inference": ctl.p.eval_rounding,
                        "where": "input and output of every conv, linear, batch norm and average pooling"},
        "first_layer": {"name": first.name, "weight_bits": first.wl, "activation_bits": first.wl},
        "last_layer": {"name": last.name, "weight_bits": last.wl, "activation_bits": last.wl},
        "batch_norm": "kept" if any(isinstance(ctl.model.get_submodule(a), nn.modules.batchnorm._BatchNorm)
                                    for st in owners for a in st.attached) else "none",
        "residual_add": "gemm_inputs_only" if adds else "not_present",
        "concat": None if "concat" in ops else "not_present",
        "avg_pool": "requantized" if "avgpool" in ops else "not_present",
        "bias_bits": None, "accumulator_bits": None,
        "bias_format": "the layer's <wl, fl>",
        "cross_layer_equalization": {"applied": False, "bias_absorption": False},
        "bias_correction": "none",
        "mixed_precision": {"enabled": True, "granularity": "layer", "allowed_bits": "1..%d" % ctl.p.wl_cap,
                            "mean_weight_bits": mean_w, "mean_activation_bits": mean_a,
                            "max_activation_map_bits": None,
                            "weighting": "weights: weight elements; activations: input elements of each "
                                         "conv/linear (batch 1)"},
        "overrides": [],
        "unquantized_layers": unq,
        "hardware_unfriendly": unfriendly,
    }


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)