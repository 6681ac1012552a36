"""The qat method's run: build with the PTQ engine, initialize ranges, make quantizers learnable, train, convert."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ...quant.calibrate import sim_info
from ...quant.lsq import clamp_learned, freeze, make_lsq, make_pact
from ...quant.quantizer import FakeQuantize
from ...quant.report import layer_records, quantization_block
from ...training import reinitialize, train
from ..base import PointData, QuantResult, RunContext
from ..ptq.pipeline import build, calibration_batches, run_steps
from .bn_fold import fold_kept_bn
from .params import QATParams

__all__ = ["run_qat", "make_learnable", "quantizers_of"]

_CARD_BN = {"static_fold": "qat_static_fold", "keep_then_fold": "qat_keep_then_fold", "kept": "kept"}


def _summary(values) -> Dict[str, Any]:
    v = values.detach().float().reshape(-1)
    if v.numel() == 1:
        return {"value": round(float(v), 8)}
    return {"n": int(v.numel()), "min": round(float(v.min()), 8), "mean": round(float(v.mean()), 8),
            "max": round(float(v.max()), 8)}


def _grid_table(quantizers) -> Dict[str, Dict[str, Any]]:
    out = {}
    for q in quantizers:
        lo, hi = q.range()
        out[q.qname] = {"bits": q.bits, "scale": _summary(q.scale), "zero_point": _summary(q.zero_point.round()),
                        "range_min": _summary(lo), "range_max": _summary(hi)}
    return out


def _is_network_input(q, sim=None) -> bool:
    """The quantizer of the network input: the one the FX graph builder put on the input placeholder;
    for eager-mode models (no such record), the one named 'input' or 'input.<argument>'."""
    if sim is not None:
        recorded = getattr(sim_info(sim), "input_quantizer", None)
        if recorded is not None:
            return q is recorded
    return q.qname == "input" or q.qname.startswith("input.")


def quantizers_of(sim) -> Tuple[List[FakeQuantize], List[FakeQuantize]]:
    """(weight quantizers, activation quantizers), each once, in graph order."""
    info = sim_info(sim)
    seen, wqs, aqs = set(), [], []
    for q in info.weight_quantizers():
        if id(q) not in seen:
            seen.add(id(q))
            wqs.append(q)
    for q in info.act_quantizers.values():
        if id(q) not in seen:
            seen.add(id(q))
            aqs.append(q)
    return wqs, aqs


class _LearnedHook:
    """Keeps learned scales, zero points and clips valid after every optimizer step."""

    def __init__(self, quantizers):
        self.quantizers = quantizers

    def after_step(self, state) -> None:
        for q in self.quantizers:
            clamp_learned(q)


def _warm_caches(sim, example) -> None:
    """One no-grad forward pass, outside inference mode, so the simulated layers' weight caches are
    ordinary tensors (the evaluator runs under torch.inference_mode, whose tensors have no version
    counter for the cache keys in quant/modules.py to read)."""
    was_training = sim.training
    sim.eval()
    with torch.inference_mode(False), torch.no_grad():
        sim(example)
    sim.train(was_training)


def _warm_then(ctx: RunContext, data: PointData, sim, example):
    def evaluate(model, dataset=None):
        if model is sim:
            _warm_caches(sim, example)
        if ctx.evaluate is not None:
            return ctx.evaluate(model, dataset if dataset is not None else data.eval)
        from ...evaluate import evaluate as _eval
        return _eval(model, dataset if dataset is not None else data.eval, batch_size=data.batch_size,
                     device=ctx.device)
    return evaluate


def make_learnable(p: QATParams, wqs, aqs, sim=None):
    """Turn the calibrated quantizers the estimator learns into LSQ / PACT quantizers, in place.
    Returns (learned quantizers, the PACT ones, pipeline step, warning or None)."""
    def wanted(q) -> bool:
        return q.enabled and not q.dynamic and (p.learn_input_grid or not _is_network_input(q, sim))

    if p.estimator == "lsq":
        learned = [make_lsq(q, grad_scale=p.lsq_grad_scale, is_weight=True) for q in wqs if q.enabled]
        learned += [make_lsq(q, grad_scale=p.lsq_grad_scale, is_weight=False) for q in aqs if wanted(q)]
        return learned, [], "lsq_quantizers", None
    if not p.pact:
        return [], [], None, None
    pact_qs = [q for q in aqs if wanted(q) and make_pact(q) is not None]
    skipped = [q.qname for q in aqs if wanted(q) and not any(q is k for k in pact_qs)]
    msg = None
    if skipped:
        msg = (f"pact: {len(skipped)} activation quantizer(s) keep fixed ranges (their grid reaches below 0 "
               f"or is not per-tensor): {', '.join(skipped[:5])}" + (" ..." if len(skipped) > 5 else ""))
    return pact_qs, pact_qs, "pact_clips", msg


def _start(model: nn.Module, p: QATParams, ctx: RunContext, pipeline: List[str], warnings: List[str]):
    """The model to fine-tune (re-initialized with `train.from_scratch`) and the recipe to train it with."""
    model = model.to(ctx.device)
    recipe = p.train
    if recipe.from_scratch:
        # re-initialize before ranges are set, so they fit the weights that are trained
        left = reinitialize(model, ctx.seed)
        if left:
            warnings.append(f"from_scratch: {len(left)} parameter(s) have no reset_parameters() and keep their values")
        recipe = recipe.model_copy(update={"from_scratch": False})
        pipeline.append("reinitialize")
    else:
        pipeline.append("start_from_given_weights")
    return model.eval(), recipe


def _param_groups(sim: nn.Module, learned) -> List[Dict[str, Any]]:
    """Weights, and the learned grid parameters without weight decay (decay would shrink the ranges)."""
    qparams = [t for q in learned for t in q.parameters() if t.requires_grad]
    ids = {id(t) for t in qparams}
    groups = [{"params": [t for t in sim.parameters() if t.requires_grad and id(t) not in ids]}]
    if qparams:
        groups.append({"params": qparams, "weight_decay": 0.0})
    return groups


def _convert(sim: nn.Module, p: QATParams, learned, quantizers, example, pipeline: List[str]) -> List[str]:
    """Freeze the learned grids, fold kept batch norms where asked; returns the layers folded."""
    sim.eval()
    for q in learned:
        freeze(q)
    folded = []
    if p.bn == "keep_then_fold":
        folded = fold_kept_bn(sim)
        pipeline.append("fold_bn_into_scales")
    for q in quantizers:          # fresh grids: drop caches that keyed on the training-time objects
        q.drop_caches()
    pipeline.append("convert")
    _warm_caches(sim, example)
    return folded


def _label(p: QATParams, wqs, aqs, learned) -> None:
    """What ran, in the card's vocabulary: range setting and rounding of the learned quantizers."""
    for q in wqs:
        if q.enabled and p.estimator == "lsq":
            q.range_setting = f"lsq (init {q.range_setting})"
            q.rounding_label = "learned"
    for q in aqs:
        if q.enabled and any(q is l for l in learned):
            q.range_setting = f"{'lsq' if p.estimator == 'lsq' else 'pact'} (init {q.range_setting})"


def _qat_stats(p: QATParams, sim, wqs, aqs, learned, pact_qs, folded, init_grids, n_calib, data) -> Dict[str, Any]:
    ptq = p.ptq_params()
    final_grids = {"weights": _grid_table(wqs), "activations": _grid_table(aqs)}
    return {
        "estimator": p.estimator, "lsq_grad_scale": p.lsq_grad_scale if p.estimator == "lsq" else None,
        "pact": bool(pact_qs), "bn": p.bn, "bn_folded_after_training": folded,
        "init_range": {"weights": ptq.weight_range, "activations": ptq.activation_range if p.a_bits else None},
        "init_calibration": {"split": "train", "size": n_calib, "seed": data.calibration_seed},
        "learned_quantizers": len(learned),
        "input_grid": ("learned" if p.learn_input_grid else "fixed at its initial range")
        if any(_is_network_input(q, sim) and q.enabled for q in aqs) else None,
        "init": init_grids, "final": final_grids,
        "scale_change": _scale_change(init_grids, final_grids),
    }


def run_qat(model, data: PointData, p: QATParams, ctx: RunContext) -> QuantResult:
    ptq = p.ptq_params()
    pipeline: List[str] = []
    warnings: List[str] = []
    model, recipe = _start(model, p, ctx, pipeline, warnings)
    xs, _, n_calib = calibration_batches(data, ptq.calibration_batch_size)
    # keep_then_fold and kept train with batch norm in the graph; the card says what is deployed
    sim = build(model, ptq.model_copy(update={"bn": "folded" if p.bn == "static_fold" else "kept"}), xs, ctx)
    info = sim_info(sim)
    init_stats: Dict[str, Any] = {}
    ran = run_steps(sim, ptq, list(ptq.steps), xs, ctx, init_stats)
    pipeline += [f"init_{s}" if s.endswith("_ranges") else s for s in ran]
    wqs, aqs = quantizers_of(sim)
    init_grids = {"weights": _grid_table(wqs), "activations": _grid_table(aqs)}

    learned, pact_qs, step, msg = make_learnable(p, wqs, aqs, sim)
    if step:
        pipeline.append(step)
    if msg:
        warnings.append(msg)
        ctx.log(f"qcard: {msg}")
    pipeline.append(f"train_{p.estimator}" + ("_pact" if pact_qs else ""))
    example = xs[0][:1].to(ctx.device)
    train_ctx = dataclasses.replace(ctx, evaluate=_warm_then(ctx, data, sim, example))
    log = train(sim, data, recipe, train_ctx, hooks=[_LearnedHook(learned)], params=_param_groups(sim, learned))
    warnings += list(log.warnings)
    folded = _convert(sim, p, learned, wqs + aqs, example, pipeline)

    _label(p, wqs, aqs, learned)
    block = quantization_block(sim, preset=p.preset)
    if info.batch_norm != "none":
        block["batch_norm"] = _CARD_BN[p.bn]
    qat_stats = _qat_stats(p, sim, wqs, aqs, learned, pact_qs, folded, init_grids, n_calib, data)
    stats: Dict[str, Any] = {"training": log.to_stats(), "qat": qat_stats, "graph_mode": info.graph_mode}
    for k in ("cle", "bias_absorption", "bias_correction"):
        if k in init_stats:
            stats.setdefault("init_steps", {})[k] = init_stats[k]
    for u in info.unquantized:
        ctx.log(f"qcard: {u['name']} ({u['op']}) left in FP32: {u['reason']}")
    return QuantResult(
        model=sim, quantization=block, layers=layer_records(sim), stats=stats, pipeline=pipeline,
        # trained on the whole training split; its ranges were initialised from stats["init_calibration"]
        calibration={"split": "train", "size": len(data.train), "seed": ctx.seed, "labels_used": True,
                     "used_for": "training", "range_init": qat_stats["init_calibration"]},
        warnings=warnings + list(info.warnings))


def _scale_change(init: Dict[str, Any], final: Dict[str, Any]) -> Dict[str, Any]:
    """Mean ratio final/initial scale per side (1.0: ranges unchanged by training)."""
    out = {}
    for side in ("weights", "activations"):
        ratios = []
        for name, row in init[side].items():
            a, b = row["scale"], final[side].get(name, {}).get("scale", {})
            va = a.get("value", a.get("mean"))
            vb = b.get("value", b.get("mean"))
            if va and vb:
                ratios.append(vb / va)
        out[side] = {"mean_ratio": round(sum(ratios) / len(ratios), 6) if ratios else None, "n": len(ratios)}
    return out
