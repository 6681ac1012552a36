"""The ops of a model, discovered once: op kinds (kinds.py; torch-free name tables in opnames.py),
layer names (naming.py) and the op tracer (tracer.py), which the cost tracer, the fx and eager
builders, BN folding (quant/bn.py) and the methods share.

The torch-using names are loaded lazily, so that `qcard.ops.opnames` and `qcard.ops.naming` stay
importable without torch (the cost model reads them).
"""
from __future__ import annotations

from typing import Any

from .naming import LayerNamer, weight_owner

__all__ = ["trace_ops", "OpTrace", "Op", "ModuleCall", "LayerNamer", "weight_owner", "gemm_type",
           "is_batch_norm", "module_kind"]

_LAZY = {"trace_ops": "tracer", "OpTrace": "tracer", "Op": "tracer", "ModuleCall": "tracer",
         "gemm_type": "kinds", "is_batch_norm": "kinds", "module_kind": "kinds"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qcard.ops' has no attribute '{name}'")
