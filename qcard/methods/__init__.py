"""Quantization methods, by name. A user's own method is named 'pkg.module:Class'."""
from __future__ import annotations

from ..errors import QcardError
from ..registry import Registry

METHODS = Registry("method")
METHODS.add("fp32", "qcard.methods.fp32:FP32", "identity: the FP32 model itself, as a card")
METHODS.add("ptq", "qcard.methods.ptq:PTQ", "post-training quantization (white paper pipeline, every tradeoff a switch)")
METHODS.add("qat", "qcard.methods.qat:QAT",
            "quantization-aware training (LSQ or STE; BN static fold / keep-then-fold; white paper pipeline)")
METHODS.add("fp32_train", "qcard.methods.fp32_train:FP32Train",
            "FP32 training with a recipe: the baseline for training methods")
METHODS.add("marvin", "qcard.methods.marvin:Marvin", "MARViN: adaptive per-layer fixed-point precision during training")
METHODS.add("sparq", "qcard.methods.sparq:SPARQ", "SPARQ: sparsity-aware 4-bit activation windows on 8-bit codes")


def resolve_method(name: str):
    """The method class for a registered name or a 'pkg.module:Class' path."""
    from .base import Method
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise QcardError(f"'{name}' is not a qcard method: it must be a subclass of qcard.methods.base.Method "
                         "with a Params model and an apply(model, data, params, ctx) method")
    return cls


def with_sections(card):
    """The card with its method's sections filled in, for cards written before methods handed them
    over (sections is None). A Card gives a Card, a dict a dict; a card whose method does not resolve
    (e.g. a user's module that is not importable here) comes back as it is."""
    from ..cards.schema import Card, card_from_dict
    data = card.model_dump(mode="json") if isinstance(card, Card) else card
    if data.get("sections") is not None:
        return card
    try:
        cls = resolve_method((data.get("method") or {}).get("name") or "")
    except Exception:
        return card
    from .base import card_sections_of
    filled = {**data, "sections": card_sections_of(cls(), data.get("method_stats") or {})}
    return card_from_dict(filled) if isinstance(card, Card) else filled
