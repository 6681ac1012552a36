"""MARViN: the fixed-point quantizer, the switching rules against hand-computed cases, the cost
formulas, and the method end to end on a tiny CNN (fast). The acceptance run on qcard:resnet8 is in
test_marvin_acceptance.py (slow)."""
import copy
import math

import pytest
import torch
from torch import nn

from qcard.cards.schema import Quantization
from qcard.data import calibration_subset, eval_subset, load_dataset
from qcard.methods.base import PointData, RunContext
from qcard.methods.marvin import (
    Marvin,
    StrategySchedule,
    gradient_diversity,
    kl_histograms,
    make_lost_test,
    marvin_cost,
    push_down,
    push_down_reference,
    push_up,
    push_up_step,
    reference_kl_loss,
    smallest_passing,
    training_speedup,
    update_lookback,
    update_resolution,
)
from qcard.quant.fixed_point import fixed_point_quantize, fixed_point_range

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixed point

def test_range_and_clamping():
    assert fixed_point_range(8, 4) == (-8.0, 7.9375)
    assert fixed_point_range(16, 8) == (-128.0, 128.0 - 2 ** -8)
    assert fixed_point_range(4, 4) == (-0.5, 0.4375)          # sign bit only, no integer bits
    x = torch.tensor([100.0, -100.0, 7.99, -8.3, 0.0])
    for rounding in ("nearest", "stochastic"):
        q = fixed_point_quantize(x, 8, 4, rounding=rounding, generator=torch.Generator().manual_seed(0))
        assert q.tolist() == [7.9375, -8.0, 7.9375, -8.0, 0.0]


def test_nearest_rounds_to_grid():
    x = torch.tensor([0.03, 0.04, -0.04, 0.09375, 1.0 / 3])
    q = fixed_point_quantize(x, 8, 4, rounding="nearest")
    assert q.tolist() == [0.0, 0.0625, -0.0625, 0.125, 0.3125]   # 0.09375·16 = 1.5 -> 2 (half to even)


def test_stochastic_is_on_grid_unbiased_and_seeded():
    x = torch.full((200_000,), 0.3)
    gen = torch.Generator().manual_seed(1)
    q = fixed_point_quantize(x, 8, 2, rounding="stochastic", generator=gen)
    assert set(q.unique().tolist()) == {0.25, 0.5}
    assert q.mean().item() == pytest.approx(0.3, abs=2e-3)       # P(0.5) = 0.2
    y = torch.randn(50_000) * 3
    qy = fixed_point_quantize(y, 12, 5, rounding="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(qy * 32, (qy * 32).round())
    assert (qy - y).mean().abs().item() < 2e-3                    # unbiased inside the range
    again = fixed_point_quantize(y, 12, 5, rounding="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(qy, again)
    # never above the top of the range, even from just below it
    top = torch.full((10_000,), 7.9375 - 1e-6)
    assert fixed_point_quantize(top, 8, 4, generator=torch.Generator().manual_seed(3)).max().item() == 7.9375


def test_straight_through_gradient():
    x = torch.tensor([0.1, 5.0, -20.0, 30.0], requires_grad=True)
    fixed_point_quantize(x, 8, 4).mul(torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]                # identity, as the reference
    x.grad = None
    fixed_point_quantize(x, 8, 4, ste="clipped").sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]                # zero outside [-8, 7.9375]


def test_quantizer_rejects_bad_formats():
    with pytest.raises(ValueError, match="word length"):
        fixed_point_quantize(torch.zeros(2), 0, 0)
    with pytest.raises(ValueError, match="rounding"):
        fixed_point_quantize(torch.zeros(2), 8, 4, rounding="up")


# ----------------------------------------------------------------------------- push-up

@pytest.mark.parametrize("strategy, expect", [("min", (13, 5)), ("mean", (27, 19)), ("max", (32, 24))])
def test_push_up_hand_cases_L1(strategy, expect):
    # GD = e² -> L = 1: s1 = 1, s2 = 32 − fl = 28; min 1, mean ceil(29/2) = 15, max 28 (fl capped at 32 − RB)
    assert push_up(math.exp(2), 8, 4, strategy, results_buffer=8) == expect


def test_push_up_step_hand_cases():
    gd = math.exp(1.5)                        # L = 0.5: s1 = ceil(1/0.25) = 4, s2 = ceil(32·0.25) − fl = 8 − fl
    assert [push_up_step(gd, 4, s) for s in ("min", "mean", "max")] == [4, 4, 4]
    assert [push_up_step(gd, 6, s) for s in ("min", "mean", "max")] == [2, 3, 4]
    assert [push_up_step(gd, 9, s) for s in ("min", "mean", "max")] == [0, 2, 4]   # s2 clipped at 0
    assert push_up_step(2.0, 4, "max") == 1          # GD <= e: one bit
    assert push_up_step(float("inf"), 4, "max") == 1
    assert push_up_step(math.exp(1.1), 4, "min") == 0    # L = 0.1: s1 = 100, s2 = max(1 − 4, 0)
    with pytest.raises(ValueError, match="strategy"):
        push_up_step(3.0, 4, "median")


def test_push_up_results_buffer_caps():
    assert push_up(2.0, 8, 4, "min", results_buffer=0) == (9, 5)        # wl = max(wl, fl) + 1
    assert push_up(2.0, 8, 4, "min", results_buffer=8) == (13, 5)       # wl >= fl + RB
    assert push_up(2.0, 31, 30, "min", results_buffer=8) == (32, 24)    # fl <= 32 − RB, wl <= 32
    assert push_up(2.0, 8, 4, "min", results_buffer=4, cap=12) == (9, 5)
    assert push_up(2.0, 11, 10, "min", results_buffer=4, cap=12) == (12, 8)   # a lower word-length cap


# ----------------------------------------------------------------------------- lookback, resolution, GD

def test_gradient_diversity_lookback_resolution():
    assert gradient_diversity(2, math.sqrt(2)) == pytest.approx(math.sqrt(2))   # two orthogonal unit gradients
    assert gradient_diversity(3, 3.0) == 1.0                                    # identical ones
    assert gradient_diversity(4, 0.0) == float("inf")
    assert update_lookback(10, 1.0, 10, 100, 0.33) == 40          # ceil(0.33·100 + 0.67·10)
    assert update_lookback(100, 1.0, 10, 100, 0.33) == 100        # float noise must not give 101
    assert update_lookback(100, 4.0, 10, 100, 0.33) == 76         # ceil(0.33·25 + 0.67·100)
    assert update_lookback(50, float("inf"), 10, 100, 1.0) == 10
    assert update_lookback(50, 1000.0, 10, 100, 1.0) == 10        # clipped at MIN_LOOKBACK
    assert update_resolution(5, 100, 10, 100, 1, 100) == 6
    assert update_resolution(5, 10, 10, 100, 1, 100) == 4
    assert update_resolution(1, 10, 10, 100, 1, 100) == 1
    assert update_resolution(100, 100, 10, 100, 1, 100) == 100
    assert update_resolution(7, 50, 10, 100, 1, 100) == 7


def test_strategy_escalates_and_resets():
    s = StrategySchedule("min")
    assert s.update(1.0, 2) == "min" and s.update(0.9, 2) == "min"     # not enough history yet
    assert s.update(1.0, 2) == "mean"      # 1.0 >= mean(1.0, 0.9)
    assert s.update(1.0, 2) == "max"       # 1.0 >= mean(0.9, 1.0)
    assert s.update(1.0, 2) == "max"
    assert s.update(0.5, 2) == "min"       # improved
    fixed = StrategySchedule("mean", adaptive=False)
    assert [fixed.update(v, 1) for v in (1.0, 2.0, 3.0)] == ["mean"] * 3


# ----------------------------------------------------------------------------- push-down

W5 = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])


def test_kl_test_hand_case():
    # 2 bins over [0, 1]: P = [2, 3]/5. fl = 1 keeps the bins ([0, 0, .5, 1, 1]); fl = 0 moves 0.5 to 0
    q1 = fixed_point_quantize(W5, 8, 1, rounding="nearest")
    q0 = fixed_point_quantize(W5, 8, 0, rounding="nearest")
    assert q1.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0] and q0.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert kl_histograms(W5, q1, 2) == pytest.approx(0.0, abs=1e-9)
    assert kl_histograms(W5, q0, 2) == pytest.approx(0.2 * math.log(1.5), abs=1e-6)
    lost = make_lost_test(W5, 2, mode="true", tau=1e-6)
    assert not lost(8, 1) and lost(8, 0)
    assert not make_lost_test(W5, 1, mode="true")(8, 0)        # one bin: nothing can be lost
    assert kl_histograms(torch.full((4,), 0.3), torch.zeros(4), 10) == 0.0


def test_reference_loss_hand_case():
    # kl_div(P, Q, batchmean, log_target=True) = Σ e^Q (Q − P) / bins, P = [.4, .6], Q = [.6, .4]
    q0 = fixed_point_quantize(W5, 8, 0, rounding="nearest")
    expect = (math.exp(0.6) * 0.2 + math.exp(0.4) * -0.2) / 2
    assert reference_kl_loss(W5, q0, 2) == pytest.approx(expect, abs=1e-6)
    assert reference_kl_loss(W5, W5, 2) == 0.0


def oracle(calls=None):
    # information is lost when fl < 7 or wl < fl + 3
    def lost(wl, fl):
        if calls is not None:
            calls.append((wl, fl))
        return fl < 7 or wl < fl + 3
    return lost


def test_push_down_bisection():
    calls = []
    assert push_down(16, 12, oracle(calls), fl_floor=4) == (10, 7)
    assert len(calls) <= 2 * math.ceil(math.log2(9)) + 2
    assert all(fl <= 12 and wl <= 16 for wl, fl in calls)           # never tests above the current format
    assert push_down(16, 12, lambda wl, fl: True, fl_floor=4) == (16, 12)   # only lowers
    assert push_down(16, 12, lambda wl, fl: False, fl_floor=4) == (4, 4)
    assert push_down(8, 4, oracle(), fl_floor=4) == (8, 4)
    assert push_down(8, 3, lambda wl, fl: False, fl_floor=4) == (3, 3)     # below the floor: fl kept
    for lo, hi in [(0, 0), (0, 1), (3, 17), (4, 32)]:
        for t in range(lo, hi + 1):
            assert smallest_passing(lo, hi, lambda v: v < t) == t


def test_push_down_reference_reproduces_the_code():
    # the code's fl search tests fl_min each round (-> 8, not 7) and its wl search returns the lower,
    # lossy bound (10 although wl = 10 loses information at fl = 8)
    assert push_down_reference(16, 12, oracle(), fl_floor=4) == (10, 8)
    assert push_down_reference(16, 12, lambda wl, fl: False, fl_floor=4) == (4, 4)
    # everything lossy: the correct search keeps <8, 4>, the code still lowers wl to 7
    assert push_down_reference(8, 4, lambda wl, fl: True, fl_floor=4) == (7, 4)


# ----------------------------------------------------------------------------- cost

def test_cost_uniform_precision_exact():
    layers = [{"macs": 112896, "params": 144, "wl": 16, "sparsity": 0.0},
              {"macs": 1806336, "params": 2304, "wl": 16, "sparsity": 0.0},
              {"macs": 640, "params": 650, "wl": 16, "sparsity": 0.0}]
    c16 = marvin_cost(layers)
    assert c16["inference_speedup"] == 2.0 and c16["model_size_ratio"] == 0.5
    c8 = marvin_cost([dict(l, wl=8) for l in layers])
    assert c8["inference_speedup"] == 4.0 and c8["model_size_ratio"] == 0.25
    half_sparse = marvin_cost([dict(l, sparsity=0.5) for l in layers])
    assert half_sparse["inference_speedup"] == 4.0
    mixed = marvin_cost([{"macs": 100, "params": 10, "wl": 8, "sparsity": 0.0},
                         {"macs": 300, "params": 30, "wl": 16, "sparsity": 0.0}])
    assert mixed["inference_speedup"] == pytest.approx(32 * 400 / (800 + 4800))
    assert training_speedup(sum_q=50.0, sum_f=100.0) == pytest.approx(2 * 100 / 150)
    assert training_speedup(sum_q=100.0, sum_f=100.0) == 1.0


# ----------------------------------------------------------------------------- the method on a tiny CNN

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def data():
    tr = calibration_subset(load_dataset("qcard:mnist5k", "train"), 256, seed=0)
    te = eval_subset(load_dataset("qcard:mnist5k", "test"), 200)
    return PointData(tr, te, 10, (1, 28, 28), batch_size=100)


def run_tiny(data, seed=0, **kw):
    torch.manual_seed(123)
    params = Marvin.Params(train={"epochs": 2, "batch_size": 32, "lr": 0.05, "from_scratch": True},
                           min_lookback=2, max_lookback=5, min_resolution=4, max_resolution=20, **kw)
    return Marvin().apply(TinyCNN(), data, params, RunContext(seed=seed, progress=False, log=lambda m: None))


@pytest.fixture(scope="module")
def tiny_result(data):
    return run_tiny(data)


def test_marvin_switches_inside_epochs_and_records_them(tiny_result):
    s = tiny_result.stats["marvin"]
    assert set(s["trajectories"]) == {"conv1", "conv2", "fc"}
    assert s["attached_layers"] == {"bn1": "conv1", "pool1": "conv1", "bn2": "conv2", "pool": "conv2"}
    assert s["switch_count"] == len(s["switches"]) > 0
    assert s["intra_epoch_switches"] > 0
    for layer, traj in s["trajectories"].items():
        assert traj[0] == {"step": 0, "epoch": 1, "epoch_progress": 0.0, "wl": 8, "fl": 4}
        assert [t["step"] for t in traj] == sorted(t["step"] for t in traj)
        assert traj[-1]["wl"] == s["final"][layer]["wl"] and traj[-1]["fl"] == s["final"][layer]["fl"]
    for sw in s["switches"]:
        assert sw["to"] != sw["from"] and 1 <= sw["epoch"] <= 2 and 0 < sw["epoch_progress"] <= 1
        assert sw["intra_epoch"] == (sw["epoch_progress"] < 1)
        wl, fl = sw["to"]
        assert 4 <= fl <= 24 and min(fl + 8, 32) <= wl <= 32        # fl floor, RB = 8, cap 32
    for layer, f in s["final"].items():
        assert 0 <= f["sparsity"] <= 1
        assert sum(s["time_weighted_wl"][layer].values()) == pytest.approx(1.0)
    assert s["size_ratio_weighting"] == "params"
    assert 1.0 <= s["training_speedup"] <= 2.0 and s["inference_speedup"] > 1.0
    assert sum(s["strategy_steps"].values()) == tiny_result.stats["training"]["steps"] == 16
    assert tiny_result.stats["training"]["curve"][-1]["epoch"] == 2


def test_marvin_delivers_fixed_point_weights(tiny_result):
    model, final = tiny_result.model, tiny_result.stats["marvin"]["final"]
    for name in ("conv1", "conv2", "fc"):
        m = model.get_submodule(name)
        wl, fl = final[name]["wl"], final[name]["fl"]
        lo, hi = fixed_point_range(wl, fl)
        for t in m.parameters(recurse=False):
            scaled = t.detach() * 2 ** fl
            assert torch.equal(scaled, scaled.round()) and t.min() >= lo and t.max() <= hi
        assert float((m.weight == 0).float().mean()) == pytest.approx(final[name]["sparsity"], abs=1e-6)
    skips = {n: m.fixed_point.skip_input for n, m in model.named_modules() if hasattr(m, "fixed_point")}
    assert skips == {"conv1": False, "bn1": True, "pool1": False, "conv2": False, "bn2": True, "pool": False,
                     "fc": False}           # BN's input is its conv's output, already on the same grid
    bn2 = model.get_submodule("bn2")
    scaled = bn2.weight.detach() * 2 ** final["conv2"]["fl"]
    assert torch.equal(scaled, scaled.round())         # BN parameters use the preceding layer's format
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)          # nearest rounding at inference
    assert torch.equal(copy.deepcopy(model)(x), a)


def test_marvin_records_and_card_block(tiny_result):
    recs = {r.name: r for r in tiny_result.layers}
    assert set(recs) == {"conv1", "conv2", "fc", "pool1", "pool"}
    final = tiny_result.stats["marvin"]["final"]
    for name in ("conv1", "conv2", "fc"):
        r = recs[name]
        assert r.weight_bits == r.activation_bits == final[name]["wl"] and r.macs > 0
        assert r.weight_sparsity == final[name]["sparsity"] and r.weight_bits_distribution is None
        assert "fan_in" in r.extra                 # the tracer's extra is kept (the runner replaces it)
    assert recs["pool"].op == "avgpool" and recs["pool"].weight_bits is None
    q = tiny_result.quantization
    Quantization(**q)                               # valid against the card schema
    assert q["weights"]["rounding"] == "stochastic" and q["weights"]["range_setting"] == "fixed_point"
    assert q["weights"]["scale_format"] == "power_of_two" and q["weights"]["granularity"] == "per_tensor"
    assert q["mixed_precision"]["enabled"] and q["mixed_precision"]["granularity"] == "layer"
    assert q["mixed_precision"]["max_activation_map_bits"] is None
    assert q["first_layer"]["weight_bits"] == final["conv1"]["wl"]
    assert q["last_layer"]["weight_bits"] == final["fc"]["wl"]
    assert q["batch_norm"] == "kept" and q["avg_pool"] == "requantized" and q["residual_add"] == "not_present"
    welems = {"conv1": 36, "conv2": 288, "fc": 80}
    mean = sum(final[n]["wl"] * e for n, e in welems.items()) / sum(welems.values())
    assert q["weights"]["bits"] == pytest.approx(mean, abs=1e-4)
    assert any("arbitrary word lengths" in h for h in q["hardware_unfriendly"])
    assert Marvin.family == "adaptive_precision_training"


def test_marvin_is_deterministic(data, tiny_result):
    again = run_tiny(data)
    assert again.stats["marvin"]["switches"] == tiny_result.stats["marvin"]["switches"]
    for a, b in zip(again.model.parameters(), tiny_result.model.parameters()):
        assert torch.equal(a, b)


def test_marvin_reference_mode_and_cost_of_forced_16_bits(data):
    res = run_tiny(data, kl_mode="reference")
    assert res.stats["marvin"]["kl_mode"] == "reference"
    assert sum(f["decisions"] for f in res.stats["marvin"]["final"].values()) > 0
    # fixed 16-bit formats with no sparsity give exactly 2.0 through the method's own cost path
    layers = [{"macs": r.macs, "params": r.params, "wl": 16, "sparsity": 0.0} for r in res.layers if r.macs]
    assert marvin_cost(layers)["inference_speedup"] == 2.0


def test_marvin_params_validation():
    with pytest.raises(ValueError, match="min_lookback"):
        Marvin.Params(min_lookback=50, max_lookback=10)
    with pytest.raises(ValueError, match="eval_every_epoch"):
        Marvin.Params(target_accuracy=90)
    with pytest.raises(ValueError):
        Marvin.Params(kl_mode="approx")
    p = Marvin.Params()
    assert (p.max_lookback, p.min_lookback, p.max_resolution, p.min_resolution) == (100, 10, 100, 1)
    assert (p.lookback_momentum, p.results_buffer, p.strategy, p.wl_cap, p.fl_floor) == (0.33, 8, "min", 32, 4)
    assert (p.initial_wl, p.initial_fl, p.kl_mode) == (8, 4, "true")


# ----------------------------------------------------------------------------- through the runner

def test_marvin_and_fp32_train_cards_through_the_runner(write_config, tmp_path):
    import qcard
    from qcard.cards.schema import load_card

    recipe = "{epochs: 1, batch_size: 64, max_steps: 6, from_scratch: true}"
    cfg = write_config(f"""\
experiment: mv
out: {tmp_path / "runs"}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 200, batch_size: 100}}
cost: {{profiles: [bitops]}}
methods:
  - {{name: "qcard.methods.fp32_train:FP32Train", params: {{train: {recipe}}}}}
  - {{name: "qcard.methods.marvin:Marvin", params: {{train: {recipe}, min_lookback: 2, max_lookback: 4}}}}
""")
    summary = qcard.run(cfg, progress=False)
    assert summary.ok
    cards = {c.method.name: c for c in (load_card(p) for p in sorted((tmp_path / "runs" / "mv").glob("*/card.json")))}
    assert set(cards) == {"fp32_train", "marvin"}
    fp, mv = cards["fp32_train"], cards["marvin"]
    assert fp.method.family == "none" and mv.method.family == "adaptive_precision_training"
    assert fp.method_stats["training"]["steps"] == mv.method_stats["training"]["steps"] == 6
    assert mv.method.params["train"] == fp.method.params["train"]
    stats = mv.method_stats["marvin"]
    layers = {l.name: l for l in mv.cost.layers}
    for name, f in stats["final"].items():
        assert layers[name].weight_bits == f["wl"] and layers[name].activation_bits == f["wl"]
    assert mv.quantization.mixed_precision["enabled"] is True
    assert mv.quantization.weights.rounding == "stochastic"
    assert mv.dataset.calibration.labels_used is True and mv.dataset.calibration.split == "train"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fast_cpu_fixed_point_path_is_bit_identical_to_torch_fake_quantize(rounding):
    """The CPU fast path (clamp, 1.5·2^23 rounding) gives exactly what torch's fake-quantize kernel gives,
    ties and stochastic draws from the same generator state included."""
    from qcard.quant.fixed_point import _quantize, fixed_point_range
    for wl, fl in [(2, 0), (4, 2), (8, 4), (8, -3), (12, 11), (16, 8), (22, 10)]:
        lo, hi = fixed_point_range(wl, fl)
        scale = 2.0 ** fl
        x = torch.randn(50000, generator=torch.Generator().manual_seed(wl)) * (hi - lo) * 0.7
        x[:200] = (torch.arange(-100, 100) + 0.5) / scale          # exact ties
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = x
        if rounding == "stochastic":
            ref = torch.empty_like(x).uniform_(-0.5 / scale, 0.5 / scale, generator=g1).add_(x)
        want = torch.fake_quantize_per_tensor_affine(ref, 1.0 / scale, 0, int(lo * scale), int(hi * scale))
        assert torch.equal(_quantize(x, wl, fl, rounding, g2), want), (wl, fl)


class FailingCNN(TinyCNN):
    """Raises inside the fc layer's forward at the third training forward pass."""
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 3:
                self.fc.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        return super().forward(x)


def test_failed_training_leaves_no_state_behind(data):
    import sys
    from qcard.methods.marvin.fixed_point import state_of
    model = FailingCNN()
    params = Marvin.Params(train={"epochs": 1, "batch_size": 32, "from_scratch": True}, min_lookback=2, max_lookback=5)
    with pytest.raises(RuntimeError, match="boom"):
        Marvin().apply(model, data, params, RunContext(seed=0, progress=False, log=lambda m: None))
    # nothing in the package's module globals holds a generator (no module-level run state)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("qcard.methods.marvin"):
            for value in vars(mod).values():
                assert not isinstance(value, torch.Generator), mod_name
                if isinstance(value, dict):
                    assert not any(isinstance(v, torch.Generator) for v in value.values()), mod_name
    # the layers keep their classes; the FP32 masters are back; the random source is dropped
    for name in ("conv1", "bn1", "conv2", "fc"):
        m = model.get_submodule(name)
        assert type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
        fp = state_of(m)
        assert fp.saved == {} and fp.source.generator is None
        assert all(isinstance(t, nn.Parameter) for t in m._parameters.values() if t is not None)


def test_delivered_model_pickles(tiny_result):
    import io
    buf = io.BytesIO()
    torch.save(tiny_result.model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(2, 1, 28, 28)
    back.eval()
    tiny_result.model.eval()
    with torch.no_grad():
        assert torch.equal(back(x), tiny_result.model(x))
