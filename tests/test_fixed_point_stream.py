"""Stochastic rounding's random numbers drawn ahead (qcard.quant.fixed_point.UniformStream, issue 15
item 20): the very numbers the generator gives call by call, so MARViN's results do not change."""
import random
import threading

import pytest
import torch

from qcard.methods.marvin import MarvinController
from qcard.quant.fixed_point import UniformStream, fixed_point_quantize


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(UniformStream, "CHUNK", 1000)     # many chunk boundaries in a short test


def test_stream_gives_the_generators_numbers_in_every_path(small_chunks):
    rng = random.Random(0)
    direct, stream = torch.Generator().manual_seed(7), UniformStream(torch.Generator().manual_seed(7))
    try:
        for i in range(150):
            n = rng.choice([1, 3, 999, 1000, 1001, 2500, 70000])
            x = rng.choice([lambda: torch.randn(n) * 10,                     # contiguous
                            lambda: torch.randn(n, 2)[:, 0] * 10,             # strided
                            lambda: torch.randn(3, n).t() * 10])()            # transposed (memory order differs)
            # <8,4>: the CPU fast path; <32,31>: torch's fake-quantize path; <40,2>: the generic path
            wl, fl = rng.choice([(8, 4), (16, 8), (32, 31), (40, 2)])
            a = fixed_point_quantize(x, wl, fl, rounding="stochastic", generator=direct)
            b = fixed_point_quantize(x, wl, fl, rounding="stochastic", generator=stream)
            assert torch.equal(a, b), (i, n, wl, fl)
        tail = torch.empty(10).uniform_(-0.5, 0.5, generator=direct)
        assert torch.equal(stream.take(10), tail)
    finally:
        stream.close()


def test_close_ends_the_thread_and_other_dtypes_are_refused():
    stream = UniformStream(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="float32"):
        stream.like(torch.zeros(3, dtype=torch.float64))
    stream.close()
    assert not any(t.name == "qcard-uniform-stream" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        stream.take(UniformStream.CHUNK + 1)


def _train_marvin(seed: int):
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.marvin import Marvin
    from qcard.training import TrainRecipe
    from qcard.zoo import load_model
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    data = PointData(ds, ds, 10, (1, 28, 28), batch_size=16)
    model = load_model("qcard:lenet5")
    params = Marvin.Params(train=TrainRecipe(epochs=1, batch_size=16, max_steps=4, schedule="none", lr=0.05),
                           min_lookback=1, max_lookback=2)
    res = Marvin().apply(model, data, params, RunContext(seed=seed, progress=False, log=lambda m: None))
    return {k: v.clone() for k, v in res.model.state_dict().items()}, res.stats["marvin"]


def test_marvin_training_is_identical_with_the_stream(monkeypatch):
    ahead, ahead_stats = _train_marvin(3)
    monkeypatch.setattr(MarvinController, "draw_ahead", False)     # the plain generator, as before
    plain, plain_stats = _train_marvin(3)
    assert ahead.keys() == plain.keys()
    assert all(torch.equal(ahead[k], plain[k]) for k in ahead)
    assert ahead_stats["switch_count"] == plain_stats["switch_count"]
    assert not any(t.name == "qcard-uniform-stream" and t.is_alive() for t in threading.enumerate())


def test_results_can_be_changed_in_place_under_autograd():
    """A stream's draws are handed out as tensors of their own (not views), as uniform_ results are:
    an in-place ReLU after a quantized layer works, with the straight-through gradient."""
    stream = UniformStream(torch.Generator().manual_seed(0))
    try:
        for n in (20, 70000):
            x = torch.randn(n, requires_grad=True)
            y = fixed_point_quantize(x * 1, 8, 4, rounding="stochastic", generator=stream)
            assert y._base is None
            torch.relu_(y).sum().backward()
            assert torch.equal(x.grad, (y > 0).float())
    finally:
        stream.close()
