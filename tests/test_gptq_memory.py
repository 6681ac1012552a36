"""Bounded memory of the one-pass layer-by-layer runner (quant.layerwise.run_by_node; issue #24 item 4):
past the budget (QCARD_CAPTURE_MB) the live node values of the calibration batches spill to temporary
files, and GPTQ and empirical bias correction give bit-identical results either way."""
import pytest
import torch
from torch import nn

from qcard.quant import bias_correction as bc_mod
from qcard.quant import gptq as gptq_mod
from qcard.quant.bias_correction import empirical_bias_correction
from qcard.quant.calibrate import set_weight_ranges, sim_info
from qcard.quant.graph import build_simulated
from qcard.quant.layerwise import run_by_node
from qcard.quant.scheme import SimScheme
from test_quant_support import bundled, mnist, one_thread


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


class _InPlace(nn.Module):
    """A residual kept live across hooked modules and modified in place after it was spilled, an
    in-place ReLU (its output is its input), and a value kept alive by an unused in-place node."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Identity()

    def forward(self, x):
        y = self.c1(x)
        z = self.relu(self.c2(y))
        y.mul_(-2.0)                      # y was live (and spilled) when c2 was reached
        w = self.c3(z)
        return self.out(self.relu(w) + y)


def _inputs_by_before(gm, batches, budget):
    seen = {}

    def before(m, xs):
        name = next(n for n, mod in gm.named_modules() if mod is m)
        seen[name] = [x.clone() for x in xs]
    stats = run_by_node(gm, batches, "cpu", before, budget=budget)
    return seen, stats


def test_spilled_values_are_the_values_of_a_plain_forward():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_InPlace().eval())
    batches = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    want = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: want.setdefault(n, []).append(a[0].clone()))
             for n, m in gm.named_children()]
    with torch.no_grad():
        for x in batches:
            gm(x)
    for h in hooks:
        h.remove()
    mem, mem_stats = _inputs_by_before(gm, batches, budget=1 << 30)
    disk, disk_stats = _inputs_by_before(gm, batches, budget=0)
    assert mem_stats["values_spilled"] == 0 and disk_stats["values_spilled"] > 0
    assert mem_stats["segments"] == disk_stats["segments"] == 6      # before c1, c2, relu, c3, out; the end
    want["relu"] = want["relu"][::2]               # the first of its two calls per batch is the hooked one
    for name in ("c1", "c2", "relu", "c3", "out"):
        assert len(want[name]) == 3 and len(mem[name]) == 3 and len(disk[name]) == 3
        for w, a, b in zip(want[name], mem[name], disk[name]):
            assert torch.equal(a, w) and torch.equal(b, w), name
    # the in-place change after the spill is seen: out's input is relu(c3(..)) - 2·c1(x), not + c1(x)
    with torch.no_grad():
        y = gm.c1(batches[0])
        plus = torch.relu(gm.c3(torch.relu(gm.c2(y)))) + y
    assert not torch.equal(disk["out"][0], plus)


def test_only_the_named_modules_are_hooked():
    gm = torch.fx.symbolic_trace(_InPlace().eval())
    got = []
    stats = run_by_node(gm, [torch.randn(2, 3, 6, 6)], "cpu", lambda m, xs: got.append(m), only=[gm.c3, gm.c1])
    assert got == [gm.c1, gm.c3] and stats["segments"] == 3


def _sim(name, bits, a_bits=None):
    xtr = mnist()[0]
    sim = build_simulated(bundled(name), SimScheme(w_bits=bits, a_bits=a_bits, w_granularity="per_channel",
                                                   weight_range="mse"), xtr[:1], log=lambda m: None)
    set_weight_ranges(sim)
    return sim, list(xtr[:96].split(32))


def _recording(monkeypatch, module):
    """Wrap the run_by_node that `module` calls so that its statistics are kept."""
    stats = []

    def wrapped(*a, **k):
        stats.append(run_by_node(*a, **k))
        return stats[-1]
    monkeypatch.setattr(module, "run_by_node", wrapped)
    return stats


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_spilled_equals_in_memory(monkeypatch, act_order):
    stats = _recording(monkeypatch, gptq_mod)
    out = []
    for mb in ("4096", "0"):
        monkeypatch.setenv("QCARD_CAPTURE_MB", mb)
        sim, batches = _sim("resnet8", 3)
        rec = gptq_mod.gptq(sim, batches, act_order=act_order)
        rec.pop("wall_s")
        out.append(([li.module.weight.detach().clone() for li in sim_info(sim).gemm_layers()], rec))
    (w_mem, rec_mem), (w_disk, rec_disk) = out
    assert [s["values_spilled"] for s in stats][0] == 0 and stats[1]["values_spilled"] > 0
    assert all(torch.equal(a, b) for a, b in zip(w_mem, w_disk)) and rec_mem == rec_disk
    assert not any("skipped" in r for r in rec_mem["layers"])


def test_bias_correction_spilled_equals_in_memory(monkeypatch):
    stats = _recording(monkeypatch, bc_mod)
    out = []
    for mb in ("4096", "0"):
        monkeypatch.setenv("QCARD_CAPTURE_MB", mb)
        sim, batches = _sim("mobilenet_tiny", 4, a_bits=8)
        rec = empirical_bias_correction(sim, batches)
        out.append(([li.module.bias.detach().clone() for li in sim_info(sim).gemm_layers()], rec))
    (b_mem, rec_mem), (b_disk, rec_disk) = out
    assert stats[0]["values_spilled"] == 0 and stats[1]["values_spilled"] > 0
    assert rec_mem == rec_disk and len(rec_mem["corrected_layers"]) == len(b_mem)
    assert all(torch.equal(a, b) for a, b in zip(b_mem, b_disk))
