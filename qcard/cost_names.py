"""Cheap checks of cost-profile names at config time."""
from __future__ import annotations

from pathlib import Path

from .errors import UnknownNameError

PROFILES_DIR = Path(__file__).parent / "cost" / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def check_profile(name: str) -> None:
    if name.endswith((".yaml", ".yml")):
        if not Path(name).expanduser().is_file():
            raise UnknownNameError("cost profile file", name, profile_names(), hint="a profile file path must exist")
        return
    if name not in profile_names():
        raise UnknownNameError("cost profile", name, profile_names(), hint="or give the path of a profile .yaml file")
