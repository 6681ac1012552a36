"""The simulated model's description: what was built (SimInfo, LayerInfo), and its quantizers.

The builders (quant/graph.py, quant/eager.py) take the scheme itself (quant.scheme.SimScheme, which
PTQParams extends) and make each quantizer from it here. SimInfo is attached to the simulated model
as `model.qcard_sim`; the card's quantization block and the per-layer records are read from it and
from the quantizer modules it points to.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .qspec import QSpec
from .quantizer import FakeQuantize
from .ranges import make_observer
from .scheme import Override, SimScheme

__all__ = ["SimInfo", "LayerInfo", "make_weight_quantizer", "make_act_quantizer", "match_override"]


@dataclass
class LayerInfo:
    name: str                                   # record name: module path, or "<scope>.<op>"
    op: str                                     # conv2d | linear | matmul | add | concat | avgpool | ...
    kind: str                                   # gemm | matmul | attention | add | mul | concat | avgpool | maxpool | nonlinear | other
    module: Optional[nn.Module] = None          # the quantized conv/linear, for gemm layers
    weight_quantizer: Optional[FakeQuantize] = None
    input_quantizers: List[Optional[FakeQuantize]] = field(default_factory=list)
    output_quantizer: Optional[FakeQuantize] = None
    fused_act: Optional[str] = None
    bn: Optional[str] = None                    # folded | kept | None
    position: Optional[str] = None              # first | last | None
    fp32_reason: Optional[str] = None           # why this layer was left in FP32 by the settings
    override: Optional[str] = None              # the override pattern that matched it
    note: Optional[str] = None                  # a fact about how it runs, for its record (extra["note"])


@dataclass
class SimInfo:
    config: SimScheme
    graph_mode: str                             # fx | eager
    graph_mode_reason: Optional[str] = None
    layers: List[LayerInfo] = field(default_factory=list)
    act_quantizers: Dict[str, FakeQuantize] = field(default_factory=dict)
    input_quantizer: Optional[FakeQuantize] = None
    bn_sources: Dict[str, Tuple[nn.Module, Optional[str]]] = field(default_factory=dict)
    # layer name -> (conv/linear whose output, after `act`, is this layer's input) for analytic bias correction
    input_producers: Dict[str, Tuple[nn.Module, Optional[str]]] = field(default_factory=dict)
    # consecutive layer pairs that cross-layer equalization may rescale
    cle_pairs: List[Dict[str, Any]] = field(default_factory=list)
    unquantized: List[Dict[str, Any]] = field(default_factory=list)
    overrides_applied: List[Dict[str, Any]] = field(default_factory=list)
    tensor_overrides: Dict[str, str] = field(default_factory=dict)   # activation quantizer name -> pattern
    residual_add: str = "quant_all"             # what the built model actually does
    has_add: bool = False
    has_concat: bool = False
    has_avgpool: bool = False
    batch_norm: str = "none"                    # folded | kept | none (no batch norm in the model)
    cle: Dict[str, Any] = field(default_factory=lambda: {"applied": False, "bias_absorption": False})
    bias_correction: str = "none"
    mixed_precision: Dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    warnings: List[str] = field(default_factory=list)

    def gemm_layers(self) -> List[LayerInfo]:
        return [l for l in self.layers if l.kind == "gemm"]

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def weight_quantizers(self) -> List[FakeQuantize]:
        return [l.weight_quantizer for l in self.layers if l.weight_quantizer is not None]


def match_override(name: str, overrides: Sequence[Override]) -> Optional[Override]:
    """The last override whose fnmatch pattern matches the layer name (later entries win)."""
    hit = None
    for o in overrides:
        if fnmatch.fnmatchcase(name, o.pattern):
            hit = o
    return hit


def make_weight_quantizer(cfg: SimScheme, bits: int, channel_axis: int, name: str) -> FakeQuantize:
    axis = channel_axis if cfg.w_axis is None else cfg.w_axis
    spec = QSpec(bits=bits, signed=cfg.w_signed, symmetric=cfg.w_symmetric, granularity=cfg.w_granularity,
                 axis=axis, group_size=cfg.w_group_size if cfg.w_granularity == "per_group" else None,
                 scale_format=cfg.scale_format, rounding=cfg.rounding)
    fq = FakeQuantize(spec, None, channel_axis=axis, name=name)
    fq.range_setting = cfg.weight_range
    return fq


def make_act_quantizer(cfg: SimScheme, bits: int, name: str, channel_axis: Optional[int] = None,
                       range_setting: Optional[str] = None) -> FakeQuantize:
    per_channel = cfg.a_granularity == "per_channel" and channel_axis is not None
    signed = cfg.a_signed if cfg.a_signed is not None else cfg.a_symmetric
    spec = QSpec(bits=bits, signed=signed, symmetric=cfg.a_symmetric,
                 granularity="per_channel" if per_channel else "per_tensor",
                 axis=channel_axis if per_channel else 0, scale_format=cfg.scale_format)
    if cfg.dynamic_activations:
        fq = FakeQuantize(spec, None, dynamic=True, name=name)
    else:
        rs = range_setting or cfg.activation_range
        obs = make_observer(rs, axis=channel_axis if per_channel else None, percentile=cfg.percentile,
                            alpha=cfg.bn_alpha)
        fq = FakeQuantize(spec, obs, channel_axis=channel_axis if per_channel else 0, name=name)
    # symmetric grids with no explicit sign choice become unsigned where calibration sees no negatives
    fq.auto_sign = cfg.a_signed is None and cfg.a_symmetric
    return fq
