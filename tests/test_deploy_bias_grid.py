"""The simulated bias is the one integer runtimes add: int32 at s_in·s_w (qcard.quant.int_bias).

onnxruntime's integer kernels round each float conv/gemm bias to the accumulator step s_in·s_w; with the
simulation keeping the float bias, a third of mobilenet_tiny's output codes came out a step apart from the
simulation (and on the conformance matrix's mobilenet_v2, 97.3 % identical argmax)."""
import torch

from qcard.data import load_dataset
from qcard.deploy import deploy_check
from qcard.quant.int_bias import INT32_MAX, round_biases, saturation_warnings
from test_deploy_honesty import TwoLayer
from test_quant_support import bundled, one_thread, run_ptq


def _steps(sim) -> torch.Tensor:
    """Per gemm layer with a bias: bias / (s_in·s_w) (float32 product, as the runtime forms it)."""
    out = []
    for li in sim.qcard_sim.gemm_layers():
        if li.module.bias is None:
            continue
        step = li.input_quantizers[0].scale.float().reshape(()) * li.weight_quantizer.scale.float().reshape(-1)
        out.append(li.module.bias.detach().double() / step.double())
    return torch.cat(out)


def _check(sim, data):
    return deploy_check(sim, data, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1)


def test_rounded_biases_make_the_integer_kernels_agree_with_the_simulation():
    data = torch.utils.data.Subset(load_dataset("qcard:mnist5k", "test"), range(200))
    with one_thread():
        sim = run_ptq(bundled("mobilenet_tiny"), w_bits=8, a_bits=8, w_granularity="per_channel",
                      pipeline="minmax").model
        before = _check(sim, data)
        k = _steps(sim)
        counts = round_biases(sim)
        after = _check(sim, data)
    assert (k - k.round()).abs().max() > 0.01                 # PTQ's float biases are off the grid
    k = _steps(sim)
    # on the grid up to float32's representation of the multiple (the runtime re-rounds to the same integer)
    assert bool(((k - k.round()).abs() <= 1e-6 * k.abs() + 1e-4).all()) and counts == {"layers": 12, "saturated": 0}
    assert before["status"] == after["status"] == "ok"
    # the runtime's logits: a third of them a step off the simulation's before, (nearly) all equal after
    assert before["logit_diff_mean_steps"] > 0.1, before
    assert after["logit_diff_mean_steps"] < 0.03, after
    assert any("off that grid" in n for n in before["notes"]), before["notes"]
    assert any("the simulated biases are on that grid (12 layer(s))" in n for n in after["notes"]), after["notes"]
    # rounding again changes nothing
    b = [li.module.bias.detach().clone() for li in sim.qcard_sim.gemm_layers()]
    round_biases(sim)
    assert all(torch.equal(x, li.module.bias) for x, li in zip(b, sim.qcard_sim.gemm_layers()))


def test_a_bias_beyond_int32_saturates_in_the_simulation_as_on_the_runtime():
    """A tiny weight scale puts fc2's bias of 1000 far beyond int32 at s_in·s_w: the runtime saturates it, and
    so does the simulation now, and the card says so. (Agreement is not asserted: with a saturated bias the
    runtime's int32 accumulator itself overflows, which no simulation in real numbers follows.)"""
    torch.manual_seed(0)
    with one_thread():
        sim = run_ptq(TwoLayer(1e-4, 3, 1000.0).eval(), w_bits=8, a_bits=8, pipeline="minmax").model
        counts = round_biases(sim)
    fc2 = sim.qcard_sim.layer("fc2")
    step = float(fc2.input_quantizers[0].scale) * float(fc2.weight_quantizer.scale.reshape(-1)[3])
    assert counts["saturated"] == 1
    assert abs(float(fc2.module.bias[3]) / step - INT32_MAX) < INT32_MAX * 1e-6
    assert "beyond int32" in saturation_warnings(counts)[0]


def test_channels_without_weights_keep_their_bias():
    """All-zero weights: the weight scale is arbitrary (the exporter picks one at which the bias fits), so the
    simulated bias is left as it is."""
    torch.manual_seed(0)
    with one_thread():
        sim = run_ptq(TwoLayer(0.0, 3, 1000.0).eval(), w_bits=8, a_bits=8, pipeline="minmax").model
    before = sim.qcard_sim.layer("fc2").module.bias.detach().clone()
    round_biases(sim)
    assert torch.equal(sim.qcard_sim.layer("fc2").module.bias, before)
    assert float(before[3]) == 1000.0

