"""One generic registry: name -> "module:attr", imported only when asked for.

Keeping entries as strings means `qcard --help` and `qcard methods` never import torch.
A name containing ':' that is not registered is treated as a user's own "pkg.module:attr".
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Iterator

from .errors import QcardError, UnknownNameError


def import_object(path: str, kind: str = "object") -> Any:
    """Import "pkg.module:attr" (explicitly named user code; nothing else is executed)."""
    if ":" not in path:
        raise QcardError(f"{kind} '{path}' is not of the form 'pkg.module:attr'")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise QcardError(f"cannot import module '{module_name}' for {kind} '{path}': {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise QcardError(f"module '{module_name}' has no attribute '{attr}' (for {kind} '{path}')")
        obj = getattr(obj, part)
    return obj


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, str] = {}
        self._docs: Dict[str, str] = {}

    def add(self, name: str, target: str, doc: str = "") -> None:
        self._entries[name] = target
        self._docs[name] = doc

    def names(self) -> list[str]:
        return sorted(self._entries)

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._entries or ":" in name

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def target(self, name: str) -> str:
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return name
        raise UnknownNameError(self.kind, name, self._entries, hint=f"a user's own {self.kind} is named as 'pkg.module:attr'")

    def get(self, name: str) -> Any:
        return import_object(self.target(name), self.kind)
