"""Quantization-aware training: the white paper's standard QAT pipeline, every tradeoff a switch.

    methods: [{name: qat, params: {w_bits: 4, a_bits: 4, estimator: lsq, train: {epochs: 2, optimizer: adam, lr: 1.0e-4}}}]

Pipeline (Nagel et al. 2021, §5.3; specs/ptq-qat.md), in order:
  1. optional cross-layer equalization (+ high-bias absorption) on the folded model (`cle: true`);
  2. quantizers placed by the PTQ engine, with batch norm handled per `bn`:
       static_fold     BN folded into the weights before training (per-tensor weights);
       keep_then_fold  BN kept (training in batch-statistics mode) and, after training, its scale γ/σ folded
                       into the per-channel weight scales (exact: the integer weights do not change);
       kept            BN kept and never folded (what a preset without folding runs);
       auto            the white paper's rule: static_fold for per-tensor, keep_then_fold for per-channel
                       weights (kept where the preset does not fold);
  3. ranges initialized by the PTQ engine: `init_range: auto` is MSE, min-max for per-channel weights;
     optional bias correction;
  4. training (qcard.training.train, labels of the training split) with
       estimator: lsq  learnable scale and zero point (LSQ, straight-through gradients,
                       optional gradient scale 1/√(N·q_max): `lsq_grad_scale`; the network input's grid
                       stays at its initial range unless `learn_input_grid: true`), or
       estimator: ste  ranges fixed at their initial values, straight-through gradients to the weights;
                       `pact: true` learns the clip of non-negative activations (PACT);
  5. convert: learned grids frozen (z rounded), BN folded where asked; the card is read from the result.
Fine-tuning starts from the given (bundled or user) weights; `train.from_scratch: true` re-initializes
the model before ranges are set.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..training import TrainRecipe
from .base import Method, MethodParams, PointData, QuantResult, RunContext
from .ptq import Override

__all__ = ["QAT", "QATParams", "QAT_RECIPE"]

# a short fine-tuning recipe (white paper: Adam, no weight decay on ranges; fewer epochs here)
QAT_RECIPE = dict(epochs=2, batch_size=64, optimizer="adam", lr=1e-4, momentum=0.9, weight_decay=0.0,
                  schedule="cosine")

# the PTQ Params fields QAT shares, under the same names (the scheme and the network-level choices)
_SHARED = ("preset", "w_bits", "a_bits", "input_bits", "w_granularity", "w_group_size", "w_symmetric", "w_signed",
           "a_symmetric", "a_signed", "a_granularity", "scale_format", "first_layer", "last_layer",
           "residual_add", "concat", "avg_pool", "quant_point", "graph_mode", "overrides", "percentile",
           "calibration_batch_size")
# settings a preset may fix, copied back so the card's params show what ran
_PRESET_FIELDS = ("w_granularity", "w_symmetric", "w_signed", "a_symmetric", "a_signed", "a_granularity",
                  "scale_format")


class QATParams(MethodParams):
    # scheme (the ptq method's switches, same names and meanings)
    preset: Optional[Literal["academic", "tensorrt", "snpe", "fbgemm", "tvm", "acl"]] = None
    w_bits: int = Field(8, ge=2, le=16)
    a_bits: Optional[int] = Field(8, ge=2, le=16)
    input_bits: Optional[int] = Field(8, ge=2, le=16)
    w_granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    w_group_size: Optional[int] = Field(None, ge=1)
    w_symmetric: bool = True
    w_signed: bool = True
    a_symmetric: bool = False
    a_signed: Optional[bool] = None
    a_granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    scale_format: Literal["float", "power_of_two"] = "float"
    first_layer: Literal["same", "8bit", "fp32"] = "same"
    last_layer: Literal["same", "8bit", "fp32"] = "same"
    residual_add: Literal["quant_all", "gemm_inputs_only", "relu_only"] = "quant_all"
    concat: Literal["requantized", "shared_grid"] = "requantized"
    avg_pool: Literal["requantized", "shared_grid"] = "requantized"
    quant_point: Literal["after_activation", "before_activation"] = "after_activation"
    graph_mode: Literal["auto", "fx", "eager"] = "auto"
    overrides: List[Override] = Field(default_factory=list)
    # QAT
    estimator: Literal["lsq", "ste"] = "lsq"
    lsq_grad_scale: bool = False
    # off by default: the input's range is fixed by the data's normalization, and learning it makes the
    # first layer compute a gradient for the whole input batch (on ResNet-18 ~20 % of a training step)
    learn_input_grid: bool = False
    pact: bool = False
    bn: Literal["auto", "static_fold", "keep_then_fold", "kept"] = "auto"
    init_range: Literal["auto", "mse", "minmax"] = "auto"
    percentile: float = Field(99.99, gt=50, le=100)
    cle: bool = False
    bias_absorption: bool = True
    bias_correction: Literal["none", "empirical", "analytic"] = "none"
    calibration_batch_size: int = Field(32, ge=1)
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(**QAT_RECIPE))

    _ptq: Any = PrivateAttr(default=None)

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_qat_recipe(cls, value):
        # a partial train: block changes only what it names; the rest stays QAT's recipe, not the
        # generic training defaults (train: {lr: 1e-3} keeps Adam, 2 epochs, no weight decay)
        if isinstance(value, dict):
            return {**QAT_RECIPE, **value}
        return value

    @model_validator(mode="after")
    def _resolve(self) -> "QATParams":
        from .ptq import PTQParams
        explicit = set(self.model_fields_set)
        errors: List[str] = []
        if self.pact and self.estimator == "lsq":
            errors.append("pact: true learns activation clips with estimator: ste; estimator: lsq already learns "
                          "every scale (use one or the other)")
        if self.pact and self.a_bits is None:
            errors.append("pact: true needs quantized activations (a_bits)")
        if self.estimator == "lsq" and self.scale_format == "power_of_two":
            errors.append("estimator: lsq learns float scales; scale_format: power_of_two needs estimator: ste")
        # the scheme is validated (and a preset resolved) by the ptq method's own Params
        kw: Dict[str, Any] = {k: getattr(self, k) for k in _SHARED if k in explicit}
        if "overrides" in kw:
            kw["overrides"] = [o.model_dump() for o in self.overrides]
        kw["w_bits"], kw["a_bits"] = self.w_bits, self.a_bits
        if self.bn in ("static_fold", "keep_then_fold"):
            kw["bn"] = "folded"              # what the deployed model has; BN kept during training is internal
        elif self.bn == "kept":
            kw["bn"] = "kept"
        init = self.init_range
        steps = (["cle"] + (["bias_absorption"] if self.bias_absorption else []) if self.cle else []) + \
            ["weight_ranges"] + (["bias_correction"] if self.bias_correction != "none" else []) + \
            (["activation_ranges"] if self.a_bits is not None else [])
        kw.update(pipeline="custom", steps=steps, weight_range=None if init == "auto" else init,
                  activation_range="minmax" if init == "minmax" else "mse", logits_range="same",
                  bias_correction="analytic" if self.bias_correction == "analytic" else "empirical")
        if self.a_bits is None:
            kw["weight_only"] = True
            kw.pop("a_bits")
        ptq = None
        if not errors:
            try:
                ptq = PTQParams(**kw)
            except ValueError as exc:
                errors.append(_strip_validation(exc))
        if ptq is not None:
            for k in _PRESET_FIELDS:
                object.__setattr__(self, k, getattr(ptq, k))
            if init == "auto" and ptq.weight_range is not None:
                # white paper: MSE ranges, min-max for per-channel weights
                ptq_w = "minmax" if ptq.w_granularity == "per_channel" else "mse"
                object.__setattr__(ptq, "weight_range", ptq_w)
            # batch norm: auto follows the white paper (and a preset that does not fold)
            bn = self.bn
            if bn == "auto":
                if ptq.bn == "kept":
                    bn = "kept"
                else:
                    bn = "keep_then_fold" if ptq.w_granularity == "per_channel" else "static_fold"
                object.__setattr__(self, "bn", bn)
            if bn == "keep_then_fold" and ptq.w_granularity != "per_channel":
                errors.append(f"bn: keep_then_fold folds the batch norm scale into per-channel weight scales; "
                              f"w_granularity is {ptq.w_granularity}: use bn: static_fold (or auto)")
            if self.cle and bn != "static_fold":
                errors.append(f"cle needs the batch norms folded before training (bn: static_fold), not bn: {bn}")
            if self.estimator == "lsq" and ptq.scale_format == "power_of_two":
                errors.append(f"preset '{self.preset}' wants power-of-two scales, which LSQ does not learn; "
                              "use estimator: ste")
            self._ptq = ptq
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def ptq_params(self):
        """The ptq Params this QAT run initializes its ranges with (resolved)."""
        if self._ptq is None:          # e.g. after model_copy: re-validate
            self._ptq = type(self).model_validate(self.model_dump())._ptq
        return self._ptq


def _strip_validation(exc: Exception) -> str:
    errs = getattr(exc, "errors", None)
    if callable(errs):
        msgs = []
        for e in errs():
            m = str(e.get("msg", ""))
            msgs.append(m[len("Value error, "):] if m.startswith("Value error, ") else m)
        return "; ".join(msgs)
    return str(exc)


class QAT(Method):
    name = "qat"
    family = "qat"
    Params = QATParams

    def apply(self, model, data: PointData, params: QATParams, ctx: RunContext) -> QuantResult:
        return run_qat(model, data, params, ctx)


# ----------------------------------------------------------------------------------------------- run

def _summary(values) -> Dict[str, Any]:
    import torch
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
        from ..quant.calibrate import sim_info
        recorded = getattr(sim_info(sim), "input_quantizer", None)
        if recorded is not None:
            return q is recorded
    return q.qname == "input" or q.qname.startswith("input.")


def _quantizers(sim):
    """(weight quantizers, activation quantizers), each once, in graph order."""
    from ..quant.calibrate import sim_info
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


def fold_kept_bn(sim) -> List[str]:
    """After training with BN kept: fold each kept batch norm into its conv/linear, its scale γ/σ going
    into the per-channel weight scales (s' = s·|γ/σ|; z mirrored where γ/σ < 0), the BN replaced by
    an identity. Returns the layers folded."""
    import torch
    from torch import nn
    from ..quant.bn import fold_bn
    from ..quant.calibrate import sim_info
    info = sim_info(sim)
    folded = []
    for li in info.gemm_layers():
        m = li.module
        meta = getattr(m, "qcard_bn", None)
        if not meta or meta.get("state") != "kept" or m.__dict__.get("_qat_folded"):
            continue
        bn = sim.get_submodule(meta["path"])
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        with torch.no_grad():
            factor = (bn.weight.detach().float() if bn.weight is not None else torch.ones(bn.num_features)) / \
                torch.sqrt(bn.running_var.float() + bn.eps)
            wq = m.weight_quantizer
            fold_bn(m, bn)
            if wq is not None:
                if wq.spec.granularity != "per_channel" or wq.scale.numel() != factor.numel():
                    raise RuntimeError(f"{li.name}: cannot fold batch norm into {wq.spec.granularity} weight scales")
                s = wq.scale.reshape(-1) * factor.abs()
                z = wq.zero_point.reshape(-1).round()
                if not wq.spec.symmetric:
                    z = torch.where(factor < 0, float(wq.qmin + wq.qmax) - z, z)
                wq.set_qparams(s.reshape(wq.scale.shape), z.reshape(wq.zero_point.shape))
        from ..quant.bn import bn_affine
        beta, gamma = bn_affine(bn)
        _set_module(sim, meta["path"], nn.Identity())
        m.qcard_bn = dict(meta, state="folded", beta=beta, gamma=gamma)
        m.__dict__["_qat_folded"] = True
        li.bn = "folded"
        folded.append(li.name)
    if folded:
        info.batch_norm = "folded"
    return folded


def _set_module(root, path: str, new) -> None:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)


class _LearnedHook:
    """Keeps learned scales, zero points and clips valid after every optimizer step."""

    def __init__(self, quantizers):
        self.quantizers = quantizers

    def after_step(self, state) -> None:
        from ..quant.lsq import clamp_learned
        for q in self.quantizers:
            clamp_learned(q)


def _warm_caches(sim, example) -> None:
    """One no-grad forward pass, outside inference mode, so the simulated layers' weight caches are
    ordinary tensors (the evaluator runs under torch.inference_mode, whose tensors have no version
    counter for the cache keys in quant/modules.py to read)."""
    import torch
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
        from ..evaluate import evaluate as _eval
        return _eval(model, dataset if dataset is not None else data.eval, batch_size=data.batch_size,
                     device=ctx.device)
    return evaluate


def make_learnable(p: QATParams, wqs, aqs, sim=None):
    """Turn the calibrated quantizers the estimator learns into LSQ / PACT quantizers, in place.
    Returns (learned quantizers, the PACT ones, pipeline step, warning or None)."""
    from ..quant.lsq import make_lsq, make_pact

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


def run_qat(model, data: PointData, p: QATParams, ctx: RunContext) -> QuantResult:
    import torch
    from ..quant.calibrate import sim_info
    from ..quant.graph import build_simulated
    from ..quant.lsq import freeze
    from ..quant.pipeline import calibration_batches, run_steps, sim_config_from
    from ..quant.report import layer_records, quantization_block
    from ..training import reinitialize, train

    ptq = p.ptq_params()
    pipeline: List[str] = []
    warnings: List[str] = []
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
    model.eval()
    xs, _, n_calib = calibration_batches(data, ptq.calibration_batch_size)
    cfg = sim_config_from(ptq)
    cfg.bn = "folded" if p.bn == "static_fold" else "kept"
    sim = build_simulated(model, cfg, xs[0][:1].to(ctx.device), log=ctx.log)
    info = sim_info(sim)
    init_stats: Dict[str, Any] = {}
    ran = run_steps(sim, ptq, list(ptq.steps), xs, ctx, init_stats)
    pipeline += [f"init_{s}" if s.endswith("_ranges") else s for s in ran]
    wqs, aqs = _quantizers(sim)
    init_grids = {"weights": _grid_table(wqs), "activations": _grid_table(aqs)}

    learned, pact_qs, step, msg = make_learnable(p, wqs, aqs, sim)
    if step:
        pipeline.append(step)
    if msg:
        warnings.append(msg)
        ctx.log(f"qcard: {msg}")
    qparam_ids = set()
    qparams = []
    for q in learned:
        for t in q.parameters(recurse=False):
            if t.requires_grad:
                qparam_ids.add(id(t))
                qparams.append(t)
    weights = [t for t in sim.parameters() if t.requires_grad and id(t) not in qparam_ids]
    groups = [{"params": weights}]
    if qparams:
        groups.append({"params": qparams, "weight_decay": 0.0})   # decay would shrink the learned ranges
    pipeline.append(f"train_{p.estimator}" + ("_pact" if pact_qs else ""))
    example = xs[0][:1].to(ctx.device)
    train_ctx = dataclasses.replace(ctx, evaluate=_warm_then(ctx, data, sim, example))
    log = train(sim, data, recipe, train_ctx, hooks=[_LearnedHook(learned)], params=groups)
    warnings += list(log.warnings)
    sim.eval()
    for q in learned:
        freeze(q)
    folded = []
    if p.bn == "keep_then_fold":
        folded = fold_kept_bn(sim)
        pipeline.append("fold_bn_into_scales")
    for q in wqs + aqs:          # fresh grids: drop caches that keyed on the training-time objects
        q._fast = None
    pipeline.append("convert")
    _warm_caches(sim, example)

    # what ran, in the card's vocabulary
    label = "lsq" if p.estimator == "lsq" else "ste"
    for q in wqs:
        if q.enabled:
            q.range_setting = f"{label} (init {q.range_setting})" if p.estimator == "lsq" else q.range_setting
            if p.estimator == "lsq":
                q.rounding_label = "learned"
    for q in aqs:
        if q.enabled and any(q is l for l in learned):
            q.range_setting = f"{'lsq' if p.estimator == 'lsq' else 'pact'} (init {q.range_setting})"
    block = quantization_block(sim, preset=p.preset)
    if info.batch_norm != "none":
        block["batch_norm"] = {"static_fold": "qat_static_fold", "keep_then_fold": "qat_keep_then_fold",
                               "kept": "kept"}[p.bn]
    final_grids = {"weights": _grid_table(wqs), "activations": _grid_table(aqs)}
    qat_stats = {
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
    stats: Dict[str, Any] = {"training": log.to_stats(), "qat": qat_stats, "graph_mode": info.graph_mode}
    for k in ("cle", "bias_absorption", "bias_correction", "step_seconds"):
        if k in init_stats:
            stats.setdefault("init_steps", {})[k] = init_stats[k]
    for u in info.unquantized:
        ctx.log(f"qcard: {u['name']} ({u['op']}) left in FP32: {u['reason']}")
    return QuantResult(
        model=sim, quantization=block, layers=layer_records(sim), stats=stats, pipeline=pipeline,
        calibration={"split": "train", "size": len(data.train), "seed": ctx.seed, "labels_used": True},
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
