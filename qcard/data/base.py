"""The dataset object every source returns, subsets of it, and fingerprints.

A QDataset is a plain torch Dataset of (float32 image tensor, int label) with the facts a card
records about it: which reference and split, how the split was made, how images were preprocessed,
and a fingerprint that changes whenever any of those (or the exact items) change.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError


def sha256_json(obj: Any) -> str:
    """sha256 of a canonical JSON text (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def indices_sha256(indices: Sequence[int]) -> str:
    """sha256 of the indices as little-endian int64, so the order of items counts too."""
    arr = np.asarray(indices, dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def make_fingerprint(ref: str, split: str, items: Any, preprocessing: Dict[str, Any]) -> str:
    """Fingerprint of a dataset: its reference, split, exact items and preprocessing description."""
    return sha256_json({"ref": ref, "split": split, "items": items, "preprocessing": preprocessing})


class QDataset(Dataset):
    """Base class: subclasses set the attributes below and implement __len__/__getitem__."""

    ref: str
    split: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    fingerprint: str
    preprocessing: Dict[str, Any]
    split_info: Dict[str, Any]

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All items as (images [N,C,H,W] float32, labels [N] int64); fine for small datasets."""
        if len(self) == 0:
            return torch.empty((0, *self.input_shape)), torch.empty((0,), dtype=torch.long)
        xs, ys = zip(*(self[i] for i in range(len(self))))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    def describe(self) -> Dict[str, Any]:
        """What a card records about this dataset."""
        return {"ref": self.ref, "split": self.split, "size": len(self), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "fingerprint": self.fingerprint,
                "preprocessing": self.preprocessing, "split_info": self.split_info}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ref={self.ref!r}, split={self.split!r}, size={len(self)}, "
                f"input_shape={tuple(self.input_shape)}, num_classes={self.num_classes}, "
                f"fingerprint={self.fingerprint[:12]}…)")


class TensorQDataset(QDataset):
    """Images already decoded and preprocessed, held in memory as one tensor."""

    def __init__(self, *, ref: str, split: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 preprocessing: Dict[str, Any], split_info: Dict[str, Any], fingerprint: str):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.ref, self.split = ref, split
        self.images = images.contiguous().float()
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in images.shape[1:])
        self.preprocessing, self.split_info, self.fingerprint = preprocessing, split_info, fingerprint

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


class SubsetQDataset(QDataset):
    """Selected items of another QDataset; same split, its own fingerprint."""

    def __init__(self, base: QDataset, indices: Sequence[int], how: Dict[str, Any]):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.ref, self.split = base.ref, base.split
        self.num_classes, self.input_shape = base.num_classes, tuple(base.input_shape)
        self.preprocessing = base.preprocessing
        self.split_info = {**base.split_info, "subset": {**how, "size": len(self.indices),
                                                         "of": len(base), "base_fingerprint": base.fingerprint}}
        self.fingerprint = sha256_json({"base": base.fingerprint, "subset": how,
                                        "indices_sha256": indices_sha256(self.indices)})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.base, TensorQDataset):
            idx = torch.tensor(self.indices, dtype=torch.long)
            return self.base.images.index_select(0, idx), self.base.labels.index_select(0, idx)
        return super().tensors()


def calibration_subset(dataset: QDataset, size: int, seed: int = 0, *, allow_non_train: bool = False) -> SubsetQDataset:
    """A fixed random subset: the first `size` items of torch.randperm(len, Generator(seed)).

    Calibration data must come from the training split, so other splits are refused unless
    allow_non_train=True is passed on purpose.
    """
    if not isinstance(dataset, QDataset):
        raise DatasetError(f"calibration_subset needs a qcard dataset, got {type(dataset).__name__}")
    if dataset.split != "train" and not allow_non_train:
        raise DatasetError(f"calibration data must come from the 'train' split, but {dataset.ref} is split "
                           f"'{dataset.split}'")
    size = int(size)
    if size <= 0 or size > len(dataset):
        raise DatasetError(f"calibration size {size} is not in 1..{len(dataset)} "
                           f"({dataset.ref} split '{dataset.split}' has {len(dataset)} items)")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(dataset), generator=gen)[:size].tolist()
    return SubsetQDataset(dataset, perm, {"kind": "random", "seed": int(seed), "method": "torch.randperm"})


def eval_subset(dataset: QDataset, size: Optional[int]) -> QDataset:
    """The first `size` items (deterministic), or the whole dataset when size is None."""
    if size is None:
        return dataset
    size = int(size)
    if size <= 0 or size > len(dataset):
        raise DatasetError(f"evaluation size {size} is not in 1..{len(dataset)} "
                           f"({dataset.ref} split '{dataset.split}' has {len(dataset)} items)")
    if size == len(dataset):
        return dataset
    return SubsetQDataset(dataset, range(size), {"kind": "first", "size": size})
