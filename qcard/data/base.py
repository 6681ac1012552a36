"""The dataset object every source returns, subsets of it, and fingerprints.

A QDataset is a plain torch Dataset of (float32 image tensor, int label) with the facts a card
records about it: which reference and split, how the split was made, how images were preprocessed,
and a fingerprint that changes whenever any of those (or the exact items) change.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train_indices, test_indices), stratified by label, each in a seeded random order.

    Per-class test counts use largest-remainder rounding so they sum to exactly n_test. The order is
    shuffled (not sorted by index) so that the first N test items are a fair sample of every class.
    Uses numpy's legacy RandomState, whose streams are stable across numpy versions.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_test / len(labels))
    take = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - take), kind="stable")
    take[remainder_order[: n_test - int(take.sum())]] += 1
    train, test = [], []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        test.append(members[:k])
        train.append(members[k:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


class QDataset(Dataset):
    """Base class: subclasses set the attributes below and implement __len__/__getitem__."""

    ref: str
    split: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    fingerprint: str
    preprocessing: Dict[str, Any]
    split_info: Dict[str, Any]
    decodes_per_item: bool = False      # True: reading an item decodes a file (num_workers: auto gives workers)

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

    def targets(self) -> List[int]:
        """Every item's label, in order (subclasses that hold labels answer without decoding images)."""
        return [int(self[i][1]) for i in range(len(self))]

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

    def targets(self) -> List[int]:
        return self.labels.tolist()


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

    def targets(self) -> List[int]:
        labels = self.base.targets()
        return [labels[i] for i in self.indices]

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


# How `eval_size: N` picks N items when the config does not say (eval_subset: auto). Files read from class
# folders come sorted by class, so their first N would be a few classes only: take a seeded, class-stratified
# subset. The builtin sets' test splits are already a seeded stratified shuffle (and CIFAR's and synthetic
# data's orders are not by class), so their first N stay the subset, as on every card made so far.
EVAL_SUBSETS = ("first", "stratified")
EVAL_SUBSET_SEED = 0     # fixed, not the run's seed: every seed of a point is evaluated on the same images


def default_eval_subset(dataset: QDataset) -> str:
    return "stratified" if dataset.ref.startswith("imagefolder:") else "first"


def eval_subset(dataset: QDataset, size: Optional[int], how: Optional[str] = None) -> QDataset:
    """The whole dataset when size is None, else `size` items: the first ones (`how="first"`) or a seeded
    class-stratified sample (`"stratified"`); None picks default_eval_subset. The choice and the reason are
    recorded in split_info["subset"]."""
    if size is None:
        return dataset
    size = int(size)
    if size <= 0 or size > len(dataset):
        raise DatasetError(f"evaluation size {size} is not in 1..{len(dataset)} "
                           f"({dataset.ref} split '{dataset.split}' has {len(dataset)} items)")
    if size == len(dataset):
        return dataset
    chosen = how or default_eval_subset(dataset)
    if chosen not in EVAL_SUBSETS:
        raise DatasetError(f"unknown eval_subset '{chosen}'; allowed: {', '.join(EVAL_SUBSETS)}")
    if chosen == "first":
        subset = SubsetQDataset(dataset, range(size), {"kind": "first", "size": size})
    else:
        _, picked = stratified_split(np.asarray(dataset.targets()), size, EVAL_SUBSET_SEED)
        subset = SubsetQDataset(dataset, picked.tolist(), {"kind": "stratified", "size": size, "seed": EVAL_SUBSET_SEED,
                                                           "method": "per-class share, numpy RandomState"})
    # recorded, not fingerprinted: the same items chosen either way are the same evaluation set
    subset.split_info["subset"]["chosen_by"] = "config (eval_subset)" if how else "default for this dataset"
    return subset
