"""The shared training loop (qcard.training) and the fp32_train method, on a tiny model and real MNIST images."""
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from qcard.data import calibration_subset, eval_subset, load_dataset
from qcard.methods.base import PointData, RunContext
from qcard.cards.schema import unquantized_block
from qcard.methods.fp32_train import FP32Train
from qcard.training import TrainRecipe, reinitialize, shift_augment, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    tr = calibration_subset(load_dataset("qcard:mnist5k", "train"), 256, seed=0)
    te = eval_subset(load_dataset("qcard:mnist5k", "test"), 200)
    return PointData(tr, te, 10, (1, 28, 28), batch_size=100)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(1), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def ctx(seed=0):
    return RunContext(seed=seed, progress=False, log=lambda m: None)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Recorder:
    def __init__(self):
        self.events = []

    def on_train_start(self, s):
        self.events.append(("start", s.step))

    def before_forward(self, s):
        self.events.append(("fwd", s.step, s.epoch, s.batch))

    def after_backward(self, s):
        grads = [p.grad for p in s.model.parameters()]
        self.events.append(("bwd", s.step, s.epoch, s.samples, all(g is not None for g in grads)))

    def after_step(self, s):
        self.events.append(("step", s.step, s.epoch, round(s.epoch_progress, 4), s.loss))

    def on_epoch_end(self, s, row):
        self.events.append(("epoch", s.epoch, row["step"]))

    def on_train_end(self, s):
        self.events.append(("end", s.step))


def test_recipe_is_strict_and_validated():
    with pytest.raises(ValidationError, match="extra"):
        TrainRecipe(epochs=1, epoch=2)
    with pytest.raises(ValidationError):
        TrainRecipe(optimizer="rmsprop")
    with pytest.raises(ValidationError, match="beta1"):
        TrainRecipe(optimizer="adam", momentum=0)
    with pytest.raises(ValidationError):
        TrainRecipe(epochs=0)
    assert TrainRecipe().model_dump()["augment"] == "none"


def test_same_seed_same_weights_other_seed_differs(data):
    r = TrainRecipe(epochs=1, batch_size=32, augment="shift", from_scratch=True)
    a, b, c = tiny(), tiny(), tiny()
    train(a, data, r, ctx(0))
    train(b, data, r, ctx(0))
    train(c, data, r, ctx(1))
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_hooks_order_accumulation_and_epoch_positions(data):
    # 256 images, batch 32 -> 8 mini-batches per epoch; accumulation 3 -> steps of 3, 3, 2 mini-batches
    rec = Recorder()
    log = train(tiny(), data, TrainRecipe(epochs=2, batch_size=32, grad_accumulation=3), ctx(), hooks=[rec])
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("fwd") == 16 and kinds.count("bwd") == 6 and kinds.count("step") == 6
    assert kinds.count("epoch") == 2
    bwd = [e for e in rec.events if e[0] == "bwd"]
    assert [e[1] for e in bwd] == [1, 2, 3, 4, 5, 6]
    assert [e[3] for e in bwd] == [96, 96, 64, 96, 96, 64]
    assert all(e[4] for e in bwd)
    steps = [e for e in rec.events if e[0] == "step"]
    assert [e[3] for e in steps] == [0.375, 0.75, 1.0, 0.375, 0.75, 1.0]   # intra-epoch positions
    assert all(math.isfinite(e[4]) for e in steps)
    # every step's after_backward precedes its after_step
    order = [(e[0], e[1]) for e in rec.events if e[0] in ("bwd", "step")]
    assert order == [(k, i) for i in range(1, 7) for k in ("bwd", "step")]
    assert [e[2] for e in rec.events if e[0] == "epoch"] == [3, 6]
    assert log.steps == 6 and log.epochs_run == 2 and log.samples_seen == 512
    assert [r["step"] for r in log.curve] == [3, 6]


def test_grad_accumulation_equals_big_batch(data):
    # the loader's permutation does not depend on the batch size, so 2 x 16 accumulated == 1 x 32
    a, b = tiny(), tiny()
    common = dict(epochs=1, max_steps=1, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="none")
    train(a, data, TrainRecipe(batch_size=32, **common), ctx())
    train(b, data, TrainRecipe(batch_size=16, grad_accumulation=2, **common), ctx())
    assert torch.allclose(flat(a), flat(b), atol=1e-6)
    assert not torch.equal(flat(a), flat(tiny()))


def test_max_steps_stops_mid_epoch_and_curve(data):
    log = train(tiny(), data, TrainRecipe(epochs=3, batch_size=32, max_steps=5, eval_every_epoch=True), ctx())
    assert log.steps == 5 and log.stopped_by_max_steps
    assert len(log.curve) == 1 and log.curve[0]["partial_epoch"] == 0.625
    row = log.curve[0]
    assert set(row) >= {"epoch", "step", "loss", "train_acc", "eval_acc"}
    assert 0 <= row["eval_acc"] <= 100 and 0 <= row["train_acc"] <= 100
    stats = log.to_stats()
    assert stats["curve"] == log.curve and stats["recipe"]["max_steps"] == 5


def test_learns_and_eval_only_when_asked(data):
    log = train(tiny(), data, TrainRecipe(epochs=4, batch_size=32, optimizer="adam", lr=3e-3), ctx())
    assert all(r["eval_acc"] is None for r in log.curve)
    assert log.curve[-1]["loss"] < log.curve[0]["loss"]
    assert log.curve[-1]["train_acc"] > 70


@pytest.mark.parametrize("schedule, expect", [("cosine", 0.0), ("step", 0.01), ("none", 0.1), ("plateau", None)])
def test_schedules(data, schedule, expect):
    log = train(tiny(), data, TrainRecipe(epochs=2, batch_size=64, lr=0.1, schedule=schedule, step_size=1, gamma=0.1),
                ctx())
    lrs = [r["lr"] for r in log.curve]
    if expect is not None:
        assert lrs[-1] == pytest.approx(expect, abs=1e-9)
    else:
        assert lrs[-1] <= 0.1


def test_l1_penalty_enters_the_loss(data):
    common = dict(epochs=1, max_steps=2, batch_size=64, schedule="none")
    a = train(tiny(), data, TrainRecipe(**common), ctx()).curve[0]["loss"]
    b = train(tiny(), data, TrainRecipe(l1=1e-2, **common), ctx()).curve[0]["loss"]
    assert b > a + 1.0    # 1e-2 x sum|w| of ~25k weights of size ~0.02


def test_reinitialize_is_seeded_and_reports_uncovered():
    class WithBare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.pos = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.fc(x)

    a, b = WithBare(), WithBare()
    with torch.no_grad():
        b.fc.weight.add_(1.0)
    assert reinitialize(a, 5) == ["pos"]
    reinitialize(b, 5)
    assert torch.equal(a.fc.weight, b.fc.weight)
    c = WithBare()
    reinitialize(c, 6)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_shift_augment_moves_pixels_within_bounds():
    x = torch.zeros(8, 1, 9, 9) - 0.5
    x[:, 0, 4, 4] = 3.0
    gen = torch.Generator().manual_seed(0)
    y = shift_augment(x, 2, gen)
    assert y.shape == x.shape
    for img in y:
        pos = (img[0] == 3.0).nonzero()
        assert len(pos) == 1
        r, c = pos[0].tolist()
        assert abs(r - 4) <= 2 and abs(c - 4) <= 2
        assert (img == -0.5).sum() == 80      # background (the image minimum) fills the border
    moved = sum(bool((img[0, 4, 4] != 3.0)) for img in y)
    assert moved > 0
    assert torch.equal(y, shift_augment(x, 2, torch.Generator().manual_seed(0)))


def test_fp32_train_method(data):
    params = FP32Train.Params(train={"epochs": 1, "batch_size": 64, "from_scratch": True})
    res = FP32Train().apply(tiny(), data, params, ctx())
    assert res.quantization == {**unquantized_block(), "batch_norm": "none"}      # tiny() has no batch norm
    assert res.stats["training"]["curve"][0]["epoch"] == 1
    assert res.calibration == {"split": "train", "size": 256, "seed": 0, "labels_used": True, "used_for": "training"}
    assert res.pipeline == ["reinitialize", "train_fp32"]
    assert not res.model.training
    with pytest.raises(ValidationError):
        FP32Train.Params(train={"epochs": 1, "bogus": 1})


def test_evaluating_every_epoch_leaves_training_unchanged(data):
    # a Dropout model draws from the global RNG; evaluation must not shift that stream
    def drop():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(1), nn.Linear(784, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))
    a, b = drop(), drop()
    torch.manual_seed(1)
    train(a, data, TrainRecipe(epochs=2, batch_size=64), ctx())
    torch.manual_seed(1)
    log = train(b, data, TrainRecipe(epochs=2, batch_size=64, eval_every_epoch=True), ctx())
    assert log.curve[0]["eval_acc"] is not None
    assert torch.equal(flat(a), flat(b))


def test_step_curve_gives_short_runs_a_curve(data):
    """A run shorter than an epoch still records a curve: windows of optimizer steps."""
    from qcard.cards.plots import _curve
    from qcard.training import STEP_CURVE_POINTS
    st = train(tiny(), data, TrainRecipe(epochs=2, batch_size=16, max_steps=12), ctx()).to_stats()
    assert len(st["curve"]) == 1                               # one (partial) epoch
    steps = st["step_curve"]
    assert [p["step"] for p in steps] == list(range(1, 13))    # 12 steps < STEP_CURVE_POINTS: one point each
    assert all(0 < p["epoch_progress"] <= 1 and p["loss"] > 0 for p in steps)
    assert STEP_CURVE_POINTS >= 12
    curve, by_step = _curve({"method_stats": {"training": st}})
    assert by_step and curve == steps
    # a long run keeps about STEP_CURVE_POINTS points, the last step always among them
    long = train(tiny(), data, TrainRecipe(epochs=8, batch_size=8), ctx()).to_stats()
    n = len(long["step_curve"])
    assert STEP_CURVE_POINTS // 2 <= n <= STEP_CURVE_POINTS + 1 and long["step_curve"][-1]["step"] == long["steps"]
