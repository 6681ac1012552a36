"""The ptq method's run: build the simulated model, run the ordered steps, read the card block.

qat initializes its ranges with the same calibration batches and steps (calibration_batches, run_steps).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...errors import QcardError
from ...quant.adaround import adaround
from ...quant.bias_correction import analytic_bias_correction, empirical_bias_correction
from ...quant.calibrate import calibrate_activations, set_weight_ranges, sim_info
from ...quant.cle import absorb_high_bias, equalize
from ...quant.gptq import gptq
from ...quant.graph import build_simulated
from ...quant.reconstruct import Settings, reconstruct
from ...quant.report import layer_records, quantization_block
from ...quant.scheme import SimScheme
from ...quant.sensitivity import layer_sensitivity
from ...quant.sim import SimInfo
from ..base import PointData, QuantResult, RunContext
from .mixed_precision import search_bits
from .params import GPTQParams, PTQParams, ReconstructionParams

__all__ = ["run_ptq", "run_steps", "calibration_batches", "build", "reconstruction_settings"]


def calibration_batches(data: PointData, batch_size: int) -> Tuple[List[torch.Tensor], List[torch.Tensor], int]:
    xs, ys = [], []
    for item in data.loader(data.calibration_set(), batch_size=batch_size):
        if isinstance(item, (tuple, list)):
            xs.append(item[0])
            ys.append(item[1] if len(item) > 1 else None)
        else:
            xs.append(item)
            ys.append(None)
    n = sum(int(x.shape[0]) for x in xs)
    if n == 0:
        raise QcardError("the calibration set is empty: set dataset.calibration.size > 0")
    return xs, ys, n


def build(model: nn.Module, scheme: SimScheme, xs: List[torch.Tensor], ctx: RunContext) -> nn.Module:
    """The simulated model of `scheme`, traced on one calibration image."""
    return build_simulated(model, scheme, xs[0][:1].to(ctx.device), log=ctx.log)


def run_steps(sim: nn.Module, p: PTQParams, steps: List[str], xs: List[torch.Tensor], ctx: RunContext,
              stats: Dict[str, Any]) -> List[str]:
    """Run the ordered PTQ steps on a freshly built simulated model; returns the steps that ran."""
    ran = []
    dev = ctx.device
    for step in steps:
        # a reconstruction step keeps its own checkpoints (checkpoint-seed<S>-<step>.pt), a rerun goes on from
        # them; GPTQ (one pass over the layers, minutes) restarts
        resumable = ctx.checkpoint is not None and step in ("adaround", "brecq", "qdrop")
        ck = ctx.checkpoint.stage(step) if resumable else None
        if step == "cle":
            stats["cle"] = equalize(sim)
        elif step == "bias_absorption":
            stats["bias_absorption"] = absorb_high_bias(sim)
        elif step == "weight_ranges":
            set_weight_ranges(sim, p.weight_range, percentile=p.percentile)
        elif step == "adaround":
            stats["adaround"] = adaround(
                sim, xs, iters=p.adaround_iters, reg=p.adaround_reg, beta_start=p.adaround_beta_start,
                beta_end=p.adaround_beta_end, warm_start=p.adaround_warm_start, batch_size=p.adaround_batch_size,
                lr=p.adaround_lr, device=dev, seed=ctx.seed, progress=ctx.progress,
                targets=p.adaround_targets, checkpoint=ck)
        elif step in ("brecq", "qdrop"):
            stats[step] = reconstruct(sim, xs, reconstruction_settings(p, step), device=dev, seed=ctx.seed,
                                      progress=ctx.progress, checkpoint=ck)
        elif step == "gptq":
            g = p.gptq or GPTQParams()
            stats["gptq"] = gptq(sim, xs, damp=g.damp, block=g.block, act_order=g.act_order, device=dev)
        elif step == "bias_correction":
            if p.bias_correction == "analytic":
                stats["bias_correction"] = analytic_bias_correction(sim)
            else:
                stats["bias_correction"] = empirical_bias_correction(sim, xs, dev, ctx.progress)
        elif step == "activation_ranges":
            calibrate_activations(sim, xs, dev, ctx.progress)
        else:  # validated by Params; kept for custom callers
            raise ValueError(f"unknown ptq step '{step}'")
        ran.append(step)
    return ran


def reconstruction_settings(p: PTQParams, step: str) -> Settings:
    """The engine's settings for step brecq or qdrop (QDrop: each activation kept quantized with
    probability drop_prob; BRECQ: always quantized)."""
    r = p.reconstruction or ReconstructionParams()
    return Settings(unit=r.unit, max_block_layers=r.max_block_layers, iters=r.iters, reg=r.reg,
                    beta_start=r.beta_start, beta_end=r.beta_end, warm_start=r.warm_start, batch_size=r.batch_size,
                    lr=r.lr, scale_lr=r.scale_lr, input=r.input, quant_activations=p.a_bits is not None,
                    drop=step == "qdrop", drop_prob=r.drop_prob, label=step)


def _sensitivity_labels(model: nn.Module, p: PTQParams, xs, ys, ctx: RunContext) -> Optional[List[torch.Tensor]]:
    if p.sensitivity != "accuracy":
        return None
    if p.labels == "fp32_model":
        with torch.no_grad():
            return [model(x.to(ctx.device)).argmax(-1).cpu() for x in xs]
    if any(y is None for y in ys):
        raise QcardError("sensitivity: accuracy with labels: real needs a labelled calibration set; "
                         "use labels: fp32_model or sensitivity: sqnr")
    return ys


def _record_overrides(info: SimInfo, scheme: SimScheme, ctx: RunContext) -> None:
    """The overrides that were applied, with the layers each one matched (searched ones stay in the
    mixed-precision record); one that matched nothing is a warning."""
    applied = []
    for o in scheme.overrides:
        matched = [li.name for li in info.layers if li.override == o.pattern]
        matched += [t for t, pat in info.tensor_overrides.items() if pat == o.pattern]
        if not matched:
            msg = f"override pattern '{o.pattern}' matched no layer"
            info.warnings.append(msg)
            ctx.log(f"qcard: {msg}")
        if getattr(o, "source", None) is None:
            applied.append(dict(o.model_dump(include={"pattern", "w_bits", "a_bits", "fp32"}), matched=matched))
    info.overrides_applied = applied


def run_ptq(model: nn.Module, data: PointData, p: PTQParams, ctx: RunContext) -> QuantResult:
    model = model.to(ctx.device).eval()
    xs, ys, n_calib = calibration_batches(data, p.calibration_batch_size)
    scheme: PTQParams = p
    stats: Dict[str, Any] = {}
    mp_record = None
    if p.mixed_precision:
        extra, mp_record = search_bits(model, p, xs, lambda s: build(model, s, xs, ctx), ctx.device)
        scheme = p.model_copy(update={"overrides": list(p.overrides) + extra})
    sim = build(model, scheme, xs, ctx)
    info = sim_info(sim)
    if mp_record is not None:
        info.mixed_precision = mp_record
    ran = run_steps(sim, p, list(p.steps), xs, ctx, stats)
    labels_used: Any = False
    if p.sensitivity != "none":
        labels = _sensitivity_labels(model, p, xs, ys, ctx)
        labels_used = p.labels if p.sensitivity == "accuracy" else False
        stats["sensitivity"] = layer_sensitivity(sim, xs, p.sensitivity, labels, ctx.device, ctx.progress)
        ran.append("sensitivity")
    _record_overrides(info, scheme, ctx)
    for u in info.unquantized:
        ctx.log(f"qcard: {u['name']} ({u['op']}) left in FP32: {u['reason']}")
    block = quantization_block(sim, preset=p.preset)
    for prm in sim.parameters():     # PTQ is done: nothing trains this model, and frozen weights let
        prm.requires_grad_(False)    # evaluation take the cached fast path even without no_grad()
    stats.setdefault("graph_mode", info.graph_mode)
    stats["params_not_used"] = p.unused_params()      # the card lists them apart from the params that ran
    if info.cle.get("applied"):
        stats["cle_pairs"] = info.cle.get("pairs")
    return QuantResult(
        model=sim, quantization=block, layers=layer_records(sim), stats=stats, pipeline=ran,
        calibration={"split": "train", "size": n_calib, "seed": data.calibration_seed, "labels_used": labels_used},
        warnings=list(info.warnings))
