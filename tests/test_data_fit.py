"""A model on the user's own images: its own preprocessing, class and channel counts that must match,
where calibration images really came from, which images `eval_size` takes, and pretrained weights offline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qcard
from qcard.cards.schema import load_card
from qcard.data import check_fits_model, eval_subset, load_dataset
from qcard.errors import DatasetError, ModelLoadError

N_PNG = 200


@pytest.fixture(scope="module")
def mnist_pngs(tmp_path_factory):
    """The first N_PNG images of qcard:mnist5k's test split as grayscale PNGs in class folders, and their indices."""
    from PIL import Image
    from qcard.data.builtin import _mnist5k_arrays, _split
    root = tmp_path_factory.mktemp("mnist_png")
    X, y, _ = _mnist5k_arrays()
    for k, i in enumerate(_split("mnist5k")[1][:N_PNG]):
        folder = root / str(int(y[i]))
        folder.mkdir(exist_ok=True)
        Image.fromarray(X[i].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{k:04d}.png")
    return root


def _run(write_config, tmp_path, name, models, dataset, methods):
    text = (f"experiment: {name}\nout: {tmp_path / 'runs'}\nmodels: {models}\ndataset: {dataset}\n"
            f"methods: {methods}\ncost: {{profiles: [bitops]}}\n")
    summary = qcard.run(write_config(text, f"{name}.yaml"), progress=False)
    return summary, [load_card(o.folder / "card.json") for o in summary.outcomes]


def test_bundled_model_on_mnist_pngs_scores_as_on_mnist5k(mnist_pngs, write_config, tmp_path):
    """Issue 15.2: qcard:lenet5 on an imagefolder of MNIST PNGs reads them with its own preprocessing
    (1x28x28, MNIST mean/std, no resize), so top-1 equals the figure on the same mnist5k images."""
    from qcard.evaluate import evaluate
    from qcard.zoo import load_model_with_info
    summary, cards = _run(write_config, tmp_path, "png", "[qcard:lenet5]",
                          f'{{ref: "imagefolder:{mnist_pngs}", batch_size: 100, calibration: {{size: 32}}}}',
                          "[fp32, ptq]")
    assert summary.ok, [o.error for o in summary.outcomes]
    fp32 = cards[0]
    model, _ = load_model_with_info("qcard:lenet5")
    same_images = eval_subset(load_dataset("qcard:mnist5k", "test"), N_PNG, "first")
    assert fp32.results.fp32 == pytest.approx(evaluate(model, same_images)["top1"], abs=1e-9)
    pre = fp32.dataset.preprocessing
    assert "qcard:lenet5" in pre["origin"] and pre["mean"] == [0.1307] and pre["std"] == [0.3081]
    assert pre["crop"] == [28, 28] and pre["resize"] == 28 and pre["channels"] == 1
    # pixel for pixel the same tensors as qcard:mnist5k (the PNGs are in class order, file k = test item k)
    folder = load_dataset(f"imagefolder:{mnist_pngs}", "test", model_info=load_model_with_info("qcard:lenet5")[1])
    for j in (0, 57, N_PNG - 1):
        k = int(folder.folder.samples[j][0].rsplit("/", 1)[1][:4])
        assert torch.allclose(folder[j][0], same_images[k][0], atol=1e-6) and folder[j][1] == same_images[k][1]
    # Issue 15.8: the calibration row says where the images came from, and a warning says it plainly
    ptq = cards[1]
    assert "evaluated images" in ptq.dataset.calibration.split and "train" != ptq.dataset.calibration.split
    assert any("drawn from the evaluated images" in w for w in ptq.warnings)


def test_config_input_shape_with_other_channels_is_an_error(mnist_pngs):
    from qcard.zoo import load_model_with_info
    _, info = load_model_with_info("qcard:lenet5")
    with pytest.raises(DatasetError, match=r"takes 1.*drop input_shape or give \[1, H, W\]"):
        load_dataset(f"imagefolder:{mnist_pngs}", "test", model_info=info, input_shape=(3, 32, 32))


def _folder(root, classes, per_class=2, size=(24, 24)):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def resnet10t():
    from qcard.zoo import load_model_with_info
    return load_model_with_info("timm:resnet10t")[1]


@pytest.mark.parametrize("n_classes", [10, 1])
def test_class_count_mismatch_is_an_error_naming_both_and_the_fix(tmp_path, resnet10t, n_classes):
    """Issue 15.3: a 1000-output model on a 10-class or a 1-class folder scored 0 % silently."""
    root = _folder(tmp_path / "imgs", [f"c{i}" for i in range(n_classes)], per_class=1)
    ds = load_dataset(f"imagefolder:{root}", "test", model_info=resnet10t)
    with pytest.raises(DatasetError) as err:
        check_fits_model(ds, resnet10t, "timm:resnet10t")
    msg = str(err.value)
    assert "1000 outputs" in msg and f"{n_classes} class(es)" in msg and f"num_classes: {n_classes}" in msg
    assert "class_map: imagenet" in msg


def test_class_count_mismatch_fails_the_point_in_a_run(tmp_path, write_config):
    root = _folder(tmp_path / "imgs", [f"c{i}" for i in range(3)], size=(28, 28))
    summary, cards = _run(write_config, tmp_path, "mismatch", "[qcard:mlp]",
                          f'{{ref: "imagefolder:{root}", calibration: {{size: 2}}}}', "[fp32]")
    assert not summary.ok and "10 outputs" in cards[0].error and "3 class(es)" in cards[0].error


def test_imagenet_class_map_scores_wnid_folders_as_imagenet_classes(tmp_path, resnet10t):
    """A 1000-class model on a folder of a few ImageNet classes: class_map: imagenet maps each wnid
    folder to its ImageNet-1k index, and the dataset records the mapping (the card's split_info)."""
    root = _folder(tmp_path / "imgs", ["n01443537", "n01530575"], per_class=1)   # ImageNet classes 1 and 10
    ds = load_dataset(f"imagefolder:{root}", "test", model_info=resnet10t, class_map="imagenet")
    check_fits_model(ds, resnet10t, "timm:resnet10t")
    assert ds.num_classes == 1000 and ds.targets() == [1, 10] and [ds[i][1] for i in range(2)] == [1, 10]
    assert ds.split_info["class_map"]["kind"] == "imagenet" and ds.split_info["class_map"]["folder_classes"] == 2
    plain = load_dataset(f"imagefolder:{root}", "test", model_info=resnet10t)
    assert plain.fingerprint != ds.fingerprint
    bad = _folder(tmp_path / "named", ["cat", "dog"], per_class=1)
    with pytest.raises(DatasetError, match="ImageNet wnid folder names.*cat"):
        load_dataset(f"imagefolder:{bad}", "test", model_info=resnet10t, class_map="imagenet")
    with pytest.raises(DatasetError, match="imagefolder: datasets only"):
        load_dataset("qcard:mnist5k", "test", class_map="imagenet")


def test_eval_size_on_a_class_sorted_folder_is_stratified(tmp_path):
    """Issue 15.9: eval_size 20 on a folder of 10 classes x 5 took the first 4 classes; now 2 of every class,
    seeded, the choice recorded; `first` stays available, and mnist5k (already shuffled) keeps `first`."""
    root = _folder(tmp_path / "imgs", [f"c{i}" for i in range(10)], per_class=5, size=(8, 8))
    ds = load_dataset(f"imagefolder:{root}", "test", input_shape=(3, 8, 8))
    sub = eval_subset(ds, 20)
    assert np.bincount(sub.targets(), minlength=10).tolist() == [2] * 10
    assert sub.split_info["subset"]["kind"] == "stratified" and sub.split_info["subset"]["seed"] == 0
    assert sub.split_info["subset"]["chosen_by"] == "default for this dataset"
    assert eval_subset(ds, 20).indices == sub.indices and eval_subset(ds, 20).fingerprint == sub.fingerprint
    first = eval_subset(ds, 20, "first")
    assert sorted(set(first.targets())) == [0, 1, 2, 3] and first.split_info["subset"]["chosen_by"].startswith("config")
    mnist = load_dataset("qcard:mnist5k", "test")
    assert eval_subset(mnist, 100).indices == list(range(100))


def test_eval_subset_key_in_a_run_is_recorded_on_the_card(tmp_path, write_config):
    root = _folder(tmp_path / "imgs", [f"c{i}" for i in range(4)], per_class=3, size=(28, 28))
    # 4 classes for a 10-output model: the class check would refuse it, so this one has 4 outputs
    models = '[{ref: "python:user_models:tiny_net", num_classes: 4, input_shape: [1, 28, 28]}]'
    dataset = f'{{ref: "imagefolder:{root}", eval_size: 8, calibration: {{size: 2}}}}'
    summary, cards = _run(write_config, tmp_path, "sub", models, dataset, "[fp32]")
    assert summary.ok, [o.error for o in summary.outcomes]
    subset = cards[0].dataset.split_info["subset"]
    assert subset["kind"] == "stratified" and subset["size"] == 8 and cards[0].dataset.eval_size == 8


def test_pretrained_weights_offline_fail_fast_and_suggest_a_file(tmp_path, monkeypatch):
    """Issue 15.16: no cache and no network: one quick check, then an error that says `weights: PATH`;
    timm's downloader (which retries for about a minute) is never called."""
    import timm.models._builder as builder
    import qcard.zoo.loader as loader
    monkeypatch.setenv("HF_ENDPOINT", "https://qcard-offline-test.invalid")   # .invalid never resolves
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loader, "HUB_PROBE_TIMEOUT", 2.0)
    calls = []
    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: calls.append(a) or 1 / 0)
    with pytest.raises(ModelLoadError) as err:
        loader.load_model_with_info("timm:resnet10t", pretrained=True)
    assert "qcard-offline-test.invalid cannot be reached" in str(err.value)
    assert "weights: PATH" in str(err.value) and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")      # offline mode: no connection attempted at all
    monkeypatch.setattr(loader, "_reachable", lambda *a: pytest.fail("probed although offline"))
    with pytest.raises(ModelLoadError, match="offline mode"):
        loader.load_model_with_info("timm:resnet10t", pretrained=True)


def test_output_width_is_measured_and_unreadable_images_are_named(tmp_path):
    """The class count is the model's real output width (not a guess from its last Linear); a model
    that cannot take the images fails with their shape, not a raw torch error mid-method."""
    from torch import nn
    from qcard.zoo import load_model_with_info
    root = _folder(tmp_path / "imgs", ["a", "b", "c"], per_class=1, size=(32, 32))
    model, info = load_model_with_info("python:user_models:tiny_net", num_classes=3)
    ds = load_dataset(f"imagefolder:{root}", "test", model_info=info, input_shape=(1, 28, 28))
    check_fits_model(ds, info, "python:user_models:tiny_net", model)
    # a head that is not the last Linear registered: 3 outputs really, though the last Linear has 7
    odd = nn.Sequential(nn.Flatten(1), nn.Linear(784, 3))
    odd.add_module("unused", nn.Linear(3, 7))
    odd.forward = lambda x: odd[1](odd[0](x))
    check_fits_model(ds, {"num_classes": 7}, "python:odd", odd)
    big = load_dataset(f"imagefolder:{root}", "test", model_info=info, input_shape=(1, 32, 32))
    with pytest.raises(DatasetError, match=r"cannot read the images .* 1x32x32"):
        check_fits_model(big, info, "python:user_models:tiny_net", model)
