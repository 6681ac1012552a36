"""The shipped MARViN configs load and expand as documented (fp32_train and marvin share one recipe)."""
from pathlib import Path

import pytest

from qcard.config import load_config
from qcard.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def registered():
    # until the lead's registry names them, register the two methods for this test only
    added = [n for n in ("marvin", "fp32_train") if n not in METHODS.names()]
    targets = {"marvin": "qcard.methods.marvin:Marvin", "fp32_train": "qcard.methods.fp32_train:FP32Train"}
    for n in added:
        METHODS.add(n, targets[n], "")
    yield
    for n in added:
        METHODS._entries.pop(n, None)
        METHODS._docs.pop(n, None)


def test_examples_marvin_yaml():
    exp = load_config(ROOT / "configs" / "examples" / "marvin.yaml")
    points = exp.points()
    assert len(points) == 4 and all(p.seeds == [0, 1, 2] for p in points)
    by = {(p.model.ref, p.method): p for p in points}
    for model in ("qcard:resnet8", "qcard:lenet5"):
        fp, mv = by[(model, "fp32_train")], by[(model, "marvin")]
        assert fp.params.train == mv.params.train and fp.params.train.from_scratch
    mv = by[("qcard:resnet8", "marvin")].params
    assert (mv.max_lookback, mv.min_lookback, mv.results_buffer, mv.kl_mode) == (100, 10, 8, "true")


def test_imagenet_marvin_cifar_yaml():
    # the python: model references are placeholders for the user's own CIFAR AlexNet / ResNet-20
    exp = load_config(ROOT / "configs" / "imagenet" / "marvin_cifar.yaml", check_files=False)
    points = exp.points()
    assert len(points) == 8
    labels = {p.method_label: p.params for p in points}
    alex, res = labels["marvin_alexnet_recipe"], labels["marvin_resnet_recipe"]
    assert (alex.results_buffer, alex.lookback_momentum, alex.min_lookback, alex.min_resolution) == (4, 0.33, 25, 50)
    assert (res.results_buffer, res.lookback_momentum, res.max_resolution) == (8, 1.0, 150)
    assert alex.train == labels["fp32_train_alexnet_recipe"].train
    assert (alex.train.batch_size, alex.train.grad_accumulation, alex.train.schedule, alex.train.l1) == (512, 4, "plateau", 1e-4)
    assert res.train.weight_decay == 1e-4 and res.train.epochs == 100
