"""Checks of cost-profile names at config time (no torch import)."""
from __future__ import annotations

from pathlib import Path

from .errors import QcardError, UnknownNameError

PROFILES_DIR = Path(__file__).parent / "cost" / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def check_profile(name: str) -> None:
    """A shipped profile name (options allowed: 'systolic-ws:pe_mode=sparq') or a profile YAML file."""
    base = name.split(":", 1)[0]
    if base.endswith((".yaml", ".yml")):
        if not Path(base).expanduser().is_file():
            raise UnknownNameError("cost profile file", name, profile_names(), hint="a profile file path must exist")
    elif base not in profile_names():
        raise UnknownNameError("cost profile", base, profile_names(), hint="or give the path of a profile .yaml file")
    from .cost import load_profile
    try:
        load_profile(name)  # validates options and user files now, before anything runs
    except QcardError:
        raise
    except Exception as exc:  # a malformed user profile must still be a clear config error
        raise QcardError(f"cost profile '{name}': {exc}") from None
