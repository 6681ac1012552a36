"""card.json, schema version 2 (its JSON Schema: qcard/schemas/card.schema.json). Key names are a public format: change with care.

Required blocks are typed; blocks that methods extend (method_stats, per-layer rows) accept extra keys.
`load_card` accepts every schema version qcard has written and upgrades it to the current one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..errors import QcardError
from ..quant.scheme import (BatchNormOnCard, BiasCorrection, BuiltGraphMode, Granularity, GridSharing, QuantPoint,
                            ResidualAdd, RoundingLabel, ScaleFormat)

CARD_SCHEMA_VERSION = "2"
KNOWN_SCHEMA_VERSIONS = ("1", "2")


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelBlock(Closed):
    ref: str
    source: str
    weights: Optional[str] = None
    weights_sha256: Optional[str] = None
    params: Optional[int] = None
    input_shape: Optional[List[int]] = None
    label: Optional[str] = None          # the config's display name for the model (v2)


class CalibrationBlock(Closed):
    split: Optional[str] = None
    size: Optional[int] = None
    seed: Optional[int] = None
    labels_used: Optional[Union[bool, str]] = None
    # what these images were for: "training" (QAT, MARViN, FP32 training: the whole training split) or
    # range setting (None: PTQ, SPARQ, and cards written before it was said)
    used_for: Optional[Literal["training"]] = None
    range_init: Optional["CalibrationBlock"] = None    # training methods: the images their ranges started from


class DatasetBlock(Closed):
    ref: str
    eval_split: str
    eval_size: Optional[int] = None
    fingerprint: Optional[str] = None
    calibration: Optional[CalibrationBlock] = None
    preprocessing: Optional[Dict[str, Any]] = None
    split_info: Optional[Dict[str, Any]] = None


class MethodBlock(Closed):
    name: str
    family: Literal["none", "ptq", "qat", "adaptive_precision_training", "sparsity_aware_ptq", "other"]
    params: Dict[str, Any] = Field(default_factory=dict)
    pipeline: List[str] = Field(default_factory=list)
    label: Optional[str] = None


class WeightsQ(Open):
    bits: Optional[float] = None
    granularity: Optional[Granularity] = None
    group_size: Optional[int] = None
    symmetric: Optional[bool] = None
    signed: Optional[bool] = None
    scale_format: Optional[ScaleFormat] = None
    range_setting: Optional[str] = None
    rounding: Optional[RoundingLabel] = None


class ActivationsQ(Open):
    bits: Optional[float] = None
    granularity: Optional[Granularity] = None
    symmetric: Optional[bool] = None
    signed: Optional[bool] = None
    range_setting: Optional[str] = None
    dynamic: Optional[bool] = None
    quant_point: Optional[QuantPoint] = None


class EdgeLayer(Closed):
    weight_bits: Optional[float] = None
    activation_bits: Optional[float] = None
    name: Optional[str] = None


class Quantization(Open):
    preset: Optional[str] = None
    graph_mode: Optional[BuiltGraphMode] = None
    weights: WeightsQ = Field(default_factory=WeightsQ)
    activations: ActivationsQ = Field(default_factory=ActivationsQ)
    first_layer: EdgeLayer = Field(default_factory=EdgeLayer)
    last_layer: EdgeLayer = Field(default_factory=EdgeLayer)
    batch_norm: Optional[BatchNormOnCard] = None
    residual_add: Optional[Literal[ResidualAdd, "not_present"]] = None
    concat: Optional[Literal[GridSharing, "not_present"]] = None
    avg_pool: Optional[Literal[GridSharing, "not_present"]] = None
    bias_bits: Optional[int] = None
    accumulator_bits: Optional[int] = None
    cross_layer_equalization: Dict[str, Any] = Field(default_factory=lambda: {"applied": False, "bias_absorption": False})
    bias_correction: Optional[Literal["none", BiasCorrection]] = "none"
    mixed_precision: Dict[str, Any] = Field(default_factory=lambda: {"enabled": False})
    overrides: List[Any] = Field(default_factory=list)
    unquantized_layers: List[Dict[str, Any]] = Field(default_factory=list)
    hardware_unfriendly: List[str] = Field(default_factory=list)


def unquantized_block() -> Dict[str, Any]:
    """The card's quantization block for a model that is not quantized at all."""
    none_side = {"bits": None, "granularity": None, "symmetric": None, "signed": None}
    return {
        "preset": None, "graph_mode": None,
        "weights": dict(none_side, group_size=None, scale_format=None, range_setting=None, rounding=None),
        "activations": dict(none_side, range_setting=None, dynamic=False, quant_point=None),
        "first_layer": {"weight_bits": None, "activation_bits": None},
        "last_layer": {"weight_bits": None, "activation_bits": None},
        "batch_norm": "kept", "residual_add": None, "concat": None, "avg_pool": None,
        "bias_bits": None, "accumulator_bits": None,
        "cross_layer_equalization": {"applied": False, "bias_absorption": False},
        "bias_correction": "none",
        "mixed_precision": {"enabled": False},
        "overrides": [], "unquantized_layers": [], "hardware_unfriendly": [],
    }


# accuracies are percentages: 250.0 (or a gap of 180 points) is a broken card, not a result
Percent = Annotated[float, Field(ge=0, le=100)]
PercentGap = Annotated[float, Field(ge=-100, le=100)]


class Outcomes(Closed):
    """Which eval images were classified correctly (top-1), in eval order, per seed and for FP32: the paired
    data behind the intervals and compare's significance test. Bits are numpy.packbits (big-endian bit
    order, zero-padded to a byte) in base64: 125 bytes of bits for 1,000 images."""
    encoding: Literal["packbits-base64"] = "packbits-base64"
    n: int = Field(ge=0)                   # images the bits cover
    fingerprint: Optional[str] = None      # the eval set they refer to (dataset.fingerprint)
    fp32: Optional[str] = None
    seeds: Dict[str, str] = Field(default_factory=dict)   # str(seed) -> bits


Interval = Tuple[float, float]


class ChanceCheck(Closed):
    """Is the FP32 baseline informative? (qcard.evaluate.chance_check; None on cards written before it)"""
    num_classes: Optional[int] = None          # the classes the model picks among (top-5 of <= 5 is trivially 100)
    eval_classes: Optional[int] = None         # distinct labels among the eval images
    chance_top1: Optional[Percent] = None      # top-1 of always answering the eval set's most common class
    at_chance: Optional[bool] = None           # FP32's 95 % interval reaches down to chance_top1
    one_class: Optional[int] = None            # FP32 is right on exactly the images of this class (answers one class)


class Results(Closed):
    metric: str = "top1"
    fp32: Optional[Percent] = None
    quantized: Optional[Percent] = None
    delta: Optional[PercentGap] = None
    top5_fp32: Optional[Percent] = None
    top5: Optional[Percent] = None
    n_runs: int = Field(default=0, ge=0)
    seeds: List[int] = Field(default_factory=list)
    std: Optional[Annotated[float, Field(ge=0, le=100)]] = None
    per_seed: List[Dict[str, Any]] = Field(default_factory=list)
    # 95 % intervals (v2; None on older cards and when no per-sample outcomes were recorded)
    ci95: Optional[Interval] = None            # of `quantized`
    fp32_ci95: Optional[Interval] = None       # of `fp32`
    delta_ci95: Optional[Interval] = None      # of `delta`, from the paired outcomes on the same images
    ci_method: Optional[str] = None            # how the intervals were computed, in words
    outcomes: Optional[Outcomes] = None
    chance: Optional[ChanceCheck] = None       # whether FP32 is above chance on these images (issue 22)


class CostLayer(Open):
    name: str
    op: str
    macs: Optional[int] = None
    params: Optional[int] = None
    weight_bits: Optional[float] = None
    activation_bits: Optional[float] = None
    bops: Optional[float] = None
    cycles: Optional[float] = None
    energy_pj: Optional[float] = None
    effective_activation_bits: Optional[float] = None


class Cost(Open):
    profile: Optional[str] = None
    params: Optional[int] = None
    size_bits: Optional[float] = None
    size_bits_with_metadata: Optional[float] = None
    macs: Optional[int] = None
    bops: Optional[float] = None
    bops_uniq: Optional[float] = None
    activation_peak_bits: Optional[float] = None
    memory_traffic_bits: Optional[float] = None
    energy_pj: Optional[float] = None
    latency_cycles: Optional[float] = None
    speedup_vs_fp32: Optional[float] = None
    speedup_vs_int8: Optional[float] = None
    layers: List[CostLayer] = Field(default_factory=list)


class PointMemory(Closed):
    """Peak memory of one point (qcard.provenance.PeakMemory), in MB (10^6 bytes)."""
    peak_rss_mb: Optional[float] = None
    rss_start_mb: Optional[float] = None
    peak_gpu_mb: Optional[float] = None       # CUDA only
    how: str = ""


class DataLoading(Closed):
    """How the point's images were loaded (qcard.data.loaders); results do not depend on it."""
    setting: Union[int, str]                  # the config's dataset.num_workers: an int or "auto"
    num_workers: Optional[int] = None         # as resolved for the evaluation data
    pin_memory: bool = False
    persistent_workers: bool = True
    cores: Optional[int] = None


class Provenance(Closed):
    qcard_version: str
    git_commit: Optional[str] = None
    git_dirty: Optional[bool] = None
    python: str
    torch: Optional[str] = None
    torchvision: Optional[str] = None
    timm: Optional[str] = None
    platform: str
    cpu: Optional[str] = None
    gpu: Optional[str] = None
    torch_threads: Optional[int] = None        # intra-op threads (None on cards written before it was recorded)
    seed: Optional[int] = None
    deterministic: Optional[bool] = None
    config_sha256: Optional[str] = None
    command: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    wall_seconds: Optional[float] = None
    timings: Dict[str, float] = Field(default_factory=dict)
    # seeds whose method went on from a checkpoint inside the point (qcard.checkpoint): [{seed, step}],
    # with "stage" for a method's named loop (e.g. a reconstruction)
    resumed: Optional[List[Dict[str, Union[int, str]]]] = None
    memory: Optional[PointMemory] = None      # cards written before peak memory was recorded have none
    data_loading: Optional[DataLoading] = None


class TableSection(Closed):
    """A method's table: plain-text cells, already formatted (every rendering escapes them)."""
    kind: Literal["table"] = "table"
    title: str
    note: Optional[str] = None
    columns: List[Tuple[str, Literal["l", "r"]]]          # (heading, alignment)
    rows: List[List[str]] = Field(default_factory=list)
    left_out: int = 0                                      # rows not shown (card.json's method_stats has them)

    @field_validator("rows", mode="before")
    @classmethod
    def _cells_as_text(cls, rows: Any) -> Any:
        """A number in a cell is shown as Python prints it (a method may format its own)."""
        if isinstance(rows, list):
            return [[c if isinstance(c, str) else ("—" if c is None else str(c)) for c in row]
                    if isinstance(row, (list, tuple)) else row for row in rows]
        return rows


class BarSegment(Closed):
    label: str
    values: List[float]                  # one per bar
    color: Optional[str] = None          # a color name or #rrggbb; else `shade` on the viridis scale
    shade: Optional[float] = None


class Series(Closed):
    name: str
    x: List[float]
    y: List[float]


class PlotSection(Closed):
    """A method's plot as data; cards/plots.py draws each chart kind the same way for every method:
      stacked_bars  one horizontal bar per label, made of segments (fractions or counts)
      step_heatmap  one row per series; a value holds from its x until the series' next x
      lines         one line per series over x"""
    kind: Literal["plot"] = "plot"
    id: str
    title: str
    caption: str = ""
    chart: Literal["stacked_bars", "step_heatmap", "lines"]
    labels: List[str] = Field(default_factory=list)
    segments: List[BarSegment] = Field(default_factory=list)
    series: List[Series] = Field(default_factory=list)
    x_label: Optional[str] = None
    y_label: Optional[str] = None
    value_label: Optional[str] = None
    x_range: Optional[Tuple[float, float]] = None


Section = Annotated[Union[TableSection, PlotSection], Field(discriminator="kind")]


class DeployLatency(Closed):
    batch_size: int = Field(ge=1)
    runs: int = Field(ge=1)                   # timed runs after warm-up; the figures are their medians
    int8_ms: Optional[float] = None           # the QDQ model, per batch
    fp32_ms: Optional[float] = None           # the same model exported in FP32, same runtime and threads
    speedup: Optional[float] = None           # fp32_ms / int8_ms: measured
    # the spread (v2, later): quartiles over the runs, the spread of the per-run speedup ((q3-q1)/median),
    # the timed seconds, and whether the spread was still large when the time budget ended
    int8_ms_iqr: Optional[Tuple[float, float]] = None
    fp32_ms_iqr: Optional[Tuple[float, float]] = None
    speedup_iqr: Optional[Tuple[float, float]] = None
    spread: Optional[float] = None
    seconds: Optional[float] = None
    large_spread: Optional[bool] = None


class Deployment(Open):
    """The same quantized model exported (ONNX QDQ) and run on a real integer runtime (v2).
    status: ok = it ran; not_deployable = the runtime cannot run this setting as integer (reason says
    why; nothing was run as something else); failed = export or runtime error (reason)."""
    status: Literal["ok", "not_deployable", "failed"]
    reason: Optional[str] = None
    runtime: str = "onnxruntime"
    runtime_version: Optional[str] = None
    execution_provider: Optional[str] = None
    opset: Optional[int] = None
    threads: Optional[int] = None
    export: Dict[str, Any] = Field(default_factory=dict)       # how the graph was built; approximations made
    integer_ops: Dict[str, int] = Field(default_factory=dict)  # op type -> count of integer kernels that ran
    float_ops: Dict[str, int] = Field(default_factory=dict)    # compute ops left in float after fusion
    eval_size: Optional[int] = None
    top1: Optional[Percent] = None            # on the runtime, same images as the simulation
    top1_simulated: Optional[Percent] = None  # the simulated model of the same seed on the same images
    argmax_agreement: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    logit_diff_max_steps: Optional[float] = None    # |runtime - simulated| logits, in output quantization steps
    logit_diff_mean_steps: Optional[float] = None
    latency: List[DeployLatency] = Field(default_factory=list)
    simulated_speedup: Optional[float] = None       # the card's cost.speedup_vs_fp32, for the side-by-side
    notes: List[str] = Field(default_factory=list)
    # share of the conv/gemm/matmul MACs on integer kernels: {share, integer, float, float_ops, float_layers, ...}
    integer_macs: Optional[Dict[str, Any]] = None
    # the simulated outputs on the deploy images: {argmax_classes, constant, zero, top_class}; agreement on
    # outputs that do not vary says nothing (agreement_note says why)
    simulated_outputs: Optional[Dict[str, Any]] = None
    agreement_informative: Optional[bool] = None
    agreement_note: Optional[str] = None


def card_sections_adapter() -> TypeAdapter:
    """Validates a list of sections (what Method.card_sections returns)."""
    return TypeAdapter(List[Section])


class Card(Closed):
    schema_version: Literal["2"] = CARD_SCHEMA_VERSION
    id: str
    experiment: str
    description: Optional[str] = None      # the config's description (v2)
    status: Literal["ok", "failed"]
    error: Optional[str] = None
    model: ModelBlock
    dataset: DatasetBlock
    method: MethodBlock
    quantization: Quantization
    results: Results
    cost: Cost
    cost_profiles: Dict[str, Cost] = Field(default_factory=dict)  # further profiles named in the config
    method_stats: Dict[str, Any] = Field(default_factory=dict)
    # the method's own tables and plots (Method.card_sections); None on cards written before them
    sections: Optional[List[Section]] = None
    deployment: Optional[Deployment] = None     # None: no deploy check was asked for
    warnings: List[str] = Field(default_factory=list)
    provenance: Provenance
    reproduce: str
    # the fully resolved point (config.Point.resolved()): what `qcard verify` reruns; None on v1 cards
    point: Optional[Dict[str, Any]] = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _upgrade(data: Dict[str, Any]) -> Dict[str, Any]:
    """Bring an older card up to the current schema, one version at a time."""
    if "schema_version" not in data:
        raise QcardError("not a qcard card: it has no 'schema_version' (card.json files written by "
                         "`qcard run` have one)")
    version = str(data["schema_version"])
    if version == "1":
        # 1 -> 2 only added optional blocks (outcomes and intervals, deployment, point, description, label):
        # a v1 card reads as a v2 card without them
        data = {**data, "schema_version": "2"}
        version = "2"
    if version == CARD_SCHEMA_VERSION:
        return data
    raise QcardError(f"card schema version '{version}' is not known to this qcard (it reads versions: "
                     f"{', '.join(KNOWN_SCHEMA_VERSIONS)}); upgrade qcard to read it")


def card_from_dict(data: Dict[str, Any], source: str = "<card>") -> Card:
    if not isinstance(data, dict):
        raise QcardError(f"{source}: a card must be a JSON object")
    try:
        data = _upgrade(data)
    except QcardError as exc:
        raise QcardError(f"{source}: {exc}") from None
    try:
        return Card.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10])
        raise QcardError(f"{source}: not a valid qcard card: {problems}") from None


def load_card(path: Union[str, Path], *, check_evidence: bool = True) -> Card:
    """The card in a card.json file, upgraded to the current schema. With check_evidence (the default) its
    figures are recomputed from its per-sample outcomes (cards.evidence): a card that disagrees with its own
    evidence is an EvidenceError (a QcardError) naming the file, the field and both values."""
    path = Path(path)
    if not path.is_file():
        raise QcardError(f"card file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise QcardError(f"cannot read card {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QcardError(f"{path}: not valid JSON ({exc})") from None
    card = card_from_dict(data, str(path))
    if check_evidence:
        from .evidence import require_evidence
        require_evidence(card, str(path))
    return card


def card_json_schema() -> Dict[str, Any]:
    schema = Card.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"qcard quantization card, schema version {CARD_SCHEMA_VERSION}"
    return schema
