"""Data loading of a point (issue #24 item 2): num_workers auto, workers kept across passes, results that do
not depend on the worker count, progress in images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcard.data import calibration_subset, load_dataset
from qcard.data.loaders import MAX_AUTO_WORKERS, PointLoaders, cpu_share, resolve_num_workers
from qcard.errors import DatasetError
from qcard.evaluate import evaluate

SMALL_CFG = {"data_config": {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                             "std": (0.25, 0.25, 0.25), "crop_pct": 0.875}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.RandomState(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return load_dataset(f"imagefolder:{root}", "test", model_info=SMALL_CFG)


def test_auto_workers_follow_the_data(folder):
    mnist = load_dataset("qcard:mnist5k", "test")
    assert resolve_num_workers("auto", mnist) == 0                     # in memory: workers only copy
    assert resolve_num_workers("auto", load_dataset("synthetic", "test", size=4, input_shape=(1, 4, 4),
                                                    num_classes=2)) == 0
    want = min(cpu_share() - 1, MAX_AUTO_WORKERS)
    assert resolve_num_workers("auto", folder) == want                 # JPEGs decoded per item
    # a subset (eval_size, calibration) asks the data it selects from
    assert resolve_num_workers("auto", calibration_subset(folder, 5, allow_non_train=True)) == want
    assert resolve_num_workers(3, mnist) == 3 and resolve_num_workers(0, folder) == 0
    # the point's CPU share (its torch threads, as --workers N and Ray set them) bounds the workers
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert resolve_num_workers("auto", folder) == 0
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(DatasetError, match="non-negative integer or 'auto'"):
        resolve_num_workers("many", folder)


def test_config_default_is_auto_and_not_in_the_point_id(write_config):
    from qcard.config import load_config
    text = "experiment: e\nmodels: [qcard:resnet8]\ndataset: {{ref: qcard:mnist5k{extra}}}\nmethods: [fp32]\n"
    auto = load_config(write_config(text.format(extra=""), "a.yaml"))
    two = load_config(write_config(text.format(extra=", num_workers: 2"), "b.yaml"))
    assert auto.points()[0].dataset.num_workers == "auto" and two.points()[0].dataset.num_workers == 2
    assert auto.points()[0].id == two.points()[0].id


def _tiny_model(classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, classes))


def test_results_and_global_rng_do_not_depend_on_workers(folder):
    """The same outcomes with 0 and 2 workers, kept or not, and the global RNG where a 0-worker run leaves it."""
    model = _tiny_model()
    runs = []
    for workers in (0, 2):
        torch.manual_seed(123)
        with PointLoaders(workers) as loaders:
            first = evaluate(model, folder, batch_size=5, loaders=loaders)
            second = evaluate(model, folder, batch_size=5, loaders=loaders)
        runs.append((first, second, torch.rand(1).item()))
    (a1, a2, ra), (b1, b2, rb) = runs
    assert np.array_equal(a1["correct"], b1["correct"]) and np.array_equal(b1["correct"], b2["correct"])
    assert a1["top1"] == b1["top1"] == b2["top1"] and a1["n"] == len(folder)
    assert ra == rb          # a kept loader draws from the global RNG once per pass, as a fresh one does


def test_workers_are_forked_once_per_point(folder):
    model = _tiny_model()
    with PointLoaders(2) as loaders:
        for _ in range(3):
            evaluate(model, folder, batch_size=6, loaders=loaders)
        assert loaders.forks == 1                              # three passes, one set of workers
        workers = loaders.get(folder, 6)._iterator._workers
        assert len(workers) == 2 and all(w.is_alive() for w in workers)
        loaders.get(folder, 4)                                 # another batch size: its own loader
        assert loaders.forks == 2
    assert not any(w.is_alive() for w in workers)              # close() stops them
    # shuffled loaders (training) are fresh each time: their order comes from their own generator
    with PointLoaders(2) as loaders:
        orders = [[y.tolist() for _, y in loaders.get(folder, 6, shuffle=True,
                                                      generator=torch.Generator().manual_seed(7))] for _ in range(2)]
    with PointLoaders(0) as loaders:
        serial = [y.tolist() for _, y in loaders.get(folder, 6, shuffle=True,
                                                     generator=torch.Generator().manual_seed(7))]
    assert orders[0] == orders[1] == serial


def test_pin_memory_on_cuda_only():
    assert PointLoaders("auto", "cuda").pin_memory and not PointLoaders("auto", "cpu").pin_memory
    d = PointLoaders("auto", "cpu").describe(load_dataset("qcard:digits", "test"))
    assert d["setting"] == "auto" and d["num_workers"] == 0 and d["persistent_workers"] is True


def test_progress_counts_images(folder, capsys):
    evaluate(_tiny_model(), folder, batch_size=5, progress=True, desc="bar")
    err = capsys.readouterr().err
    assert "/24.0 [" in err and "img/s" in err and "<" in err    # images done of all, images/s, ETA
