"""Post-training quantization: the white paper's pipeline, with every confounding tradeoff a switch.

    methods: [{name: ptq, params: {w_bits: 4, a_bits: 8, pipeline: standard_adaround}}]

Pipelines (ordered steps; `pipeline: custom` + `steps: [...]` for your own order):
  standard           cle, bias_absorption, weight_ranges, bias_correction, activation_ranges
                     (Nagel et al. 2021, §4.6, the branch without AdaRound), MSE ranges, cross-entropy
                     range for the logits
  standard_adaround  cle, bias_absorption, weight_ranges, adaround, activation_ranges (the branch for
                     when a few hundred unlabeled calibration images are at hand)
  minmax             weight_ranges, activation_ranges with min-max ranges (the plain baseline)
Steps: cle (cross-layer equalization), bias_absorption (high-bias absorption; after cle),
weight_ranges, adaround, bias_correction (empirical or analytic), activation_ranges.
Calibration images come from the training split (PointData.calibration_set()); with
`sensitivity` a per-layer table goes into the card's method_stats; `mixed_precision: true` runs a
greedy bit allocation to the given budgets and then the pipeline again with the chosen bits.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import Method, MethodParams, PointData, QuantResult, RunContext

Step = Literal["cle", "bias_absorption", "weight_ranges", "adaround", "bias_correction", "activation_ranges"]

PIPELINES: Dict[str, List[str]] = {
    "standard": ["cle", "bias_absorption", "weight_ranges", "bias_correction", "activation_ranges"],
    "standard_adaround": ["cle", "bias_absorption", "weight_ranges", "adaround", "activation_ranges"],
    "minmax": ["weight_ranges", "activation_ranges"],
}
_RANGE_DEFAULTS = {
    "standard": ("mse", "mse", "cross_entropy"),
    "standard_adaround": ("mse", "mse", "cross_entropy"),
    "minmax": ("minmax", "minmax", "same"),
    "custom": ("mse", "mse", "cross_entropy"),
}
_BITS = Field(ge=2, le=16)


class Override(BaseModel):
    """A per-layer exception (manual mixed precision). `pattern` is an fnmatch pattern on layer names
    (module paths such as 'layer1.*.conv1', or op names such as 'layer1.0.add')."""
    model_config = ConfigDict(extra="forbid")
    pattern: str
    w_bits: Optional[int] = Field(None, ge=2, le=16)
    a_bits: Optional[int] = Field(None, ge=2, le=16)
    fp32: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Override":
        if self.fp32 and (self.w_bits is not None or self.a_bits is not None):
            raise ValueError(f"override '{self.pattern}': fp32: true leaves the layer in FP32; drop w_bits/a_bits")
        if not self.fp32 and self.w_bits is None and self.a_bits is None:
            raise ValueError(f"override '{self.pattern}' changes nothing: give w_bits, a_bits or fp32: true")
        return self


class PTQParams(MethodParams):
    # scheme
    preset: Optional[Literal["academic", "tensorrt", "snpe", "fbgemm", "tvm", "acl"]] = Field(
        None, description="hardware backend preset (qcard/presets/*.yaml): fixes the scheme; conflicts are errors")
    w_bits: Optional[int] = Field(8, ge=2, le=16, description="weight bits (null: weights stay FP32)")
    a_bits: Optional[int] = Field(8, ge=2, le=16, description="activation bits (null: weight-only quantization)")
    weight_only: bool = Field(False, description="shorthand for a_bits: null")
    input_bits: Optional[int] = Field(8, ge=2, le=16, description="bits of the network input (null: FP32; "
                                      "defaults to null with weight-only quantization)")
    w_granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    w_axis: Optional[int] = Field(None, description="weight tensor axis of per-channel/per-group scales "
                                  "(null: each layer's output channels)")
    w_group_size: Optional[int] = Field(None, ge=1, description="elements per group for per_group weights")
    w_symmetric: bool = True
    w_signed: bool = True
    a_symmetric: bool = False
    a_signed: Optional[bool] = Field(None, description="null: asymmetric grids unsigned; symmetric grids "
                                     "unsigned where calibration sees no negative values")
    a_granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    scale_format: Literal["float", "power_of_two"] = "float"
    rounding: Literal["nearest", "stochastic"] = Field("nearest", description="weight rounding (adaround is a step)")
    # network-level choices
    bn: Literal["folded", "kept"] = Field("folded", description="fold batch norm into conv/linear, or keep it in FP32")
    first_layer: Literal["same", "8bit", "fp32"] = Field(
        "same", description="first conv/linear: like the rest, 8-bit, or FP32 (its input follows input_bits)")
    last_layer: Literal["same", "8bit", "fp32"] = Field(
        "same", description="last conv/linear: like the rest, 8-bit weights and input, or FP32")
    residual_add: Literal["quant_all", "gemm_inputs_only", "relu_only"] = Field(
        "quant_all", description="quant_all: adds/concats/pools/non-linearities read integer inputs too; "
        "gemm_inputs_only: only conv/linear/matmul inputs; relu_only: only ReLU outputs, skip paths FP32")
    concat: Literal["requantized", "shared_grid"] = "requantized"
    avg_pool: Literal["requantized", "shared_grid"] = "requantized"
    quant_point: Literal["after_activation", "before_activation"] = "after_activation"
    dynamic_activations: bool = Field(False, description="activation ranges from each input sample at run time")
    graph_mode: Literal["auto", "fx", "eager"] = Field(
        "auto", description="auto: torch.fx, falling back to module-level placement when the model does not trace")
    overrides: List[Override] = Field(default_factory=list, description="per-layer (or '<layer>.output' tensor) "
                                      "exceptions: [{pattern, w_bits, a_bits, fp32}]")
    # pipeline and range setting
    pipeline: Literal["standard", "standard_adaround", "minmax", "custom"] = "standard"
    steps: Optional[List[Step]] = Field(None, description="ordered steps; set by the pipeline unless custom")
    weight_range: Optional[Literal["minmax", "mse", "percentile"]] = Field(None, description="null: the pipeline's")
    activation_range: Optional[Literal["minmax", "ema_minmax", "percentile", "mse", "kl", "bn"]] = Field(
        None, description="null: the pipeline's")
    logits_range: Optional[Literal["same", "cross_entropy"]] = Field(
        None, description="range setting of the logits (cross_entropy: white paper); null: the pipeline's")
    percentile: float = Field(99.99, gt=50, le=100)
    bn_alpha: float = Field(6.0, gt=0, description="BN-based ranges: beta ± alpha·gamma")
    calibration_batch_size: int = Field(32, ge=1)
    labels: Literal["real", "fp32_model"] = Field("real", description="labels for accuracy sensitivity: the "
                                                 "dataset's, or the FP32 model's predictions")
    # algorithms
    bias_correction: Literal["empirical", "analytic"] = "empirical"
    adaround_iters: Optional[int] = Field(None, ge=1, description="null: AIMET's 10000 (15000 below 8 bits)")
    adaround_reg: float = Field(0.01, ge=0)
    adaround_beta_start: float = 20.0
    adaround_beta_end: float = 2.0
    adaround_warm_start: float = Field(0.2, ge=0, lt=1)
    adaround_batch_size: int = Field(32, ge=1)
    adaround_lr: float = Field(1e-3, gt=0)
    # analysis
    sensitivity: Literal["none", "sqnr", "accuracy"] = Field(
        "none", description="per-layer table (one layer quantized at a time) in the card's method_stats")
    mixed_precision: bool = Field(False, description="greedy bit allocation to the mp_* budgets")
    mp_allowed_bits: List[int] = Field(default_factory=lambda: [2, 4, 8])
    mp_weight_bits: Optional[float] = Field(None, gt=0, description="budget: mean weight bits (element-weighted)")
    mp_activation_bits: Optional[float] = Field(None, gt=0, description="budget: mean activation bits")
    mp_max_activation_map_bits: Optional[int] = Field(None, gt=0, description="budget: largest activation map, bits")

    @model_validator(mode="after")
    def _resolve(self) -> "PTQParams":
        explicit = set(self.model_fields_set)
        errors: List[str] = []
        # weight-only
        if self.weight_only:
            if "a_bits" in explicit and self.a_bits is not None:
                errors.append(f"weight_only: true contradicts a_bits: {self.a_bits} (weight-only leaves activations FP32)")
            self.a_bits = None
        if self.a_bits is None and "input_bits" not in explicit:
            self.input_bits = None        # weight-only: the input stays FP32 too unless asked
        # pipeline steps
        if self.pipeline == "custom":
            if not self.steps:
                errors.append("pipeline: custom needs steps, e.g. [cle, weight_ranges, adaround, activation_ranges]")
        else:
            named = PIPELINES[self.pipeline]
            if self.steps is not None and list(self.steps) != named:
                errors.append(f"steps are set by pipeline: {self.pipeline} ({named}); use pipeline: custom to "
                              f"choose your own")
            self.steps = list(named)
        steps = list(self.steps or [])
        if self.w_bits is None:
            # activation-only quantization: no weight steps
            steps = [s for s in steps if s not in ("cle", "bias_absorption", "weight_ranges", "adaround",
                                                   "bias_correction")] if self.pipeline != "custom" else steps
        if self.a_bits is None or self.dynamic_activations:
            steps = [s for s in steps if s != "activation_ranges"] if self.pipeline != "custom" else steps
        self.steps = steps
        errors += self._check_steps(steps)
        # ranges
        w_def, a_def, l_def = _RANGE_DEFAULTS[self.pipeline]
        if self.weight_range is None:
            self.weight_range = w_def
        if self.activation_range is None:
            self.activation_range = a_def
        if self.logits_range is None:
            self.logits_range = l_def if self.a_granularity == "per_tensor" else "same"
        if self.a_granularity == "per_channel" and self.activation_range == "kl":
            errors.append("activation_range: kl is per tensor only (TensorRT entropy calibration); "
                          "use minmax, mse or percentile with a_granularity: per_channel")
        if self.a_granularity == "per_channel" and self.logits_range == "cross_entropy":
            errors.append("logits_range: cross_entropy is per tensor only")
        if self.dynamic_activations and "activation_range" in explicit and self.activation_range != a_def:
            errors.append("activation_range is not used with dynamic_activations: true (ranges come from each input)")
        # granularity
        if self.w_granularity == "per_group" and self.w_group_size is None:
            errors.append("w_granularity: per_group needs w_group_size (elements per group, e.g. 32)")
        if self.w_granularity != "per_group" and self.w_group_size is not None:
            errors.append(f"w_group_size is only used with w_granularity: per_group, not {self.w_granularity}")
        if "cle" in steps and self.bn == "kept":
            if self.pipeline == "custom":
                errors.append("cle needs bn: folded (equalization rescales the folded weights)")
            else:       # a named pipeline with batch norm kept: equalization does not apply
                steps = [s for s in steps if s not in ("cle", "bias_absorption")]
                self.steps = steps
        if self.adaround_iters is None:
            self.adaround_iters = 10000 if (self.w_bits or 8) >= 8 else 15000
        if self.mixed_precision:
            if self.mp_weight_bits is None and self.mp_activation_bits is None and self.mp_max_activation_map_bits is None:
                errors.append("mixed_precision: true needs a budget: mp_weight_bits, mp_activation_bits or "
                              "mp_max_activation_map_bits")
            bad = [b for b in self.mp_allowed_bits if not 2 <= b <= 16]
            if bad or not self.mp_allowed_bits:
                errors.append(f"mp_allowed_bits must be bit widths in 2..16, got {self.mp_allowed_bits}")
            if self.w_bits is None:
                errors.append("mixed_precision needs quantized weights (w_bits)")
        # preset last: it may fill settings that were left at their defaults
        if self.preset is not None:
            from ..quant.presets import resolve_preset
            values = self.__dict__
            bits_in_use = {"w_bits": [self.w_bits] + [o.w_bits for o in self.overrides if o.w_bits is not None]
                           + (list(self.mp_allowed_bits) if self.mixed_precision else []),
                           "a_bits": [self.a_bits] + [o.a_bits for o in self.overrides if o.a_bits is not None]}
            try:
                updates = resolve_preset(self.preset, values, explicit, bits_in_use)
            except ValueError as exc:
                errors.append(str(exc))
                updates = {}
            for k, v in updates.items():
                object.__setattr__(self, k, v)
            if self.bn == "kept" and "cle" in self.steps:
                if self.pipeline == "custom":
                    errors.append(f"preset '{self.preset}' keeps batch norm (not folded), so step cle cannot run")
                else:
                    self.steps = [s for s in self.steps if s not in ("cle", "bias_absorption")]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def _check_steps(self, steps: List[str]) -> List[str]:
        errs = []
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            errs.append(f"steps repeat {dup}")
        pos = {s: i for i, s in enumerate(steps)}
        if "bias_absorption" in pos and ("cle" not in pos or pos["cle"] > pos["bias_absorption"]):
            errs.append("bias_absorption needs cle before it (it absorbs the biases cle made large)")
        for s in ("adaround", "bias_correction"):
            if s in pos and ("weight_ranges" not in pos or pos["weight_ranges"] > pos[s]):
                errs.append(f"{s} needs weight_ranges before it")
        for s in ("cle", "bias_absorption"):
            if s in pos and "weight_ranges" in pos and pos[s] > pos["weight_ranges"]:
                errs.append(f"{s} must come before weight_ranges (ranges are set on the equalized weights)")
        if self.w_bits is not None and "weight_ranges" not in pos:
            errs.append("weights are quantized (w_bits set) but steps lack weight_ranges")
        if self.a_bits is not None and not self.dynamic_activations and "activation_ranges" not in pos:
            errs.append("activations are quantized (a_bits set) but steps lack activation_ranges")
        if self.w_bits is None and any(s in pos for s in ("weight_ranges", "adaround", "bias_correction")):
            errs.append("weight steps need w_bits (weights are FP32 with w_bits: null)")
        if "adaround" in pos and self.rounding == "stochastic":
            errs.append("adaround chooses the rounding itself; it cannot be combined with rounding: stochastic")
        return errs


class PTQ(Method):
    name = "ptq"
    family = "ptq"
    Params = PTQParams

    def apply(self, model, data: PointData, params: PTQParams, ctx: RunContext) -> QuantResult:
        from ..quant.pipeline import run_ptq
        return run_ptq(model, data, params, ctx)
