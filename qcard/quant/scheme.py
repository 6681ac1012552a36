"""The quantization scheme, declared once: the enums, the settings PTQ and QAT share, and presets applied to them.

Imports no torch (the card schema and `qcard validate` read it). The chain a setting such as
`w_granularity` follows:

    YAML → SchemeParams field (PTQParams / QATParams extend it) → SimScheme, what the graph builder
    reads (quant/graph.py, quant/eager.py) → make_weight_quantizer → QSpec → FakeQuantize
    → report.quantization_block → Card.quantization (the same enum, typed by the card schema)

`SimScheme` adds the settings only the builder and PTQ have (weight axis, rounding, BN folding,
dynamic activations, range setting); a QAT run builds with the PTQParams it initializes its
ranges with.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .presets import PRESET_NAMES, PresetName, resolve_preset
from .qspec import ActGranularity, Granularity, Rounding, ScaleFormat, granularity_text, group_size_problem

__all__ = [
    "Granularity", "ActGranularity", "Rounding", "ScaleFormat", "RoundingLabel", "PresetName", "BatchNorm",
    "BatchNormOnCard", "EdgeLayer", "ResidualAdd", "GridSharing", "QuantPoint", "GraphMode", "BuiltGraphMode",
    "WeightRange", "ActivationRange", "LogitsRange", "BiasCorrection", "Override", "SearchedOverride",
    "SchemeParams", "SimScheme", "granularity_text", "field_default", "apply_preset",
]

# ------------------------------------------------------------------------------------------ enums

RoundingLabel = Literal[Rounding, "adaround", "learned", "gptq"]   # what the card says ran
BatchNorm = Literal["folded", "kept"]
BatchNormOnCard = Literal[BatchNorm, "qat_static_fold", "qat_keep_then_fold", "none"]
EdgeLayer = Literal["same", "8bit", "fp32"]
ResidualAdd = Literal["quant_all", "gemm_inputs_only", "relu_only"]
GridSharing = Literal["requantized", "shared_grid"]
QuantPoint = Literal["after_activation", "before_activation"]
GraphMode = Literal["auto", "fx", "eager"]
BuiltGraphMode = Literal["fx", "eager"]
WeightRange = Literal["minmax", "mse", "percentile"]
ActivationRange = Literal["minmax", "ema_minmax", "percentile", "mse", "kl", "bn"]
LogitsRange = Literal["same", "cross_entropy"]
BiasCorrection = Literal["empirical", "analytic"]

# ------------------------------------------------------------------------------------------ overrides

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


class SearchedOverride(Override):
    """An override a search chose (mixed precision), not the user; `source` names the search."""
    source: str


# ------------------------------------------------------------------------------------------ settings

class SchemeParams(BaseModel):
    """The settings PTQ and QAT share, under the same YAML keys and with the same defaults."""
    model_config = ConfigDict(extra="forbid")

    preset: Optional[PresetName] = Field(
        None, description="hardware backend preset (qcard/presets/*.yaml): fixes the scheme; conflicts are errors")
    w_bits: Optional[int] = Field(8, ge=2, le=16, description="weight bits (null: weights stay FP32)")
    a_bits: Optional[int] = Field(8, ge=2, le=16, description="activation bits (null: weight-only quantization)")
    input_bits: Optional[int] = Field(8, ge=2, le=16, description="bits of the network input (null: FP32; "
                                      "defaults to null with weight-only quantization)")
    w_granularity: Granularity = "per_channel"
    w_group_size: Optional[int] = Field(None, ge=1, description="elements per group for per_group weights")
    w_symmetric: bool = True
    w_signed: bool = True
    a_symmetric: bool = False
    a_signed: Optional[bool] = Field(None, description="null: asymmetric grids unsigned; symmetric grids "
                                     "unsigned where calibration sees no negative values")
    a_granularity: ActGranularity = "per_tensor"
    scale_format: ScaleFormat = "float"
    first_layer: EdgeLayer = Field(
        "same", description="first conv/linear: like the rest, 8-bit, or FP32 (its input follows input_bits)")
    last_layer: EdgeLayer = Field(
        "same", description="last conv/linear: like the rest, 8-bit weights and input, or FP32")
    residual_add: ResidualAdd = Field(
        "quant_all", description="quant_all: adds/concats/pools/non-linearities read integer inputs too; "
        "gemm_inputs_only: only conv/linear/matmul inputs; relu_only: only ReLU outputs, skip paths FP32")
    concat: GridSharing = "requantized"
    avg_pool: GridSharing = "requantized"
    quant_point: QuantPoint = "after_activation"
    graph_mode: GraphMode = Field(
        "auto", description="auto: torch.fx, falling back to module-level placement when the model does not trace")
    overrides: List[Override] = Field(default_factory=list, description="per-layer (or '<layer>.output' tensor) "
                                      "exceptions: [{pattern, w_bits, a_bits, fp32}]")
    percentile: float = Field(99.99, gt=50, le=100)
    calibration_batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check_scheme(self) -> "SchemeParams":
        problem = group_size_problem(self.w_granularity, self.w_group_size, "w_granularity", "w_group_size")
        if problem:
            raise ValueError(problem)
        return self


class SimScheme(SchemeParams):
    """What the graph builder reads: the shared scheme plus the settings of the simulated model that
    only PTQ exposes as switches (QAT builds with the PTQParams of its range initialization)."""
    w_axis: Optional[int] = Field(None, description="weight tensor axis of per-channel/per-group scales "
                                  "(null: each layer's output channels)")
    rounding: Rounding = Field("nearest", description="weight rounding (adaround is a step)")
    bn: BatchNorm = Field("folded", description="fold batch norm into conv/linear, or keep it in FP32")
    dynamic_activations: bool = Field(False, description="activation ranges from each input sample at run time")
    weight_range: WeightRange = "minmax"
    activation_range: ActivationRange = "minmax"
    logits_range: LogitsRange = Field("same", description="range setting of the logits (cross_entropy: white paper)")
    bn_alpha: float = Field(6.0, gt=0, description="BN-based ranges: beta ± alpha·gamma")


# ------------------------------------------------------------------------------------------ presets

def field_default(cls: type, name: str) -> Any:
    return cls.model_fields[name].get_default(call_default_factory=True)


def _get(o: Any, key: str) -> Any:
    return o.get(key) if isinstance(o, Mapping) else getattr(o, key, None)


def apply_preset(cls: type, data: Dict[str, Any], extra_bits: Iterable[int] = (),
                 view: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The preset's settings, for a raw Params dict (before validation): {field: value} for every
    setting it fixes. Raises ValueError naming every conflict with a setting given in `data` (or in
    `view`, where a method spells a setting its own way) and every bit width it cannot run."""
    name = data.get("preset")
    if name not in PRESET_NAMES:
        return {}                     # no preset, or an unknown name the field's own check reports
    given = dict(data, **(view or {}))
    values = {k: field_default(cls, k) for k in cls.model_fields if k not in given}
    values.update(given)
    overrides = data.get("overrides") or []
    bits_in_use = {"w_bits": [values.get("w_bits")] + [_get(o, "w_bits") for o in overrides] + list(extra_bits),
                   "a_bits": [values.get("a_bits")] + [_get(o, "a_bits") for o in overrides]}
    return resolve_preset(name, values, set(given), bits_in_use)
