"""Simulated hardware cost: torch-side layer tracing (trace.py, on the op tracer qcard.ops), the merge
of a method's records into the traced ones (merge.py), and a pure-Python cost model and profiles.

`trace_layers` (imports torch) is loaded lazily so that `import qcard.cost` stays light.
"""
from __future__ import annotations

from typing import Any

from .merge import merge_layer_records
from .model import apply_bits, estimate
from .profile import Profile, ProfileError, list_profiles, load_profile

__all__ = ["estimate", "apply_bits", "load_profile", "list_profiles", "Profile", "ProfileError",
           "trace_layers", "count_params", "merge_layer_records"]


def __getattr__(name: str) -> Any:
    if name in ("trace_layers", "count_params"):
        from . import trace
        return getattr(trace, name)
    raise AttributeError(f"module 'qcard.cost' has no attribute '{name}'")
