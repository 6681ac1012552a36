"""Model references -> nn.Module: bundled tiny models, torchvision, timm and the user's own code.

    from qcard.zoo import load_model, load_model_with_info, list_models, train_model
    model, info = load_model_with_info("qcard:resnet8")

Names are imported lazily so that importing qcard.zoo (e.g. `qcard zoo list`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": ".loader", "load_model_with_info": ".loader", "ModelInfo": ".loader",
    "parse_ref": ".refs", "check_model_ref": ".refs", "load_state_file": ".loader", "state_dict_sha256": ".loader", "SOURCES": ".refs",
    "list_models": ".catalog", "BUNDLED": ".catalog", "bundled_record": ".catalog",
    "train_model": ".train", "RECIPES": ".train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qcard.zoo' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
