"""The ptq method's run: build the simulated model, run the ordered steps, read the card block."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..methods.base import PointData, QuantResult, RunContext
from .adaround import adaround
from .bias_correction import analytic_bias_correction, empirical_bias_correction
from .calibrate import calibrate_activations, quant_state, set_weight_ranges, sim_info
from .cle import absorb_high_bias, equalize
from .graph import build_simulated
from .report import layer_records, quantization_block
from .sensitivity import greedy_bit_allocation, layer_sensitivity, output_noise
from .sim import SimConfig

__all__ = ["run_ptq", "sim_config_from", "run_steps", "calibration_batches"]


def sim_config_from(p) -> SimConfig:
    """Map the ptq Params onto the simulator's settings."""
    return SimConfig(
        w_bits=p.w_bits, a_bits=p.a_bits, w_granularity=p.w_granularity, w_axis=p.w_axis,
        w_group_size=p.w_group_size, w_symmetric=p.w_symmetric, w_signed=p.w_signed, w_rounding=p.rounding,
        a_symmetric=p.a_symmetric, a_signed=p.a_signed, a_granularity=p.a_granularity,
        scale_format=p.scale_format, bn=p.bn, first_layer=p.first_layer, last_layer=p.last_layer,
        residual_add=p.residual_add, concat=p.concat, avg_pool=p.avg_pool, quant_point=p.quant_point,
        dynamic_activations=p.dynamic_activations, input_bits=p.input_bits, weight_range=p.weight_range,
        activation_range=p.activation_range, logits_range=p.logits_range, percentile=p.percentile,
        bn_alpha=p.bn_alpha, overrides=[o.model_dump() for o in p.overrides], graph_mode=p.graph_mode)


def calibration_batches(data: PointData, batch_size: int) -> Tuple[List[torch.Tensor], List[torch.Tensor], int]:
    calib = data.calibration_set()
    xs, ys = [], []
    for item in data.loader(calib, batch_size=batch_size):
        if isinstance(item, (tuple, list)):
            xs.append(item[0])
            ys.append(item[1] if len(item) > 1 else None)
        else:
            xs.append(item)
            ys.append(None)
    n = sum(int(x.shape[0]) for x in xs)
    if n == 0:
        from ..errors import QcardError
        raise QcardError("the calibration set is empty: set dataset.calibration.size > 0")
    return xs, ys, n


def run_steps(sim: nn.Module, p, steps: List[str], xs: List[torch.Tensor], ctx: RunContext,
              stats: Dict[str, Any]) -> List[str]:
    """Run the ordered PTQ steps on a freshly built simulated model; returns the steps that ran."""
    ran = []
    dev = ctx.device
    for step in steps:
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
                lr=p.adaround_lr, device=dev, seed=ctx.seed, progress=ctx.progress)
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


def _build(model: nn.Module, cfg: SimConfig, xs: List[torch.Tensor], ctx: RunContext) -> nn.Module:
    example = xs[0][:1].to(ctx.device)
    return build_simulated(model, cfg, example, log=ctx.log)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _mixed_precision(model: nn.Module, p, cfg: SimConfig, xs: List[torch.Tensor], ctx: RunContext):
    """Greedy bit allocation to the budgets; returns (extra overrides, search record).

    Weights are chosen per conv/linear, activations per quantized tensor (named '<layer>.output'),
    so the accounting is exactly the one the card reports (each tensor stored once, at its bits)."""
    allowed = sorted(set(p.mp_allowed_bits))
    search_acts = cfg.a_bits is not None and not cfg.dynamic_activations and \
        (p.mp_activation_bits is not None or p.mp_max_activation_map_bits is not None)
    sub, n = [], 0
    for x in xs:                       # the noise table uses up to 128 calibration images
        sub.append(x)
        n += int(x.shape[0])
        if n >= 128:
            break
    noise: Dict[Tuple[str, str], Dict[int, float]] = {}
    numel: Dict[Tuple[str, str], int] = {}
    fixed_names: set = set()
    fixed: List[Dict[str, Any]] = []
    ref = None
    for b in allowed:
        cfg_b = dataclasses.replace(cfg, w_bits=b, a_bits=b if cfg.a_bits is not None else None)
        sim = _build(model, cfg_b, xs, ctx)
        set_weight_ranges(sim, p.weight_range, percentile=p.percentile)
        if cfg_b.a_bits is not None and not cfg.dynamic_activations:
            calibrate_activations(sim, sub, ctx.device)
        info = sim_info(sim)
        if ref is None:
            with quant_state(sim, weights=False, activations=False), torch.no_grad():
                ref = [sim(x.to(ctx.device)).detach().float() for x in sub]
        seen, fixed_q = set(), set()
        for li in info.gemm_layers():
            if id(li.module) in seen:
                continue
            seen.add(id(li.module))
            is_fixed = bool(li.fp32_reason or li.override or (li.position and (
                ("first" in li.position and cfg.first_layer != "same") or
                ("last" in li.position and cfg.last_layer != "same"))))
            if is_fixed:
                fixed_q.update(q.qname for q in li.input_quantizers if q is not None)
                if b == allowed[0]:
                    fixed_names.add(li.name)
                    wq = li.weight_quantizer
                    fixed.append({"side": "w", "numel": li.module.weight.numel(), "bits": wq.bits if wq else 32})
                continue
            if li.weight_quantizer is not None:
                noise.setdefault((li.name, "w"), {})[b] = output_noise(sim, sub, [li.weight_quantizer], ctx.device, ref)
                numel[(li.name, "w")] = li.module.weight.numel()
        if search_acts:
            for q in info.act_quantizers.values():
                n_el = int(getattr(q, "numel", 0) or 0)
                if q is info.input_quantizer or q.qname in fixed_q or q.qname in info.tensor_overrides:
                    if b == allowed[0] and n_el:
                        fixed.append({"side": "a", "numel": n_el, "bits": q.bits})
                        fixed_names.add(q.qname)
                    continue
                noise.setdefault((q.qname, "a"), {})[b] = output_noise(sim, sub, [q], ctx.device, ref)
                numel[(q.qname, "a")] = n_el
    cands = [{"layer": k[0], "side": k[1], "numel": numel[k], "noise": v} for k, v in noise.items()
             if len(v) == len(allowed) and numel[k] > 0]
    choice, acct = greedy_bit_allocation(
        cands, allowed, p.mp_weight_bits, p.mp_activation_bits if search_acts else None,
        p.mp_max_activation_map_bits if search_acts else None, fixed=fixed)
    overrides = []
    for (name, side), bits in sorted(choice.items()):
        overrides.append({"pattern": _escape(name), "w_bits": bits if side == "w" else None,
                          "a_bits": bits if side == "a" else None, "fp32": False, "source": "mixed_precision"})
    record = {"enabled": True, "granularity": "layer", "allowed_bits": allowed,
              "search": "greedy: lower the layer weights or activation tensor adding least output noise per bit saved",
              "budget": {"mean_weight_bits": p.mp_weight_bits, "mean_activation_bits": p.mp_activation_bits,
                         "max_activation_map_bits": p.mp_max_activation_map_bits},
              "searched_activations": search_acts, "fixed": sorted(fixed_names),
              "search_estimate": acct,
              "weight_bits": {k[0]: v for k, v in choice.items() if k[1] == "w"},
              "activation_bits": {k[0]: v for k, v in choice.items() if k[1] == "a"}}
    return overrides, record


def run_ptq(model: nn.Module, data: PointData, p, ctx: RunContext) -> QuantResult:
    model = model.to(ctx.device).eval()
    xs, ys, n_calib = calibration_batches(data, p.calibration_batch_size)
    cfg = sim_config_from(p)
    stats: Dict[str, Any] = {}
    mp_record = None
    if p.mixed_precision:
        extra, mp_record = _mixed_precision(model, p, cfg, xs, ctx)
        cfg = dataclasses.replace(cfg, overrides=list(cfg.overrides) + extra)
    sim = _build(model, cfg, xs, ctx)
    info = sim_info(sim)
    if mp_record is not None:
        info.mixed_precision = mp_record
    ran = run_steps(sim, p, list(p.steps), xs, ctx, stats)
    labels_used: Any = False
    if p.sensitivity != "none":
        labels = None
        if p.sensitivity == "accuracy":
            if p.labels == "real":
                if any(y is None for y in ys):
                    from ..errors import QcardError
                    raise QcardError("sensitivity: accuracy with labels: real needs a labelled calibration set; "
                                     "use labels: fp32_model or sensitivity: sqnr")
                labels = ys
            else:
                with torch.no_grad():
                    labels = [model(x.to(ctx.device)).argmax(-1).cpu() for x in xs]
            labels_used = p.labels
        stats["sensitivity"] = layer_sensitivity(sim, xs, p.sensitivity, labels, ctx.device, ctx.progress)
        ran.append("sensitivity")
    # the overrides that were applied, with the layers each one matched
    applied = []
    for o in cfg.overrides:
        matched = [li.name for li in info.layers if li.override == o["pattern"]]
        matched += [t for t, pat in info.tensor_overrides.items() if pat == o["pattern"]]
        entry = {k: o.get(k) for k in ("pattern", "w_bits", "a_bits", "fp32")}
        entry["matched"] = matched
        if o.get("source"):
            entry["source"] = o["source"]
        applied.append(entry)
        if not matched:
            msg = f"override pattern '{o['pattern']}' matched no layer"
            info.warnings.append(msg)
            ctx.log(f"qcard: {msg}")
    info.overrides_applied = [a for a in applied if a.get("source") != "mixed_precision"]
    for u in info.unquantized:
        ctx.log(f"qcard: {u['name']} ({u['op']}) left in FP32: {u['reason']}")
    block = quantization_block(sim, preset=p.preset)
    for prm in sim.parameters():     # PTQ is done: nothing trains this model, and frozen weights let
        prm.requires_grad_(False)    # evaluation take the cached fast path even without no_grad()
    stats.setdefault("graph_mode", info.graph_mode)
    if info.cle.get("applied"):
        stats["cle_pairs"] = info.cle.get("pairs")
    return QuantResult(
        model=sim, quantization=block, layers=layer_records(sim), stats=stats, pipeline=ran,
        calibration={"split": "train", "size": n_calib, "seed": data.calibration_seed, "labels_used": labels_used},
        warnings=list(info.warnings))
