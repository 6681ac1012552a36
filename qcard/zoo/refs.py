"""Model references as names (no torch import): the sources, parsing, and the errors that say which
prefix or name to use. config.py checks references with check_model_ref at load time (a typo fails before any
weights load); loader.py builds the models.
"""
from __future__ import annotations

import difflib
from typing import Iterable, List, Tuple

from ..errors import ModelLoadError, QcardError, UnknownNameError
from ..registry import import_object
from .catalog import ARCHITECTURES, BUNDLED

SOURCES = ("qcard", "torchvision", "timm", "python")
REF_FORMS = "qcard:NAME, torchvision:NAME, timm:NAME or python:pkg.module:callable"


class RefError(UnknownNameError):
    """UnknownNameError with a message written here (long choice lists are cut to the closest names)."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], message: str):
        super().__init__(kind, name, choices)
        self.args = (message,)


# --------------------------------------------------------------------------- names

def torchvision_names() -> List[str]:
    import torchvision
    return list(torchvision.models.list_models())


def timm_names() -> List[str]:
    import timm
    return list(timm.list_models())


def closest(name: str, names: List[str], n: int = 8) -> List[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    low = name.lower()
    extra = [x for x in names if x.lower() == low or (len(low) >= 3 and low in x.lower())]
    seen, out = set(), []
    for x in close + sorted(extra, key=len):
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out[:n]


def unknown_model(source: str, name: str, names: List[str], lister: str) -> UnknownNameError:
    kind = f"{source} model"
    if len(names) <= 40:
        return UnknownNameError(kind, name, names)
    close = closest(name, names)
    msg = f"unknown {kind} '{name}'"
    if close:
        msg += f" (did you mean '{source}:{close[0]}'?); closest of {len(names)}: {', '.join(close)}"
    msg += f"; list all {len(names)} names with {lister}"
    return RefError(kind, name, names, msg)


def parse_ref(ref: str) -> Tuple[str, str]:
    """'source:name' -> (source, name), with errors that say which prefix to add."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError(f"a model reference must be a non-empty string ({REF_FORMS}), got {ref!r}")
    ref = ref.strip()
    if ":" not in ref:
        raise bare_name_error(ref)
    source, _, name = ref.partition(":")
    if source not in SOURCES:
        choices = [f"{s}:" for s in SOURCES]
        close = difflib.get_close_matches(source, SOURCES, n=1, cutoff=0.6)
        if close:
            msg = (f"unknown model source '{source}' in '{ref}' (did you mean '{close[0]}:{name}'?); "
                   f"choices: {', '.join(choices)}")
        else:    # most likely "pkg.module:callable" without "python:"
            msg = (f"unknown model source '{source}' in '{ref}' (did you mean 'python:{ref}'?); "
                   f"a model reference is {REF_FORMS}")
        raise RefError("model source", source, choices, msg)
    if not name:
        raise ModelLoadError(f"model reference '{ref}' has no name after '{source}:'")
    return source, name


def bare_name_error(name: str) -> UnknownNameError:
    found: List[str] = []
    if name in BUNDLED or name in ARCHITECTURES:
        found.append(f"qcard:{name}")
    tv, tm = torchvision_names(), timm_names()
    if name in tv:
        found.append(f"torchvision:{name}")
    try:
        import timm
        if timm.is_model(name):
            found.append(f"timm:{name}")
    except Exception:  # timm's parser rejects some strings; then it is simply not a timm name
        pass
    if found:
        also = f" (also available as {', '.join(repr(f) for f in found[1:])})" if len(found) > 1 else ""
        msg = (f"model reference '{name}' has no source prefix; did you mean '{found[0]}'?{also} "
               f"A model reference is {REF_FORMS}")
        return RefError("model reference", name, found, msg)
    close = ([f"qcard:{n}" for n in closest(name, list(BUNDLED) + list(ARCHITECTURES), 3)]
             + [f"torchvision:{n}" for n in closest(name, tv, 3)] + [f"timm:{n}" for n in closest(name, tm, 3)])
    msg = f"unknown model reference '{name}'"
    if close:
        msg += f" (did you mean '{close[0]}'?); close names: {', '.join(close)}"
    msg += (f". A model reference is {REF_FORMS}; bundled: {', '.join('qcard:' + n for n in BUNDLED)}; "
            f"architectures without weights: {', '.join('qcard:' + n for n in ARCHITECTURES)}")
    return RefError("model reference", name, close, msg)


def is_timm_model(name: str) -> bool:
    import timm
    try:
        return bool(timm.is_model(name))
    except Exception:  # timm's parser rejects some strings; then it is simply not a timm name
        return False


def check_model_ref(ref: str) -> Tuple[str, str]:
    """(source, name) of a reference whose name exists, without building the model or loading weights."""
    source, name = parse_ref(ref)
    if source == "qcard":
        if name not in BUNDLED and name not in ARCHITECTURES:
            raise UnknownNameError("qcard model", name, list(BUNDLED) + list(ARCHITECTURES))
    elif source == "torchvision":
        names = torchvision_names()
        if name not in names:
            raise unknown_model("torchvision", name, names, "torchvision.models.list_models()")
    elif source == "timm":
        if not is_timm_model(name):
            raise unknown_model("timm", name, timm_names(), "timm.list_models()")
    else:
        if ":" not in name:
            raise ModelLoadError(f"python model reference must be 'python:pkg.module:callable', got 'python:{name}'")
        obj = import_object(name, "model constructor")
        if not callable(obj):
            raise QcardError(f"'{name}' is not callable; it must build and return a torch.nn.Module")
    return source, name
