"""Random images and labels for cost-only runs and tests; deterministic from (seed, split, index)."""
from __future__ import annotations

import hashlib
from typing import Tuple

import torch

from .base import QDataset, make_fingerprint


def _base_seed(seed: int, split: str) -> int:
    # Different splits must not share images; a hash keeps (seed, split) pairs apart.
    digest = hashlib.sha256(f"qcard-synthetic:{int(seed)}:{split}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class SyntheticQDataset(QDataset):
    """Item i is N(0,1) noise from Generator(base_seed + i), so no memory is held and any item is cheap."""

    def __init__(self, split: str, input_shape: Tuple[int, int, int], num_classes: int, size: int, seed: int):
        self.ref, self.split = "synthetic", split
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes, self.size, self.seed = int(num_classes), int(size), int(seed)
        self._base = _base_seed(seed, split)
        gen = torch.Generator().manual_seed(self._base)
        self.labels = torch.randint(0, self.num_classes, (self.size,), generator=gen)
        self.preprocessing = {"distribution": "normal(0, 1)", "input_shape": list(self.input_shape)}
        self.split_info = {"method": "generated", "seed": self.seed, "size": self.size}
        items = {"seed": self.seed, "size": self.size, "num_classes": self.num_classes}
        self.fingerprint = make_fingerprint(self.ref, split, items, self.preprocessing)

    def __len__(self) -> int:
        return self.size

    def targets(self):
        return self.labels.tolist()

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            if -self.size <= index < 0:
                index += self.size
            else:
                raise IndexError(f"index {index} out of range for synthetic dataset of size {self.size}")
        gen = torch.Generator().manual_seed(self._base + 1 + int(index))
        return torch.randn(self.input_shape, generator=gen), int(self.labels[index])
