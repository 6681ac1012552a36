"""Hardware backend presets (qcard/presets/*.yaml): the scheme a deployment target runs, as data.

A preset fixes some method settings (`settings`: value + source) and limits others (`allowed`:
permitted values + source). Loading and checking import no torch, so `qcard presets` stays fast.

    resolve_preset("tensorrt", {"w_symmetric": False}, explicit={"w_symmetric"})
    -> ValueError: preset 'tensorrt' cannot run w_symmetric=False ...
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, get_args

import yaml

from .qspec import granularity_text

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PresetName = Literal["academic", "tensorrt", "snpe", "fbgemm", "tvm", "acl"]
PRESET_NAMES = get_args(PresetName)

__all__ = ["PRESET_DIR", "PRESET_NAMES", "PresetName", "load_preset", "list_presets", "resolve_preset",
           "describe_setting"]

_WORDS = {
    ("w_symmetric", False): "asymmetric weights", ("w_symmetric", True): "symmetric weights",
    ("a_symmetric", False): "asymmetric activations", ("a_symmetric", True): "symmetric activations",
    ("scale_format", "float"): "float scales", ("scale_format", "power_of_two"): "power-of-two scales",
    ("bn", "folded"): "batch norm folded", ("bn", "kept"): "batch norm kept",
    ("a_signed", True): "signed activations", ("a_signed", False): "unsigned activations",
}


def describe_setting(key: str, value: Any) -> str:
    if key in ("w_granularity", "a_granularity") and value is not None:
        return f"{granularity_text(value)} {'weights' if key[0] == 'w' else 'activations'}"
    return _WORDS.get((key, value), f"{key}={value}")


@functools.lru_cache(maxsize=None)
def load_preset(name: str) -> Dict[str, Any]:
    if name not in PRESET_NAMES:
        from ..errors import UnknownNameError
        raise UnknownNameError("preset", name, PRESET_NAMES)
    path = PRESET_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("name", "hardware", "sources", "settings"):
        if key not in data:
            raise ValueError(f"preset file {path} lacks '{key}'")
    for section in ("settings", "allowed"):
        for field, entry in (data.get(section) or {}).items():
            if entry.get("source") not in data["sources"]:
                raise ValueError(f"preset file {path}: {section}.{field} cites unknown source {entry.get('source')!r}")
    return data


def list_presets() -> List[Dict[str, Any]]:
    rows = []
    for name in PRESET_NAMES:
        p = load_preset(name)
        rows.append({"name": name, "hardware": p["hardware"],
                     "settings": {k: v["value"] for k, v in p["settings"].items()},
                     "allowed": {k: v["values"] for k, v in (p.get("allowed") or {}).items()}})
    return rows


def resolve_preset(name: str, values: Dict[str, Any], explicit: Iterable[str],
                   bits_in_use: Dict[str, Iterable[int]] = None) -> Dict[str, Any]:
    """The settings the preset fixes, to apply to values. Raises ValueError naming every conflict:
    an explicitly given setting that differs from the preset's, or a bit width it cannot run."""
    p = load_preset(name)
    explicit = set(explicit)
    updates: Dict[str, Any] = {}
    conflicts: List[str] = []
    for key, entry in p["settings"].items():
        want = entry["value"]
        if key in explicit and values.get(key) != want:
            conflicts.append(f"{key}={values.get(key)!r} ({describe_setting(key, values.get(key))}) but {name} runs "
                             f"{describe_setting(key, want)} [source: {p['sources'][entry['source']]}]")
        else:
            updates[key] = want
    for key, entry in (p.get("allowed") or {}).items():
        used = set((bits_in_use or {}).get(key, [values.get(key)]))
        bad = sorted(b for b in used if b is not None and b not in entry["values"])
        if bad:
            conflicts.append(f"{key}={bad[0] if len(bad) == 1 else bad} but {name} runs only {entry['values']} "
                             f"[source: {p['sources'][entry['source']]}]")
    if conflicts:
        raise ValueError(f"preset '{name}' ({p['hardware']}) cannot run these settings: " + "; ".join(conflicts)
                         + ". Remove the conflicting settings, or set preset: null to choose freely.")
    return updates
