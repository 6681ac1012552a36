"""LSQ and PACT quantizers: gradients equal the spec's formulas, elementwise (LSQ: Esser et al. 2020; PACT: Choi et al. 2018)."""
import math

import pytest
import torch
from torch import nn

from qcard.quant.lsq import LSQ, PACT, clamp_learned, freeze, lsq_fake_quantize, make_lsq, make_pact
from qcard.quant.qspec import QSpec
from qcard.quant.quantizer import FakeQuantize

torch.set_num_threads(1)


def _expected(x, s, z, qmin, qmax, axis, g):
    """Direct computation of the spec's gradients, elementwise: (dx̂/dx, dx̂/ds, dx̂/dz), each shaped like x."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    zr = torch.round(z)
    v = x * (1.0 / s)
    r = torch.round(v)
    q = r + zr
    inside = (q >= qmin) & (q <= qmax)
    dx = inside.float()
    ds = torch.where(inside, r - v, torch.clamp(q, qmin, qmax) - zr) * g
    dz = torch.where(inside, torch.zeros_like(x), -s.expand_as(x)) * g
    return dx, ds, dz


def _jac(x, s, z, qmin, qmax, axis, g, fused=True):
    """Per-element gradients of x̂ from autograd: x̂_i w.r.t. x_i, and w.r.t. the scale / zero point of its channel."""
    jx, js, jz = torch.autograd.functional.jacobian(
        lambda a, b, c: lsq_fake_quantize(a, b, c, qmin, qmax, axis, g, fused=fused), (x, s, z))
    n = x.numel()
    jx = jx.reshape(n, n).diagonal().reshape(x.shape)
    # every element depends on exactly one scale: sum over the scale axis picks it
    js = js.reshape(x.shape + (-1,)).sum(-1)
    jz = jz.reshape(x.shape + (-1,)).sum(-1)
    return jx, js, jz


CASES = [
    # (axis, symmetric, signed, bits)
    (None, True, True, 4),
    (None, False, False, 4),
    (0, True, True, 3),
    (0, False, False, 4),
    (1, False, True, 2),
]


@pytest.mark.parametrize("axis,symmetric,signed,bits", CASES)
@pytest.mark.parametrize("g", [1.0, 0.173])
@pytest.mark.parametrize("fused", [True, False])
def test_lsq_gradients_equal_formula_elementwise(axis, symmetric, signed, bits, g, fused):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=gen) * 2.0
    spec = QSpec(bits=bits, symmetric=symmetric, signed=signed)
    qmin, qmax = spec.qmin, spec.qmax
    n_s = 1 if axis is None else x.shape[axis]
    s = (torch.rand(n_s, generator=gen) * 0.3 + 0.1).reshape(() if axis is None else (n_s,))
    z = torch.zeros_like(s) if symmetric else (torch.rand(s.shape, generator=gen) * (qmax - qmin) * 0.5 + qmin + 1.3)
    jx, js, jz = _jac(x, s, z, qmin, qmax, axis, g, fused)
    dx, ds, dz = _expected(x, s, z, qmin, qmax, axis, g)
    assert torch.allclose(jx, dx, atol=1e-6)       # the reference's (1/s)·s may be 1 − 2⁻²⁴
    assert torch.allclose(js, ds, atol=1e-5, rtol=1e-5)
    assert torch.allclose(jz, dz, atol=1e-6, rtol=1e-5)
    # the data covers both sides: clipped elements (no gradient to x: straight-through) and inside ones
    assert (dx == 0).any() and (dx == 1).any() and (jx[dx == 0] == 0).all()
    assert ((jx - 1).abs() < 1e-6).sum() == (dx == 1).sum()


def test_lsq_clipped_scale_gradient_is_qmin_or_qmax_for_symmetric():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.31, 10.0])
    s = torch.tensor(0.1, requires_grad=True)
    y = lsq_fake_quantize(x, s, torch.tensor(0.0), -8, 7)
    per_elem = [torch.autograd.grad(y[i], s, retain_graph=True)[0].item() for i in range(5)]
    assert per_elem[0] == pytest.approx(-8) and per_elem[4] == pytest.approx(7)
    assert per_elem[1] == pytest.approx(round(-2.6) + 2.6, abs=1e-5)
    assert per_elem[3] == pytest.approx(round(3.1) - 3.1, abs=1e-5)


def test_lsq_forward_equals_torch_fake_quantize():
    x = torch.randn(4, 6, 3, 3) * 3
    s = torch.rand(6) * 0.2 + 0.05
    z = torch.randint(0, 15, (6,)).float()
    ref = torch.fake_quantize_per_channel_affine(x, s, z.int(), 1, 0, 15)
    assert torch.equal(lsq_fake_quantize(x, s, z, 0, 15, 1), ref)
    assert torch.equal(lsq_fake_quantize(x, s, z, 0, 15, 1, fused=False), ref)
    ref_t = torch.fake_quantize_per_tensor_affine(x, 0.07, 3, 0, 15)
    assert torch.equal(lsq_fake_quantize(x, torch.tensor(0.07), torch.tensor(3.0), 0, 15), ref_t)


def test_zero_point_is_real_and_rounded_in_forward():
    x = torch.linspace(-1, 1, 41)
    a = lsq_fake_quantize(x, torch.tensor(0.1), torch.tensor(3.3), 0, 15)
    b = lsq_fake_quantize(x, torch.tensor(0.1), torch.tensor(3.0), 0, 15)
    assert torch.equal(a, b)


def _fq(spec, lo, hi, axis=None):
    fq = FakeQuantize(spec, None, channel_axis=axis, name="t")
    fq.set_range(torch.as_tensor(lo), torch.as_tensor(hi))
    return fq


@pytest.mark.parametrize("is_weight", [True, False])
def test_module_gradient_scale_is_one_over_sqrt_n_qmax(is_weight):
    spec = QSpec(bits=4, symmetric=False, signed=False, granularity="per_channel" if is_weight else "per_tensor")
    x = torch.randn(8, 3, 5, 5)
    if is_weight:
        fq = _fq(spec, torch.full((8,), -1.0), torch.full((8,), 1.0), axis=0)
        n = x.numel() / 8
    else:
        fq = _fq(spec, -1.0, 1.0)
        n = x.numel() / x.shape[0]          # features of one sample
    make_lsq(fq, grad_scale=True, is_weight=is_weight)
    assert isinstance(fq.estimator, LSQ) and isinstance(fq.scale, nn.Parameter) and fq.zero_point.requires_grad
    g = 1.0 / math.sqrt(n * spec.qmax)
    xr = x.clone().requires_grad_(True)
    fq(xr).sum().backward()
    s_ref = fq.scale.detach().clone().requires_grad_(True)
    z_ref = fq.zero_point.detach().clone().requires_grad_(True)
    lsq_fake_quantize(x, s_ref, z_ref, spec.qmin, spec.qmax, 0 if is_weight else None, 1.0).sum().backward()
    assert torch.allclose(fq.scale.grad, s_ref.grad * g, rtol=1e-5, atol=1e-7)
    assert torch.allclose(fq.zero_point.grad, z_ref.grad * g, rtol=1e-5, atol=1e-7)
    assert fq.scale.grad.abs().sum() > 0


def test_ste_fixed_range_gradient_is_zero_outside_range():
    fq = _fq(QSpec(bits=4, symmetric=True, signed=True), -1.0, 1.0)
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    fq(x).sum().backward()
    lo, hi = fq.range()
    inside = (torch.round(x.detach() / fq.scale) >= fq.qmin) & (torch.round(x.detach() / fq.scale) <= fq.qmax)
    assert torch.equal(x.grad, inside.float())
    assert (x.grad[x.detach() > hi + fq.scale] == 0).all() and (x.grad[x.detach() < lo - fq.scale] == 0).all()


def test_symmetric_lsq_keeps_zero_point_fixed():
    fq = make_lsq(_fq(QSpec(bits=4), -1.0, 1.0), is_weight=True)
    assert not fq.zero_point.requires_grad and float(fq.zero_point) == 0


def test_pact_gradients():
    fq = _fq(QSpec(bits=4, symmetric=False, signed=False), 0.0, 2.0)
    assert make_pact(fq) is fq and isinstance(fq.estimator, PACT)
    assert float(fq.pact_alpha.detach()) == pytest.approx(2.0, rel=1e-5)
    x = torch.tensor([-1.0, 0.3, 1.1, 1.99, 2.5, 7.0], requires_grad=True)
    y = fq(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0, 0]))
    assert float(fq.pact_alpha.grad) == pytest.approx(2.0)          # two elements at or above α
    assert float(y[-1].detach()) == pytest.approx(2.0, rel=1e-5) and float(y[0].detach()) == 0.0
    # a grid reaching below zero is not PACT's: left unchanged
    signed = _fq(QSpec(bits=4, symmetric=False, signed=False), -1.0, 2.0)
    assert make_pact(signed) is None and signed.estimator is None


def test_freeze_returns_plain_quantizer_with_learned_grid():
    fq = _fq(QSpec(bits=4, symmetric=False, signed=False), -1.0, 2.0)
    make_lsq(fq)
    with torch.no_grad():
        fq.scale.mul_(1.5)
        fq.zero_point.add_(0.4)
    x = torch.randn(50) * 2
    with torch.no_grad():
        learned = fq(x)
    clamp_learned(fq)
    freeze(fq)
    assert fq.estimator is None and not isinstance(fq.scale, nn.Parameter)
    assert float(fq.zero_point) == round(float(fq.zero_point))
    with torch.no_grad():
        assert torch.equal(fq(x.clone()), learned)


def test_learned_scale_changes_invalidate_weight_cache():
    from qcard.quant.calibrate import set_weight_ranges, sim_info
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    sim = build_simulated(model, SimScheme(w_bits=4, a_bits=None, input_bits=None), x[:1], log=lambda m: None)
    set_weight_ranges(sim, "minmax")
    wq = sim_info(sim).gemm_layers()[0].weight_quantizer
    make_lsq(wq, is_weight=True)
    with torch.no_grad():
        before = sim(x)
        wq.scale.mul_(3.0)          # what an optimizer step does: an in-place update
        after = sim(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7), (0, 255), (-128, 127), (0, 3), (-32768, 32767)])
def test_fast_per_tensor_kernel_matches_torch_cachemask(qmin, qmax):
    """The LSQ forward's rounding trick gives torch's values and inside-mask exactly, ties and
    infinities included."""
    from qcard.quant.lsq import _per_tensor_cachemask
    g = torch.Generator().manual_seed(qmax)
    for trial in range(20):
        s = torch.rand((), generator=g) * 0.5 + 1e-3
        z = int(torch.randint(qmin, qmax + 1, (), generator=g))
        x = torch.randn(4000, generator=g) * float(torch.rand((), generator=g)) * 40 * float(s) * (qmax - qmin) / 15
        k = torch.randint(qmin - z - 3, qmax - z + 3, (500,), generator=g).float()
        x[:500] = (k + 0.5) * s                  # half-way points, where rounding must go to even
        x[500:504] = torch.tensor([float("inf"), -float("inf"), 0.0, 1e30])
        want_y, want_m = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, float(s), z, qmin, qmax)
        y, m = _per_tensor_cachemask(x, s, z, qmin, qmax)
        assert torch.equal(y, want_y), (trial, int((y != want_y).sum()))
        assert torch.equal(m, want_m), (trial, int((m != want_m).sum()))
