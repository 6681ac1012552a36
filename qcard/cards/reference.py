"""Published reference rows (literature.yaml, shipped with the package): shown beside measured cards,
always marked "reported" with their source, never mixed with measured rows. Each row carries its
dataset (the file's `dataset:` unless the row names its own); rows are matched to cards of that dataset
only (card_dataset), so ImageNet figures are not put beside a 3-class run."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import QcardError

LITERATURE = Path(__file__).parent / "literature.yaml"
ROW_KEYS = ("source", "model", "fp32", "method", "w_bits", "a_bits", "w_granularity", "top1")
IMAGENET = "ImageNet-1k"


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


@lru_cache(maxsize=None)
def _load(path: str) -> Tuple[Dict[str, str], Tuple[Dict[str, Any], ...]]:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise QcardError(f"cannot read the reference rows {path}: {exc}") from None
    sources = data.get("sources") or {}
    dataset = data.get("dataset")
    rows = []
    for i, row in enumerate(data.get("rows") or []):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise QcardError(f"{path}: rows[{i}] lacks {', '.join(missing)}")
        if row["source"] not in sources:
            raise QcardError(f"{path}: rows[{i}] names source '{row['source']}', which is not under 'sources'")
        if not (row.get("dataset") or dataset):
            raise QcardError(f"{path}: rows[{i}] names no dataset, and the file has no top-level 'dataset'")
        rows.append({"dataset": dataset, **row})
    return dict(sources), tuple(rows)


def reference_rows(models: Optional[Iterable[str]] = None, path: Optional[Path] = None,
                   datasets: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Published rows, each with kind="reported", its dataset, source key and citation, and delta =
    top1 - fp32 (against that source's own FP32). models: keep only rows whose model matches one of
    these references (matched by model_key); datasets: only rows on one of these (card_dataset);
    None keeps all."""
    sources, rows = _load(str(path or LITERATURE))
    keep = None if models is None else {model_key(m) for m in models}
    on = None if datasets is None else set(datasets)
    out = []
    for r in rows:
        if keep is not None and model_key(r["model"]) not in keep:
            continue
        if on is not None and r["dataset"] not in on:
            continue
        out.append({"kind": "reported", **r, "delta": round(r["top1"] - r["fp32"], 2),
                    "citation": sources[r["source"]]})
    return out


def reference_sources(path: Optional[Path] = None) -> Dict[str, str]:
    return dict(_load(str(path or LITERATURE))[0])
