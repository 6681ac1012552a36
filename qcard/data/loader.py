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
                 num_classes: Optional[int] = None, size: Optional[int] = None, seed: int = 0,
                 class_map: Optional[str] = None):
    """A QDataset for `ref` and `split` (see DATASETS). Raises UnknownNameError / DatasetError.

    class_map="imagenet" (image folders only): folder names are ImageNet wnids, labels are their ImageNet-1k
    class indices, so a 1000-class model can be evaluated on a folder of a few ImageNet classes."""
    if not isinstance(ref, str) or not ref:
        raise DatasetError(f"a dataset reference must be a non-empty string, got {ref!r}")
    if size is not None and ref != "synthetic":
        raise DatasetError(f"'size' applies to the synthetic dataset only, not {ref}; "
                           "use the evaluation or calibration size to take fewer items")

    check_split(check_dataset_ref(ref), ref, split)
    if class_map is not None and not ref.startswith("imagefolder:"):
        raise DatasetError(f"class_map applies to imagefolder: datasets only, not {ref}")
    if ref.startswith("imagefolder:"):
        from .vision import load_imagefolder
        return load_imagefolder(ref, ref[len("imagefolder:"):], split, model_info, input_shape, class_map)

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


def model_outputs(model: Any, dataset: Any, model_ref: str) -> Optional[int]:
    """How many scores the model gives for one image of `dataset` (None when its output is not [N, classes]).

    Measured, not guessed from the last Linear layer; a model that cannot read the images at all fails here,
    with the shapes named, instead of in the middle of a method."""
    import torch
    x, _ = dataset[0]
    param = next(iter(model.parameters()), None)
    try:
        with torch.no_grad():
            out = model(x.unsqueeze(0).to(param.device if param is not None else "cpu"))
    except Exception as exc:  # any shape or dtype mismatch inside the user's model
        raise DatasetError(f"{model_ref} cannot read the images of {dataset.ref} (one image is "
                           f"{'x'.join(map(str, x.shape))}): {type(exc).__name__}: {exc}") from exc
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def check_fits_model(dataset: Any, model_info: Any, model_ref: str, model: Any = None) -> None:
    """Refuse data the model cannot read right: a channel count or a class count that differs from the
    model's (a 1000-class model on a 10-class folder scores 0 % without any other sign). With `model`, the
    class count is the width of its output on one image, else the one its ModelInfo records."""
    shape = _model_attr(model_info, "input_shape")
    if shape is not None and int(shape[0]) != int(dataset.input_shape[0]):
        raise DatasetError(f"{model_ref} takes {shape[0]}-channel images but {dataset.ref} gives "
                           f"{dataset.input_shape[0]}-channel ones ({'x'.join(map(str, dataset.input_shape))}); use "
                           f"a model with in_chans: {dataset.input_shape[0]} (and weights that fit) or another dataset")
    try:
        n_model = model_outputs(model, dataset, model_ref) if model is not None and len(dataset) else None
    except DatasetError as exc:
        raise DatasetError(f"{exc}{_size_hint(shape, dataset, model_ref)}") from exc
    n_model = n_model if n_model is not None else _model_attr(model_info, "num_classes")
    if n_model is None or int(n_model) == int(dataset.num_classes):
        return
    fix = f"set the model's `num_classes: {dataset.num_classes}` (a new classifier: train it or give weights: PATH)"
    if getattr(dataset, "target_map", "no map") is None and int(n_model) == 1000:
        fix += (", or, if the class folders are ImageNet classes named by wnid (n01440764, ...), set the "
                "dataset's `class_map: imagenet`")
    raise DatasetError(f"{model_ref} has {n_model} outputs but {dataset.ref} has {dataset.num_classes} class(es): "
                       f"every label would be scored against the wrong output; {fix}")


def _size_hint(shape: Any, dataset: Any, model_ref: str) -> str:
    """What to do when the model was built for another image size (e.g. qcard:lenet5, 1x28x28, on the
    8x8 images of qcard:digits): name both sizes and the ways out."""
    if shape is None or tuple(int(s) for s in shape) == tuple(dataset.input_shape):
        return ""
    want, got = "x".join(map(str, shape)), "x".join(map(str, dataset.input_shape))
    return (f". {model_ref} was built for {want} images and {dataset.ref} gives {got}: use a dataset of "
            f"{want} images (an image folder is resized to the model's input), or a model built for {got} "
            f"images (your own: ref: python:module:callable)")
