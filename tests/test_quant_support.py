"""Shared helpers for the quantization tests (small models, bundled data). Holds one self-check."""
from __future__ import annotations

import functools

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def bundled(name):
    """A bundled model; its weights ship with qcard, so a load failure fails the test (no skip)."""
    from qcard.zoo import load_model
    return load_model(f"qcard:{name}")


def one_thread():
    """Context for CPU work: one thread (small ops with two threads crawl on a shared machine)."""
    class _T:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *a):
            torch.set_num_threads(self.n)
    return _T()


class Branchy(nn.Module):
    """Every placement rule in one small net: conv-bn-relu, max-pool, concat, residual add, GELU,
    sigmoid gate (x * sigmoid), average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(16, 8, 1)
        self.act = nn.GELU()
        self.gate = nn.Conv2d(8, 8, 1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        y = self.act(self.mix(y)) + x
        y = y * torch.sigmoid(self.gate(y))
        return self.fc(torch.flatten(self.avg(y), 1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        if float(y.mean()) > -1.0:          # a Python branch on a value
            y = y + self.conv2(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics so folding is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


@torch.no_grad()
def reestimate_bn(model: nn.Module, shape, batches: int = 3, seed: int = 0) -> nn.Module:
    """Random-init torchvision/timm nets have vanishing activations in eval mode; re-estimating the
    BN statistics on random data (train-mode passes) gives them realistic ranges."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    for _ in range(batches):
        model(torch.randn(8, *shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=None)
def mnist():
    """(train images, train labels, test images, test labels) of qcard:mnist5k."""
    from qcard.data import load_dataset
    train = load_dataset("qcard:mnist5k", "train")
    test = load_dataset("qcard:mnist5k", "test")
    return (*train.tensors(), *test.tensors())


def point_data(calibration_size: int = 256):
    from qcard.data import load_dataset
    from qcard.methods.base import PointData
    train = load_dataset("qcard:mnist5k", "train")
    test = load_dataset("qcard:mnist5k", "test")
    return PointData(train=train, eval=test, num_classes=10,
                     input_shape=(1, 28, 28), calibration_size=calibration_size, calibration_seed=0)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for xb, yb in zip(x.split(500), y.split(500)):
        correct += int((model(xb).argmax(-1) == yb).sum())
    return 100.0 * correct / len(y)


def run_ptq(model, calibration_size: int = 256, **params):
    from qcard.methods.base import RunContext
    from qcard.methods.ptq import PTQ, PTQParams
    ctx = RunContext(seed=0, progress=False, log=lambda msg: None)
    return PTQ().apply(model, point_data(calibration_size), PTQParams(**params), ctx)


def test_helpers_build_what_they_promise():
    with one_thread():
        m = randomize_bn(Branchy()).eval()
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        try:
            torch.fx.symbolic_trace(Untraceable())
            traced = True
        except Exception:
            traced = False
        assert not traced
