"""Published reference rows (literature.yaml, shipped with the package): shown beside measured cards,
always marked with their source, never mixed with measured rows. Each row carries its dataset (the file's
`dataset:` unless the row names its own); rows are matched to cards of that dataset only (card_dataset),
so ImageNet figures are not put beside a 3-class run.

Two kinds of row, told apart by the method name alone (one fact, one place):
  - kind "reported": a simulated (fake-quantized) accuracy, the usual paper figure; reference_rows().
  - kind "runtime": a method named `runtime-...` (e.g. runtime-int8-tensorrt), the top-1 of a real
    integer engine, not a simulation; runtime_reference_rows() only, so that it is shown beside
    deploy results and never inside the simulated table, the Pareto plot or the reported export.
`fp32` and `w_granularity` may be absent (a runtime page states no FP32; some sources do not state the
granularity): delta is then None, and the granularity None means "not stated" (never guessed)."""
from __future__ import annotations

import numbers
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, get_args

from ..errors import QcardError
from ..quant.qspec import Granularity

LITERATURE = Path(__file__).parent / "literature.yaml"
ROW_KEYS = ("source", "model", "method", "w_bits", "a_bits", "top1")      # every row has these
OPTIONAL_KEYS = ("fp32", "w_granularity", "dataset")                        # absent: not stated by the source
IMAGENET = "ImageNet-1k"
RUNTIME_PREFIX = "runtime-"       # a method named so is a real-engine figure (kind "runtime")
REPORTED, RUNTIME = "reported", "runtime"
NOT_STATED = "not stated"         # a row's granularity in words when its source does not give it


def row_kind(method: str) -> str:
    """'runtime' for a real-engine figure (method runtime-...), else 'reported' (a simulated figure)."""
    return RUNTIME if str(method).startswith(RUNTIME_PREFIX) else REPORTED


def card_dataset(dataset: Dict[str, Any], num_classes: Optional[int] = None) -> str:
    """The dataset a card was evaluated on, in reference-row terms: "ImageNet-1k" for the 1,000-class
    ImageNet (an image folder of wnid folders mapped with class_map: imagenet, or a reference naming
    ImageNet), else the card's own dataset reference (with its class count where that tells a subset)."""
    ref = str(dataset.get("ref") or "")
    info = dataset.get("split_info") or {}
    cmap = info.get("class_map") or {}
    classes = cmap.get("folder_classes") if cmap else (num_classes or info.get("num_classes"))
    if (cmap.get("kind") == "imagenet" or "imagenet" in ref.lower()) and classes in (None, 1000):
        return IMAGENET
    return f"{ref} ({classes} classes)" if classes else ref


def model_key(ref: str) -> str:
    """The bare architecture name of a model reference, for matching published rows:
    'torchvision:resnet18' -> 'resnet18', 'timm:resnet50.a1_in1k' -> 'resnet50',
    'python:my.models:ResNet18' -> 'resnet18', 'weights/mobilenet_v2.pt' -> 'mobilenet_v2'."""
    name = str(ref).strip()
    name = name.rsplit(":", 1)[-1]
    name = re.split(r"[\\/]", name)[-1]
    name = name.split(".")[0] if not name.endswith((".pt", ".pth", ".safetensors")) else name.rsplit(".", 1)[0]
    return name.lower().replace("-", "_")


def _check_row(path: str, i: int, row: Any, sources: Dict[str, str], dataset: Any) -> None:
    where = f"{path}: rows[{i}]"
    if not isinstance(row, dict):
        raise QcardError(f"{where} is not a mapping of {', '.join(ROW_KEYS)}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise QcardError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(row) - set(ROW_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise QcardError(f"{where} has unknown keys {', '.join(unknown)}; allowed: "
                         f"{', '.join(ROW_KEYS + OPTIONAL_KEYS)}")
    if row["source"] not in sources:
        raise QcardError(f"{where} names source '{row['source']}', which is not under 'sources'")
    if not (row.get("dataset") or dataset):
        raise QcardError(f"{where} names no dataset, and the file has no top-level 'dataset'")
    for key in ("top1", "fp32"):
        v = row.get(key)
        if key in row and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 100):
            raise QcardError(f"{where}: {key} must be a percentage between 0 and 100, not {v!r}")
    for key in ("w_bits", "a_bits"):
        v = row[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise QcardError(f"{where}: {key} must be a positive whole number of bits, not {v!r}")
    allowed = get_args(Granularity)
    if "w_granularity" in row and row["w_granularity"] not in allowed:
        raise QcardError(f"{where}: w_granularity '{row['w_granularity']}' is not one of {', '.join(allowed)} "
                         "(leave the key out where the source does not state it)")


@lru_cache(maxsize=None)
def _load(path: str) -> Tuple[Dict[str, str], Tuple[Dict[str, Any], ...]]:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise QcardError(f"cannot read the reference rows {path}: {exc}") from None
    if not isinstance(data, dict):
        raise QcardError(f"{path}: expected a mapping with 'sources' and 'rows'")
    sources = data.get("sources") or {}
    dataset = data.get("dataset")
    rows = []
    for i, row in enumerate(data.get("rows") or []):
        _check_row(path, i, row, sources, dataset)
        rows.append({"kind": row_kind(row["method"]), "dataset": dataset, "fp32": None, "w_granularity": None,
                     **row})
    return dict(sources), tuple(rows)


def _select(kind: str, models: Optional[Iterable[str]], path: Optional[Path],
            datasets: Optional[Iterable[str]]) -> List[Dict[str, Any]]:
    sources, rows = _load(str(path or LITERATURE))
    keep = None if models is None else {model_key(m) for m in models}
    on = None if datasets is None else set(datasets)
    out = []
    for r in rows:
        if r["kind"] != kind:
            continue
        if keep is not None and model_key(r["model"]) not in keep:
            continue
        if on is not None and r["dataset"] not in on:
            continue
        delta = None if r["fp32"] is None else round(r["top1"] - r["fp32"], 2)
        out.append({**r, "delta": delta, "citation": sources[r["source"]]})
    return out


def reference_rows(models: Optional[Iterable[str]] = None, path: Optional[Path] = None,
                   datasets: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Published simulated rows, each with kind="reported", its dataset, source key and citation, and
    delta = top1 - fp32 (against that source's own FP32; None where the source gives no FP32). models:
    keep only rows whose model matches one of these references (matched by model_key); datasets: only
    rows on one of these (card_dataset); None keeps all. Runtime figures are never among them."""
    return _select(REPORTED, models, path, datasets)


def runtime_reference_rows(models: Optional[Iterable[str]] = None, path: Optional[Path] = None,
                           datasets: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Published top-1 of real integer engines (kind="runtime", method runtime-...): to be shown beside
    deploy results only, apart from the simulated rows. Same filters and fields as reference_rows."""
    return _select(RUNTIME, models, path, datasets)


def reference_sources(path: Optional[Path] = None) -> Dict[str, str]:
    return dict(_load(str(path or LITERATURE))[0])
