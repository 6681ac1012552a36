"""The method protocol: every quantization method is one class behind this small interface.

A method gets the FP32 model, the point's data and its validated Params, and returns a QuantResult:
the simulated (fake-quantized) model to evaluate, the per-layer records for the cost model, and
what it did, in the card's vocabulary (specs/card.md), read from the simulated model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported lazily so `qcard methods` stays fast
    import torch

from ..records import LayerRecord


class MethodParams(BaseModel):
    """Base of every method's Params: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


@dataclass
class PointData:
    """The data of one point. Calibration and training images come from the training split only."""
    dataset_ref: str
    train: Any                      # torch Dataset (training split)
    eval: Any                       # torch Dataset (evaluation split, possibly a subset)
    num_classes: int
    input_shape: tuple
    batch_size: int = 256
    num_workers: int = 0
    calibration_size: int = 256
    calibration_seed: int = 0
    fingerprint: str = ""

    def calibration_set(self, size: Optional[int] = None, seed: Optional[int] = None):
        """A fixed random subset of the training split (never the evaluation split)."""
        from ..data import calibration_subset
        return calibration_subset(self.train, self.calibration_size if size is None else size,
                                  self.calibration_seed if seed is None else seed)

    def loader(self, dataset, *, shuffle: bool = False, seed: int = 0, batch_size: Optional[int] = None):
        import torch
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                                           generator=gen, num_workers=self.num_workers)


@dataclass
class RunContext:
    seed: int
    device: str = "cpu"
    progress: bool = True
    log: Callable[[str], None] = print           # console messages ("layer X left in FP32 because ...")
    evaluate: Optional[Callable[..., Dict[str, float]]] = None   # evaluate(model, dataset) -> {"top1":..}
    workdir: Optional[str] = None               # point folder, for checkpoints of long methods


@dataclass
class QuantResult:
    model: Any                                   # simulated nn.Module, evaluated by the runner
    quantization: Dict[str, Any]                 # the card's "quantization" block
    layers: List[LayerRecord] = field(default_factory=list)
    stats: Dict[str, Any] = field(default_factory=dict)   # card's method_stats
    pipeline: List[str] = field(default_factory=list)     # ordered steps actually run
    calibration: Optional[Dict[str, Any]] = None  # {split, size, seed, labels_used} or None when no data used
    warnings: List[str] = field(default_factory=list)


class Method:
    """Subclass, set name/family/Params, implement apply."""
    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"   # none|ptq|qat|adaptive_precision_training|sparsity_aware_ptq|other
    Params: ClassVar[type[MethodParams]] = MethodParams

    def apply(self, model: "torch.nn.Module", data: PointData, params: MethodParams, ctx: RunContext) -> QuantResult:
        raise NotImplementedError
