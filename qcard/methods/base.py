"""The method protocol: every quantization method is one class behind this small interface.

A method gets the FP32 model, the point's data and its validated Params, and returns a QuantResult:
the simulated (fake-quantized) model to evaluate, the per-layer records for the cost model, and
what it did, in the card's vocabulary (qcard/cards/schema.py), read from the simulated model. The
quantization block is checked against the card schema when the QuantResult is built.

A method also owns its part of the card: `card_sections(stats)` turns its method_stats into tables
and plots (qcard.cards.schema.TableSection / PlotSection, as dicts), which the card stores and every
rendering shows; cards/ never reads a method's statistics itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:  # torch is imported lazily so `qcard methods` stays fast
    import torch

from ..errors import QcardError
from ..records import LayerRecord


class MethodParams(BaseModel):
    """Base of every method's Params: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


@dataclass
class PointData:
    """The data of one point. Calibration and training images come from the training split only."""
    train: Any                      # torch Dataset (training split)
    eval: Any                       # torch Dataset (evaluation split, possibly a subset)
    num_classes: int
    input_shape: tuple
    batch_size: int = 256
    num_workers: Any = 0            # an int or "auto" (qcard.data.loaders)
    calibration_size: int = 256
    calibration_seed: int = 0
    fingerprint: str = ""
    loaders: Any = None             # the point's qcard.data.loaders.PointLoaders: workers kept across passes

    def calibration_set(self, size: Optional[int] = None, seed: Optional[int] = None):
        """A fixed random subset of the training split (never the evaluation split)."""
        from ..data import calibration_subset
        return calibration_subset(self.train, self.calibration_size if size is None else size,
                                  self.calibration_seed if seed is None else seed)

    def loader(self, dataset, *, shuffle: bool = False, seed: int = 0, batch_size: Optional[int] = None):
        import torch
        from ..checkpoint import ResumableShuffle
        from ..data.loaders import PointLoaders
        gen = torch.Generator().manual_seed(seed)
        # shuffled: RandomSampler's order, from a sampler that a resumed training run can start mid-epoch
        sampler = ResumableShuffle(len(dataset), gen) if shuffle else None
        loaders = self.loaders if self.loaders is not None else PointLoaders(self.num_workers)
        return loaders.get(dataset, batch_size or self.batch_size, generator=gen, sampler=sampler)


@dataclass
class RunContext:
    seed: int
    device: str = "cpu"
    progress: bool = True
    log: Callable[[str], None] = print           # console messages ("layer X left in FP32 because ...")
    evaluate: Optional[Callable[..., Dict[str, float]]] = None   # evaluate(model, dataset) -> {"top1":..}
    checkpoint: Optional[Any] = None             # a qcard.checkpoint.Checkpointer: resume a long loop (None: keep none)


@dataclass
class QuantResult:
    model: Any                                   # simulated nn.Module, evaluated by the runner
    quantization: Dict[str, Any]                 # the card's "quantization" block (a dict or a cards.schema.Quantization)
    layers: List[LayerRecord] = field(default_factory=list)
    stats: Dict[str, Any] = field(default_factory=dict)   # card's method_stats
    pipeline: List[str] = field(default_factory=list)     # ordered steps actually run
    calibration: Optional[Dict[str, Any]] = None  # {split, size, seed, labels_used} or None when no data used
    warnings: List[str] = field(default_factory=list)

    def __post_init__(self):
        # the card schema's model, checked here (not after the run) so a wrong block fails at once
        from ..cards.schema import Quantization
        if isinstance(self.quantization, Quantization):
            self.quantization = self.quantization.model_dump(mode="json")
        else:
            try:
                Quantization.model_validate(self.quantization)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10])
                raise QcardError(f"the method's quantization block does not fit the card schema: {problems}") from None
            self.quantization = dict(self.quantization)     # completed below, never the method's own dict
        # no per-layer records: read them from the simulated model, or say the cost cannot be derived
        from .from_model import complete_from_model
        complete_from_model(self)


class Method:
    """Subclass, set name/family/Params, implement apply."""
    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"   # none|ptq|qat|adaptive_precision_training|sparsity_aware_ptq|other
    Params: ClassVar[type[MethodParams]] = MethodParams

    def apply(self, model: "torch.nn.Module", data: PointData, params: MethodParams, ctx: RunContext) -> QuantResult:
        raise NotImplementedError

    def card_sections(self, stats: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The card's sections for this method's statistics (the card's method_stats): tables
        {"kind": "table", "title", "note", "columns": [(heading, "l"|"r")], "rows": [[str]], "left_out"}
        and plots {"kind": "plot", "id", "title", "caption", "chart", ...} (qcard.cards.schema).
        Read only what is there: a card of an older run may lack keys. None by default."""
        return []


def card_sections_of(method: Method, stats: Dict[str, Any]) -> List[Dict[str, Any]]:
    """method.card_sections(stats), validated; statistics it cannot read give a one-line note, never
    an error (the card must render whatever a method stored)."""
    from ..cards.method_tables import note_table
    from ..cards.schema import card_sections_adapter
    title = f"{method.name or type(method).__name__} statistics"
    try:
        adapter = card_sections_adapter()
        return adapter.dump_python(adapter.validate_python(list(method.card_sections(stats or {}) or [])))
    except Exception as exc:
        return [note_table(title, exc)]
