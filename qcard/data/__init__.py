"""Dataset references -> QDataset (torch Datasets with fingerprints and split records).

    from qcard.data import load_dataset, calibration_subset, eval_subset
    train = load_dataset("qcard:mnist5k", "train")

Names are imported lazily so that importing qcard.data (e.g. from the CLI) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_dataset": ".loader", "check_fits_model": ".loader", "list_datasets": ".catalog", "DATASETS": ".catalog",
    "QDataset": ".base", "TensorQDataset": ".base", "SubsetQDataset": ".base",
    "calibration_subset": ".base", "eval_subset": ".base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qcard.data' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
