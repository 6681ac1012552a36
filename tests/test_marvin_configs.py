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
    # the reference's CIFAR AlexNet / ResNet-20 ship as qcard architectures; the data is the user's
    exp = load_config(ROOT / "configs" / "imagenet" / "marvin_cifar.yaml", check_files=False)
    assert {p.model.ref for p in exp.points()} == {"qcard:alexnet_cifar", "qcard:resnet20_cifar"}
    points = exp.points()
    assert len(points) == 8
    labels = {p.method_label: p.params for p in points}
    alex, res = labels["marvin_alexnet_recipe"], labels["marvin_resnet_recipe"]
    assert (alex.results_buffer, alex.lookback_momentum, alex.min_lookback, alex.min_resolution) == (4, 0.33, 25, 50)
    assert (res.results_buffer, res.lookback_momentum, res.max_resolution) == (8, 1.0, 150)
    assert alex.train == labels["fp32_train_alexnet_recipe"].train
    assert (alex.train.batch_size, alex.train.grad_accumulation, alex.train.schedule, alex.train.l1) == (512, 4, "plateau", 1e-4)
    assert res.train.weight_decay == 1e-4 and res.train.epochs == 100


@pytest.mark.parametrize("ref", ["qcard:alexnet_cifar", "qcard:resnet20_cifar"])
def test_cifar_architectures_train_with_marvin(ref):
    """The reference's two CIFAR models build (seeded, no weights), trace, and MARViN trains them."""
    import torch
    from qcard.data import load_dataset
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.marvin import Marvin
    from qcard.zoo import load_model_with_info
    model, info = load_model_with_info(ref)
    again, _ = load_model_with_info(ref)
    assert info.weights is None and info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    tr = load_dataset("synthetic", "train", input_shape=(3, 32, 32), num_classes=10, size=64)
    te = load_dataset("synthetic", "test", input_shape=(3, 32, 32), num_classes=10, size=32)
    data = PointData(tr, te, 10, (3, 32, 32), batch_size=32)
    params = Marvin.Params(train=dict(max_steps=4, batch_size=16, optimizer="sgd", lr=0.01),
                           min_lookback=1, max_lookback=2)
    res = Marvin().apply(model, data, params, RunContext(seed=0, progress=False, log=lambda m: None))
    st = res.stats["marvin"]
    assert len(st["trajectories"]) == len([m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert st["switch_count"] > 0 and st["inference_speedup"] > 0
    assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_architecture_only_models_refuse_bundled_weights():
    from qcard.errors import QcardError
    from qcard.zoo import load_model
    with pytest.raises(QcardError, match="architecture only"):
        load_model("qcard:resnet20_cifar", weights="bundled")
    with pytest.raises(QcardError, match="depth must be 6n"):
        load_model("qcard:resnet20_cifar", depth=21)
