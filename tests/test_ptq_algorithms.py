"""The PTQ algorithms against their definitions: CLE, high-bias absorption, bias correction, AdaRound,
the greedy mixed-precision allocation."""
import math

import pytest
import torch
from torch import nn

from qcard.quant.adaround import adaround
from qcard.quant.bias_correction import _relu_gauss_mean, analytic_bias_correction, empirical_bias_correction
from qcard.quant.calibrate import calibrate_activations, quant_state, set_weight_ranges, sim_info
from qcard.quant.cle import absorb_high_bias, equalize
from qcard.quant.graph import build_simulated
from qcard.quant.sensitivity import greedy_bit_allocation
from qcard.quant.scheme import SimScheme
from test_quant_support import one_thread, randomize_bn


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


class Chain(nn.Module):
    """conv-bn-relu -> depthwise conv-bn-relu6 -> conv-bn -> linear: the CLE chain of MobileNets."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.c1(x))).flatten(1))


def _chain(seed=0):
    torch.manual_seed(seed)
    m = randomize_bn(Chain(), seed)
    with torch.no_grad():      # very unequal channel ranges, as after BN folding in real MobileNets
        m.dw[0].weight.mul_(torch.logspace(-1.5, 1.0, 8).reshape(8, 1, 1, 1))
    return m.eval()


def _build(model, x, **cfg):
    return build_simulated(model, SimScheme(**cfg), x[:1], log=lambda m: None)


def test_cle_preserves_the_function_and_equalizes_ranges():
    model = _chain()
    x = torch.rand(16, 3, 8, 8) * 2                 # keeps the ReLU6 inputs below 6
    sim = _build(model, x, w_bits=4, a_bits=None)
    info = sim_info(sim)
    pairs = {(p["name1"], p["name2"]) for p in info.cle_pairs}
    assert pairs == {("c1.0", "dw.0"), ("dw.0", "pw.0")}
    before = {p["name2"]: p["m2"].weight.detach().clone() for p in info.cle_pairs}
    with quant_state(sim, weights=False), torch.no_grad():
        y0 = sim(x)
    stats = equalize(sim)
    assert stats["relu6_replaced_by_relu"] == 1
    with quant_state(sim, weights=False), torch.no_grad():
        y1 = sim(x)
    assert torch.allclose(y0, y1, atol=1e-4, rtol=1e-4)
    # after CLE each channel's range is the same in both layers of a pair: r1_i = r2_i
    for p in info.cle_pairs:
        r1 = p["m1"].weight.detach().abs().flatten(1).amax(1)
        w2 = p["m2"].weight.detach()
        r2 = w2.abs().flatten(1).amax(1) if p["m2"].groups > 1 else w2.abs().transpose(0, 1).flatten(1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-3)
    assert not torch.equal(before["dw.0"], info.cle_pairs[0]["m2"].weight)
    assert info.cle["applied"] and len(info.cle["pairs"]) == 2


class FunctionalChain(Chain):
    """The same chain with a functional relu6 between the depthwise and pointwise convolutions (the node CLE
    rewrites in the captured graph, as torchvision's MobileNet blocks write it in some versions)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Sequential(self.dw[0], self.dw[1])

    def forward(self, x):
        return self.fc(self.pw(nn.functional.relu6(self.dw(self.c1(x)))).flatten(1))


def test_cle_rewrites_a_functional_relu6_and_the_simulated_model_deep_copies():
    import copy
    torch.manual_seed(0)
    model = randomize_bn(FunctionalChain(), 0).eval()
    x = torch.rand(16, 3, 8, 8) * 2
    sim = _build(model, x, w_bits=4, a_bits=None)
    # the bookkeeping names graph nodes instead of holding them: a node drags its whole graph into a deep copy
    # (RecursionError on mobilenet_v3_small's ~220 nodes)
    assert not any(isinstance(v, torch.fx.Node) for p in sim_info(sim).cle_pairs for v in p.values())
    copy.deepcopy(sim)
    with quant_state(sim, weights=False), torch.no_grad():
        y0 = sim(x)
    stats = equalize(sim)
    assert stats["relu6_replaced_by_relu"] == 1
    targets = {n.target for n in sim.graph.nodes if n.op == "call_function"}
    assert nn.functional.relu6 not in targets and nn.functional.relu in targets
    with quant_state(sim, weights=False), torch.no_grad():
        assert torch.allclose(sim(x), y0, atol=1e-4, rtol=1e-4)


def test_high_bias_absorption():
    model = _chain()
    with torch.no_grad():            # a large positive pre-activation mean in c1: absorbable
        model.c1[1].bias.add_(3.0)
    x = torch.rand(64, 3, 8, 8) * 0.2
    sim = _build(model, x, w_bits=8, a_bits=None)
    equalize(sim)
    m1 = sim_info(sim).cle_pairs[0]["m1"]
    b_before = m1.bias.detach().clone()
    with quant_state(sim, weights=False), torch.no_grad():
        y0 = sim(x)
    stats = absorb_high_bias(sim)
    assert stats["absorbed_pairs"] >= 1 and sim_info(sim).cle["bias_absorption"]
    bn = m1.qcard_bn
    assert (m1.bias.detach() <= b_before + 1e-6).all() and (m1.bias.detach() < b_before - 1e-3).any()
    # c = max(0, beta - 3 gamma) leaves beta - c = 3 gamma where it was positive
    assert torch.all(bn["beta"] <= 3 * bn["gamma"].abs() + 1e-5)
    with quant_state(sim, weights=False), torch.no_grad():
        y1 = sim(x)
    # exact where x >= c (almost everywhere) up to zero padding at the depthwise conv's borders
    assert float((y0 - y1).abs().mean() / y0.abs().mean()) < 0.05


def test_empirical_bias_correction_removes_the_mean_shift():
    model = _chain()
    x = torch.rand(32, 3, 8, 8)
    sim = _build(model, x, w_bits=3, a_bits=None, w_granularity="per_tensor")
    set_weight_ranges(sim)
    fc = sim_info(sim).layer("fc").module
    pw = sim_info(sim).layer("pw.0").module

    def pw_mean(weights):
        with quant_state(sim, weights=weights), torch.no_grad():
            feats = []
            h = pw.register_forward_hook(lambda m, i, o: feats.append(o))
            sim(x)
            h.remove()
        return feats[0].mean((0, 2, 3))

    reference = pw_mean(False)                       # FP32 (before any correction)
    before = float((pw_mean(True) - reference).abs().mean())
    out = empirical_bias_correction(sim, [x])
    assert out["corrected_layers"] == ["c1.0", "dw.0", "pw.0", "fc"]
    after = float((pw_mean(True) - reference).abs().mean())
    assert after < 0.25 * before, (before, after)
    assert fc.bias is not None and sim_info(sim).bias_correction == "empirical"


def _layer_by_layer_bias_correction(sim, batches):
    """The definition, run the slow way: for each layer in order, rerun the model up to it."""
    from qcard.quant.layerwise import capture_inputs, fp_weight, layer_forward
    seen = set()
    with quant_state(sim, activations=False), torch.no_grad():
        for li in sim_info(sim).gemm_layers():
            m = li.module
            if li.weight_quantizer is None or id(m) in seen:
                continue
            seen.add(id(m))
            xs = capture_inputs(sim, m, batches)
            dw = m.quantized_weight().detach() - fp_weight(m)
            bias, m.bias = m.bias, None
            eps = [layer_forward(m, x, dw) for x in xs]
            m.bias = bias
            eps = sum((e.reshape(-1, e.shape[-1]).mean(0) if isinstance(m, nn.Linear) else
                       e.transpose(0, 1).reshape(e.shape[1], -1).mean(1)) * x.shape[0] for e, x in zip(eps, xs))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(eps))
            m.bias.sub_(eps / sum(x.shape[0] for x in xs))


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_one_pass_bias_correction_equals_layer_by_layer(name):
    """Issue 16 item 5: the whole model is corrected in one pass over the calibration batches (not one
    pass per layer), with the same biases as the layer-by-layer definition and the same outputs."""
    from test_quant_support import bundled
    model = bundled(name)
    torch.manual_seed(0)
    shape = (1, 28, 28)          # both read mnist-sized images
    batches = [torch.rand(8, *shape) for _ in range(3)]
    sims = []
    for _ in range(2):
        sim = build_simulated(model, SimScheme(w_bits=4, a_bits=8), batches[0][:1])
        equalize(sim)
        absorb_high_bias(sim)
        set_weight_ranges(sim)
        sims.append(sim)
    first = sim_info(sims[0]).gemm_layers()[0].module
    calls = []
    h = first.register_forward_hook(lambda *a: calls.append(1))
    out = empirical_bias_correction(sims[0], batches)
    h.remove()
    assert len(calls) == len(batches)          # one pass, not one per layer
    _layer_by_layer_bias_correction(sims[1], batches)
    layers = [li.name for li in sim_info(sims[1]).gemm_layers() if li.weight_quantizer is not None]
    assert out["corrected_layers"] == list(dict.fromkeys(layers))
    b0 = {k: v for k, v in sims[0].state_dict().items() if k.endswith("bias")}
    b1 = {k: v for k, v in sims[1].state_dict().items() if k.endswith("bias")}
    assert b0.keys() == b1.keys() and len(b0) >= len(out["corrected_layers"])
    for k in b0:
        torch.testing.assert_close(b0[k], b1[k], rtol=1e-5, atol=1e-6)
    for sim in sims:
        calibrate_activations(sim, batches)
    with torch.no_grad():
        x = torch.rand(16, *shape)
        assert torch.equal(sims[0](x).argmax(-1), sims[1](x).argmax(-1))


def test_analytic_bias_correction_formula():
    beta = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    gamma = torch.tensor([1.0, 2.0, 0.5, 1.5])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, 4, generator=g) * gamma + beta
    mc = torch.relu(z).mean(0)
    assert torch.allclose(_relu_gauss_mean(beta, gamma), mc, atol=0.01)
    model = _chain()
    x = torch.rand(8, 3, 8, 8)
    sim = _build(model, x, w_bits=3, a_bits=None)
    set_weight_ranges(sim)
    pw = sim_info(sim).layer("pw.0").module
    b0 = pw.bias.detach().clone()
    res = analytic_bias_correction(sim)
    assert "pw.0" in res["corrected_layers"] and "c1.0" in res["skipped_layers"]    # the input is no BN output
    assert not torch.equal(pw.bias.detach(), b0)


def test_adaround_result_is_on_the_grid_and_beats_nearest():
    model = _chain()
    x = torch.rand(64, 3, 8, 8)
    sim = _build(model, x, w_bits=3, a_bits=None, w_granularity="per_tensor")
    set_weight_ranges(sim)
    # FP targets from an untouched FP copy: 200 iterations leave the last layer above nearest here, 800 do not
    stats = adaround(sim, list(x.split(16)), iters=800, batch_size=16)
    for li in sim_info(sim).gemm_layers():
        w, wq = li.module.weight.detach(), li.weight_quantizer
        assert torch.equal(wq(w), w)                        # exactly on the frozen grid
        assert wq.rounding_label == "adaround"
        assert li.module.qcard_fp_weight.shape == w.shape and not torch.equal(li.module.qcard_fp_weight, w)
        q = w / wq.scale - li.module.qcard_fp_weight / wq.scale
        assert float(q.abs().max()) <= 1.0 + 1e-4        # each weight moved by less than one step
    for row in stats["layers"]:
        assert row["output_mse_adaround"] <= row["output_mse_nearest"] * 1.0001


def test_greedy_allocation():
    cands = [
        {"layer": "a", "side": "w", "numel": 100, "noise": {2: 0.5, 4: 0.01, 8: 0.0}},
        {"layer": "b", "side": "w", "numel": 100, "noise": {2: 0.02, 4: 0.001, 8: 0.0}},
        {"layer": "t1", "side": "a", "numel": 1000, "noise": {2: 0.3, 4: 0.05, 8: 0.0}},
        {"layer": "t2", "side": "a", "numel": 10, "noise": {2: 0.3, 4: 0.05, 8: 0.0}},
    ]
    choice, acct = greedy_bit_allocation(cands, [2, 4, 8], w_budget=3.0, a_budget=None, peak_budget=4000)
    assert (choice[("a", "w")], choice[("b", "w")]) == (4, 2)    # the insensitive layer takes the 2 bits
    assert acct["mean_weight_bits"] <= 3.0 and acct["max_activation_map_bits"] <= 4000
    assert choice[("t1", "a")] == 4 and choice[("t2", "a")] == 8     # only the largest map had to shrink
    # the less sensitive layer goes lower first
    assert choice[("b", "w")] <= choice[("a", "w")]
    # fixed entries count in the accounting
    with pytest.raises(ValueError, match="cannot be met"):
        greedy_bit_allocation(cands, [2, 4, 8], None, None, 100, fixed=[{"side": "a", "numel": 1000, "bits": 8}])


def test_bn_based_activation_ranges_read_the_folded_bn():
    model = _chain()
    x = torch.rand(8, 3, 8, 8)
    sim = _build(model, x, w_bits=8, a_bits=8, activation_range="bn", bn_alpha=6.0)
    set_weight_ranges(sim)
    calibrate_activations(sim, [x])
    info = sim_info(sim)
    q = info.layer("c1.0").output_quantizer
    bn = model.c1[1]
    hi = float((bn.bias + 6 * bn.weight.abs()).max().detach())
    lo, top = q.range()
    assert float(lo) == 0.0                           # ReLU follows: unsigned from 0
    assert math.isclose(float(top), hi, rel_tol=0.01)
    assert q.range_setting == "bn"
    assert info.input_quantizer.range_setting == "bn->minmax"     # no BN in front of the input
