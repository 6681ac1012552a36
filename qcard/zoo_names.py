"""Cheap checks of model references at config time (no weights are loaded)."""
from __future__ import annotations

from pathlib import Path

from .errors import QcardError, UnknownNameError
from .registry import import_object

WEIGHTS_DIR = Path(__file__).parent / "zoo" / "weights"


def bundled_names() -> list[str]:
    """qcard: model names: those with bundled weights and the architecture-only ones."""
    from .zoo.catalog import ARCHITECTURES
    return sorted({p.stem for p in WEIGHTS_DIR.glob("*.safetensors")} | set(ARCHITECTURES))


def check_model_ref(ref: str) -> None:
    source, _, name = ref.partition(":")
    if source == "qcard":
        names = bundled_names()
        if name not in names:
            raise UnknownNameError("bundled model", name, names)
    elif source == "torchvision":
        import torchvision
        names = torchvision.models.list_models()
        if name not in names:
            raise UnknownNameError("torchvision model", name, names)
    elif source == "timm":
        import timm
        if not timm.is_model(name):
            raise UnknownNameError("timm model", name, timm.list_models(f"*{name[:4]}*") or timm.list_models()[:50])
    elif source == "python":
        if ":" not in name:
            raise QcardError(f"'{ref}' must name a callable as 'python:pkg.module:callable'")
        obj = import_object(name, "model constructor")
        if not callable(obj):
            raise QcardError(f"'{name}' is not callable; it must build and return a torch.nn.Module")
