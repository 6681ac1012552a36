"""Post-training quantization: the white paper's pipeline, with every confounding tradeoff a switch.

    methods: [{name: ptq, params: {w_bits: 4, a_bits: 8, pipeline: standard_adaround}}]

Pipelines (ordered steps; `pipeline: custom` + `steps: [...]` for your own order):
  standard           cle, bias_absorption, weight_ranges, bias_correction, activation_ranges
                     (Nagel et al. 2021, §4.6, the branch without AdaRound), MSE ranges, cross-entropy
                     range for the logits
  standard_adaround  cle, bias_absorption, weight_ranges, adaround, activation_ranges (the branch for
                     when a few hundred unlabeled calibration images are at hand)
  minmax             weight_ranges, activation_ranges with min-max ranges (the plain baseline)
  brecq, qdrop       weight_ranges, activation_ranges, then block reconstruction (quant.reconstruct) with
                     MSE ranges; settings in the optional `reconstruction:` block (MQBench's defaults)
  gptq               weight_ranges, activation_ranges, gptq (quant.gptq); settings in `gptq:`
Steps: cle (cross-layer equalization), bias_absorption (high-bias absorption; after cle),
weight_ranges, adaround, brecq, qdrop, gptq (at most one of these four), bias_correction (empirical or
analytic), activation_ranges. MQBench's first/last layers at 8 bits are the scheme's first_layer /
last_layer, which a config sets for every method it compares (a pipeline does not change the scheme).
Calibration images come from the training split (PointData.calibration_set()); with
`sensitivity` a per-layer table goes into the card's method_stats; `mixed_precision: true` runs a
greedy bit allocation to the given budgets and then the pipeline again with the chosen bits.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, model_serializer, model_validator

from ...quant.scheme import (ActivationRange, BiasCorrection, LogitsRange, SimScheme, WeightRange, apply_preset,
                             field_default)
from ..base import MethodParams

__all__ = ["PTQParams", "PIPELINES", "Step", "pipeline_steps", "ReconstructionParams", "GPTQParams"]

Step = Literal["cle", "bias_absorption", "weight_ranges", "adaround", "bias_correction", "activation_ranges",
               "brecq", "qdrop", "gptq"]
Pipeline = Literal["standard", "standard_adaround", "minmax", "brecq", "qdrop", "gptq", "custom"]

PIPELINES: Dict[str, List[str]] = {
    "standard": ["cle", "bias_absorption", "weight_ranges", "bias_correction", "activation_ranges"],
    "standard_adaround": ["cle", "bias_absorption", "weight_ranges", "adaround", "activation_ranges"],
    "minmax": ["weight_ranges", "activation_ranges"],
    # MQBench's advanced PTQ: ranges first, then reconstruction learns the rounding and activation steps
    "brecq": ["weight_ranges", "activation_ranges", "brecq"],
    "qdrop": ["weight_ranges", "activation_ranges", "qdrop"],
    "gptq": ["weight_ranges", "activation_ranges", "gptq"],
}
# (weight, activation, logits) range setting of each pipeline
_RANGE_DEFAULTS = {
    "standard": ("mse", "mse", "cross_entropy"),
    "standard_adaround": ("mse", "mse", "cross_entropy"),
    "minmax": ("minmax", "minmax", "same"),
    "brecq": ("mse", "mse", "same"),
    "qdrop": ("mse", "mse", "same"),
    "gptq": ("mse", "mse", "same"),
    "custom": ("mse", "mse", "cross_entropy"),
}
_WEIGHT_STEPS = ("cle", "bias_absorption", "weight_ranges", "adaround", "bias_correction", "brecq", "qdrop", "gptq")
_ROUNDING_STEPS = ("adaround", "brecq", "qdrop", "gptq")      # each chooses every weight's rounding itself


def pipeline_steps(pipeline: str, w_bits, a_bits, dynamic_activations, bn) -> List[str]:
    """A named pipeline's steps for these settings: no weight steps with FP32 weights, no activation
    ranges with FP32 or dynamic activations, no equalization with batch norm kept."""
    steps = list(PIPELINES[pipeline])
    if w_bits is None:
        steps = [s for s in steps if s not in _WEIGHT_STEPS]
    if a_bits is None or dynamic_activations:
        steps = [s for s in steps if s != "activation_ranges"]
    if bn == "kept":
        steps = [s for s in steps if s not in ("cle", "bias_absorption")]
    return steps


class ReconstructionParams(MethodParams):
    """Settings of the brecq / qdrop steps (quant.reconstruct); defaults are MQBench's advanced-PTQ configs."""
    unit: Literal["block", "layer"] = Field("block", description="block: MQBench's blocks found on the graph; "
                                                                 "layer: one conv/linear at a time")
    max_block_layers: int = Field(3, ge=1, description="layers outside residual blocks merged into one block")
    iters: int = Field(20000, ge=1, description="iterations per unit (MQBench: 20000)")
    reg: float = Field(0.01, ge=0, description="λ of the rounding regulariser (0.1 for MobileNetV2 in BRECQ/QDrop)")
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warm_start: float = Field(0.2, ge=0, lt=1, description="fraction of iterations without the regulariser")
    batch_size: int = Field(32, ge=1, description="reconstruction batch (QDrop's code: 32)")
    lr: float = Field(1e-3, gt=0, description="Adam lr of the rounding logits")
    scale_lr: float = Field(4e-5, ge=0, description="Adam lr of the activation step sizes, cosine decay; 0: fixed")
    drop_prob: float = Field(0.5, gt=0, le=1, description="qdrop: probability of keeping the quantized value")
    input: Literal["quantized", "fp_activations"] = Field(
        "quantized", description="unit input: the quantized network so far, or it with FP activations")

    @model_validator(mode="after")
    def _check(self) -> "ReconstructionParams":
        if self.beta_end > self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must not exceed beta_start ({self.beta_start}): "
                             "β anneals downwards")
        return self


class GPTQParams(MethodParams):
    """Settings of the gptq step (quant.gptq)."""
    damp: float = Field(0.01, gt=0, lt=1, description="dampening, a fraction of mean(diag H)")
    block: int = Field(128, ge=1, description="columns quantized per lazy-update block")
    act_order: bool = Field(False, description="columns in order of decreasing diag(H)")


class PTQParams(SimScheme, MethodParams):
    # the scheme (quant.scheme.SchemeParams, SimScheme) comes first; then the ptq method's own switches
    weight_only: bool = Field(False, description="shorthand for a_bits: null")
    # pipeline and range setting (null ranges: the pipeline's)
    pipeline: Pipeline = "standard"
    steps: Optional[List[Step]] = Field(None, description="ordered steps; set by the pipeline unless custom")
    weight_range: Optional[WeightRange] = Field(None, description="null: the pipeline's")
    activation_range: Optional[ActivationRange] = Field(None, description="null: the pipeline's")
    logits_range: Optional[LogitsRange] = Field(
        None, description="range setting of the logits (cross_entropy: white paper); null: the pipeline's")
    labels: Literal["real", "fp32_model"] = Field("real", description="labels for accuracy sensitivity: the "
                                                 "dataset's, or the FP32 model's predictions")
    # algorithms
    bias_correction: BiasCorrection = "empirical"
    adaround_iters: Optional[int] = Field(None, ge=1, description="null: AIMET's 10000 (15000 below 8 bits)")
    adaround_reg: float = Field(0.01, ge=0)
    adaround_beta_start: float = 20.0
    adaround_beta_end: float = 2.0
    adaround_warm_start: float = Field(0.2, ge=0, lt=1)
    adaround_batch_size: int = Field(32, ge=1)
    adaround_lr: float = Field(1e-3, gt=0)
    adaround_targets: Literal["fp_model", "rounded_so_far"] = Field(
        "fp_model", description="fp_model: targets from an untouched FP copy (documented AdaRound); rounded_so_far: "
                                "qcard's AdaRound before the engine (for older cards)")
    # nested, optional: unset, they stay out of the point id (published ids unchanged)
    reconstruction: Optional[ReconstructionParams] = Field(None, description="brecq / qdrop settings; null: "
                                                                             "MQBench's defaults")
    gptq: Optional[GPTQParams] = Field(None, description="gptq settings; null: the defaults")
    # analysis
    sensitivity: Literal["none", "sqnr", "accuracy"] = Field(
        "none", description="per-layer table (one layer quantized at a time) in the card's method_stats")
    mixed_precision: bool = Field(False, description="greedy bit allocation to the mp_* budgets")
    mp_allowed_bits: List[int] = Field(default_factory=lambda: [2, 4, 8])
    mp_weight_bits: Optional[float] = Field(None, gt=0, description="budget: mean weight bits (element-weighted)")
    mp_activation_bits: Optional[float] = Field(None, gt=0, description="budget: mean activation bits")
    mp_max_activation_map_bits: Optional[int] = Field(None, gt=0, description="budget: largest activation map, bits")

    @model_serializer(mode="wrap")
    def _drop_unset_blocks(self, handler):
        # a point's id hashes this dump: optional blocks added later count only when set
        data = handler(self)
        if isinstance(data, dict):
            for key in ("reconstruction", "gptq"):
                if data.get(key, 0) is None:
                    data.pop(key)
            if data.get("adaround_targets") == "fp_model":    # added later: in the id only when not the default
                data.pop("adaround_targets")
        return data

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        """Fill what the other settings imply, on the raw dict: the preset's scheme, weight-only,
        the pipeline's steps and ranges, AdaRound's iterations. Consistency is checked after."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        get = lambda k: data.get(k, field_default(cls, k))     # noqa: E731
        if get("weight_only") and data.get("a_bits") is None:
            data["a_bits"] = None
        if get("a_bits") is None and "input_bits" not in data:
            data["input_bits"] = None        # weight-only: the input stays FP32 too unless asked
        data.update(apply_preset(cls, data, get("mp_allowed_bits") if get("mixed_precision") else ()))
        pipeline = get("pipeline")
        if pipeline in PIPELINES and (data.get("steps") is None or list(data["steps"]) == PIPELINES[pipeline]):
            data["steps"] = pipeline_steps(pipeline, get("w_bits"), get("a_bits"), get("dynamic_activations"),
                                           get("bn"))
        w_def, a_def, l_def = _RANGE_DEFAULTS.get(pipeline, _RANGE_DEFAULTS["custom"])
        for key, default in (("weight_range", w_def), ("activation_range", a_def),
                             ("logits_range", l_def if get("a_granularity") == "per_tensor" else "same")):
            if data.get(key) is None:
                data[key] = default
        if data.get("adaround_iters") is None:
            data["adaround_iters"] = 10000 if (get("w_bits") or 8) >= 8 else 15000
        return data

    @model_validator(mode="after")
    def _check(self) -> "PTQParams":
        errors: List[str] = []
        if self.weight_only and self.a_bits is not None:
            errors.append(f"weight_only: true contradicts a_bits: {self.a_bits} (weight-only leaves activations FP32)")
        steps = list(self.steps or [])
        if self.pipeline == "custom":
            if not steps:
                errors.append("pipeline: custom needs steps, e.g. [cle, weight_ranges, adaround, activation_ranges]")
            errors += self._check_steps(steps)
        elif steps != pipeline_steps(self.pipeline, self.w_bits, self.a_bits, self.dynamic_activations, self.bn):
            errors.append(f"steps are set by pipeline: {self.pipeline} ({PIPELINES[self.pipeline]}); use pipeline: "
                          f"custom to choose your own")
        else:
            errors += self._check_steps(steps)
        if "cle" in steps and self.bn == "kept":
            errors.append(f"preset '{self.preset}' keeps batch norm (not folded), so step cle cannot run"
                          if self.preset else "cle needs bn: folded (equalization rescales the folded weights)")
        if self.a_granularity == "per_channel" and self.activation_range == "kl":
            errors.append("activation_range: kl is per tensor only (TensorRT entropy calibration); "
                          "use minmax, mse or percentile with a_granularity: per_channel")
        if self.a_granularity == "per_channel" and self.logits_range == "cross_entropy":
            errors.append("logits_range: cross_entropy is per tensor only")
        if self.dynamic_activations and self.activation_range != _RANGE_DEFAULTS[self.pipeline][1]:
            errors.append("activation_range is not used with dynamic_activations: true (ranges come from each input)")
        if self.mixed_precision:
            errors += self._check_mixed_precision()
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def unused_params(self) -> Dict[str, str]:
        """{param: why it did nothing here}: the resolved params keep every default (they define the
        point's id), so the card says which of them this point's steps never read."""
        steps = list(self.steps or [])
        out: Dict[str, str] = {}
        if "bias_correction" not in steps:
            out["bias_correction"] = f"no bias_correction step in {self.pipeline}"
        if "adaround" not in steps:
            keys = [k for k in type(self).model_fields if k.startswith("adaround_")]
            if self.adaround_targets == "fp_model":      # not in the dump at its default (_drop_unset_blocks)
                keys.remove("adaround_targets")
            out.update({k: f"no adaround step in {self.pipeline}" for k in keys})
        if "percentile" not in (self.weight_range, self.activation_range):
            out["percentile"] = "no percentile range setting"
        if self.activation_range != "bn":
            out["bn_alpha"] = "activation ranges not from batch norm"
        if self.sensitivity != "accuracy":
            out["labels"] = "no accuracy sensitivity"
        if not self.mixed_precision:
            out.update({k: "mixed_precision off" for k in type(self).model_fields if k.startswith("mp_")})
        return out

    def _check_mixed_precision(self) -> List[str]:
        errs = []
        if self.mp_weight_bits is None and self.mp_activation_bits is None and self.mp_max_activation_map_bits is None:
            errs.append("mixed_precision: true needs a budget: mp_weight_bits, mp_activation_bits or "
                        "mp_max_activation_map_bits")
        bad = [b for b in self.mp_allowed_bits if not 2 <= b <= 16]
        if bad or not self.mp_allowed_bits:
            errs.append(f"mp_allowed_bits must be bit widths in 2..16, got {self.mp_allowed_bits}")
        if self.w_bits is None:
            errs.append("mixed_precision needs quantized weights (w_bits)")
        return errs

    def _check_steps(self, steps: List[str]) -> List[str]:
        errs = []
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            errs.append(f"steps repeat {dup}")
        pos = {s: i for i, s in enumerate(steps)}
        if "bias_absorption" in pos and ("cle" not in pos or pos["cle"] > pos["bias_absorption"]):
            errs.append("bias_absorption needs cle before it (it absorbs the biases cle made large)")
        for s in ("adaround", "bias_correction", "brecq", "qdrop", "gptq"):
            if s in pos and ("weight_ranges" not in pos or pos["weight_ranges"] > pos[s]):
                errs.append(f"{s} needs weight_ranges before it")
        for s in ("cle", "bias_absorption"):
            if s in pos and "weight_ranges" in pos and pos[s] > pos["weight_ranges"]:
                errs.append(f"{s} must come before weight_ranges (ranges are set on the equalized weights)")
        if self.w_bits is not None and "weight_ranges" not in pos:
            errs.append("weights are quantized (w_bits set) but steps lack weight_ranges")
        if self.a_bits is not None and not self.dynamic_activations and "activation_ranges" not in pos:
            errs.append("activations are quantized (a_bits set) but steps lack activation_ranges")
        if self.w_bits is None and any(s in pos for s in ("weight_ranges", "bias_correction") + _ROUNDING_STEPS):
            errs.append("weight steps need w_bits (weights are FP32 with w_bits: null)")
        rounding = [s for s in steps if s in _ROUNDING_STEPS]
        if len(rounding) > 1:
            errs.append(f"steps {rounding} each choose every weight's rounding; keep one of them")
        for s in rounding:
            if self.rounding == "stochastic":
                errs.append(f"{s} chooses the rounding itself; it cannot be combined with rounding: stochastic")
        for s in ("brecq", "qdrop"):
            if s in pos and self.a_bits is not None and not self.dynamic_activations and (
                    "activation_ranges" not in pos or pos["activation_ranges"] > pos[s]):
                errs.append(f"{s} needs activation_ranges before it (it reconstructs with activations quantized)")
        if self.reconstruction is not None and not ({"brecq", "qdrop"} & set(pos)):
            errs.append("reconstruction settings are given but no step uses them (brecq or qdrop)")
        if self.gptq is not None and "gptq" not in pos:
            errs.append("gptq settings are given but steps lack gptq")
        return errs
