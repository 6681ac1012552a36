"""load_dataset(ref, split): one entry point for every dataset reference."""
from __future__ import annotations

from typing import Any, Optional, Tuple

from ..errors import DatasetError
from .catalog import check_dataset_ref, check_split


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

    check_split(check_dataset_ref(ref), ref, split)
    if ref.startswith("imagefolder:"):
        from .vision import load_imagefolder
        return load_imagefolder(ref, ref[len("imagefolder:"):], split, model_info, input_shape)

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
