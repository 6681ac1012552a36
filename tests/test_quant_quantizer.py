"""The quantizer core: bit-exact with torch's fake-quant ops, straight-through gradients, QSpec rules."""
import pytest
import torch
from pydantic import ValidationError

from qcard.quant.qspec import QSpec
from qcard.quant.quantizer import FakeQuantize, compute_qparams, fake_quantize, group_rows

N = 1_000_000



@pytest.fixture(autouse=True)
def _threads():
    from test_quant_support import one_thread
    with one_thread():
        yield

def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns; a zero's sign is normalised (torch's op returns +0 where IEEE rounding of
    a tiny negative gives -0; both are the same number and nothing downstream can tell them apart)."""
    a = a + 0.0
    b = b + 0.0
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    # mixture: gaussian bulk, heavy tails beyond any range, and exact grid ties (x/s = k + 0.5)
    x = torch.randn(N, generator=g) * 2.0
    x[: N // 10] *= 20
    return x, g


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_bit_exact(bits, symmetric):
    x, g = _data(bits)
    for signed in (True, False):
        spec = QSpec(bits=bits, symmetric=symmetric, signed=signed)
        lo, hi = (-3.0, 5.0) if not symmetric else (-4.0, 4.0)
        scale, zp = compute_qparams(torch.tensor(lo), torch.tensor(hi), spec)
        # exact ties: values that sit halfway between grid points
        ties = (torch.randint(-2 ** bits, 2 ** bits, (1000,), generator=g).float() + 0.5) * scale
        xs = torch.cat([x, ties])
        ref = torch.fake_quantize_per_tensor_affine(xs, float(scale), int(zp), spec.qmin, spec.qmax)
        out = fake_quantize(xs, scale, zp, spec.qmin, spec.qmax)                       # inference path
        assert _bits_equal(out, ref)
        assert torch.equal(out, ref)
        out_inplace = fake_quantize(xs.clone(), scale, zp, spec.qmin, spec.qmax, inplace=True)
        assert _bits_equal(out_inplace, ref)
        # the formula path (used for learnable scales / QAT) gives the same numbers
        s_learn = scale.clone().requires_grad_(True)
        out_formula = fake_quantize(xs, s_learn, zp, spec.qmin, spec.qmax)
        assert _bits_equal(out_formula.detach(), ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_bit_exact(bits, symmetric):
    x, g = _data(100 + bits)
    for axis, shape in ((0, (125, 8000)), (1, (100, 50, 200)), (-1, (1000, 1000))):
        xs = x.reshape(shape)
        c = xs.shape[axis]
        lo = -torch.rand(c, generator=g) * 4 - 0.01
        hi = torch.rand(c, generator=g) * 4 + 0.01
        spec = QSpec(bits=bits, symmetric=symmetric, granularity="per_channel", axis=axis % xs.dim())
        scale, zp = compute_qparams(lo, hi, spec)
        ref = torch.fake_quantize_per_channel_affine(xs, scale, zp.int(), axis % xs.dim(), spec.qmin, spec.qmax)
        out = fake_quantize(xs, scale, zp, spec.qmin, spec.qmax, axis=axis)
        assert _bits_equal(out, ref)
        out_formula = fake_quantize(xs, scale.clone().requires_grad_(True), zp, spec.qmin, spec.qmax, axis=axis)
        assert _bits_equal(out_formula.detach(), ref)


def test_high_bit_widths_match_torch():
    x, _ = _data(7)
    for bits in (10, 12, 16):
        spec = QSpec(bits=bits, symmetric=False)
        scale, zp = compute_qparams(torch.tensor(-7.0), torch.tensor(9.0), spec)
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.qmin, spec.qmax)
        assert _bits_equal(fake_quantize(x, scale, zp, spec.qmin, spec.qmax), ref)


def test_straight_through_gradient():
    spec = QSpec(bits=4, symmetric=False, signed=False)
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(2.0), spec)
    x = torch.linspace(-3, 4, 1001, requires_grad=True)
    y = fake_quantize(x, scale, zp, spec.qmin, spec.qmax)
    y.sum().backward()
    lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
    inside = (x.detach() >= lo - scale / 2) & (x.detach() <= hi + scale / 2)
    assert torch.equal(x.grad, inside.float())
    # the learnable-scale path: same input gradient, LSQ gradient for the scale
    x2 = x.detach().clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    y2 = fake_quantize(x2, s, zp, spec.qmin, spec.qmax)
    y2.sum().backward()
    assert torch.allclose(x2.grad, x.grad)        # s·(1/s) may differ from 1 by an ulp
    assert torch.equal(x2.grad != 0, x.grad != 0)
    v = x.detach() / scale
    q = torch.round(v) + zp
    expected = torch.where(q < spec.qmin, spec.qmin - zp, torch.where(q > spec.qmax, spec.qmax - zp, torch.round(v) - v))
    assert torch.allclose(s.grad, expected.sum(), rtol=1e-3, atol=1e-2)


def test_qparams_conventions():
    sym = QSpec(bits=8, symmetric=True, signed=True)
    s, z = compute_qparams(torch.tensor(-2.0), torch.tensor(1.0), sym)
    assert float(s) == pytest.approx(2.0 / 127.5) and float(z) == 0
    uns = QSpec(bits=8, symmetric=True, signed=False)
    s, z = compute_qparams(torch.tensor(0.0), torch.tensor(6.0), uns)
    assert float(s) == pytest.approx(6.0 / 255) and float(z) == 0
    asym = QSpec(bits=8, symmetric=False, signed=False)
    s, z = compute_qparams(torch.tensor(0.5), torch.tensor(3.0), asym)     # widened to contain 0
    assert float(s) == pytest.approx(3.0 / 255) and float(z) == 0
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), asym)
    assert float(s) == pytest.approx(4.0 / 255) and float(z) == round(1.0 / (4.0 / 255))
    pot = QSpec(bits=8, symmetric=True, scale_format="power_of_two")
    s, _ = compute_qparams(torch.tensor(-3.0), torch.tensor(3.0), pot)
    assert float(s) == 2.0 ** round(torch.log2(torch.tensor(3.0 / 127.5)).item())
    # zero is always exactly representable
    for spec in (asym, QSpec(bits=3, symmetric=False)):
        s, z = compute_qparams(torch.tensor(-0.37), torch.tensor(2.9), spec)
        assert float(fake_quantize(torch.zeros(3), s, z, spec.qmin, spec.qmax).abs().max()) == 0.0


def test_qspec_validation():
    assert QSpec(bits=4, signed=True).qrange == (-8, 7)
    assert QSpec(bits=4, signed=False).qrange == (0, 15)
    with pytest.raises(ValidationError):
        QSpec(bits=1)
    with pytest.raises(ValidationError):
        QSpec(bits=17)
    with pytest.raises(ValidationError, match="group_size"):
        QSpec(granularity="per_group")
    with pytest.raises(ValidationError, match="group_size"):
        QSpec(granularity="per_channel", group_size=8)
    with pytest.raises(ValidationError):
        QSpec(bits=8, granularity="per_tile")


def test_per_group_and_module():
    w = torch.randn(6, 10, 3, 3)
    spec = QSpec(bits=4, granularity="per_group", group_size=32)
    rows, back = group_rows(w, 0, 32)
    assert rows.shape == (6 * 3, 32)                  # 90 elements per channel -> 3 groups, padded
    assert torch.equal(back(rows), w)
    fq = FakeQuantize(spec)
    amax = rows.abs().amax(1)
    fq.set_range(-amax, amax)
    out = fq(w)
    # each group is quantized with its own scale: compare with per-channel quantization of the rows
    ref = torch.fake_quantize_per_channel_affine(rows, fq.scale, fq.zero_point.int(), 0, -8, 7)
    assert torch.equal(out, back(ref))
    assert not torch.equal(out, w)


def test_module_states_and_relu_absorption():
    spec = QSpec(bits=8, symmetric=False, signed=False)
    fq = FakeQuantize(spec)
    with pytest.raises(RuntimeError, match="before its range"):
        fq(torch.randn(4))
    fq.pre_act = "relu"
    x = torch.randn(1000) * 3
    fq.set_range(torch.tensor(0.0), torch.tensor(9.0))
    assert fq._pre_act_absorbed()
    ref = torch.fake_quantize_per_tensor_affine(torch.relu(x), float(fq.scale), int(fq.zero_point), 0, 255)
    assert torch.equal(fq(x), ref)
    fq.set_range(torch.tensor(-1.0), torch.tensor(9.0))       # grid below 0: ReLU must run
    assert not fq._pre_act_absorbed()
    ref = torch.fake_quantize_per_tensor_affine(torch.relu(x), float(fq.scale), int(fq.zero_point), 0, 255)
    assert torch.equal(fq(x), ref)
    fq.pre_act = "relu6"
    fq.set_range(torch.tensor(0.0), torch.tensor(5.0))
    assert fq._pre_act_absorbed()
    ref = torch.fake_quantize_per_tensor_affine(torch.nn.functional.relu6(x), float(fq.scale), 0, 0, 255)
    assert torch.equal(fq(x), ref)
    fq.enabled = False
    assert torch.equal(fq(x), torch.nn.functional.relu6(x))


def test_dynamic_and_stochastic():
    spec = QSpec(bits=8, symmetric=False)
    fq = FakeQuantize(spec, dynamic=True)
    x = torch.randn(4, 100)
    x[1] *= 100
    out = fq(x)
    for i in range(4):             # each sample quantized on its own range
        s, z = compute_qparams(x[i].min(), x[i].max(), spec)
        assert torch.equal(out[i], torch.fake_quantize_per_tensor_affine(x[i], float(s), int(z), -128, 127))
    spec_sr = QSpec(bits=4, rounding="stochastic")
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec_sr)
    x = torch.full((200_000,), 0.3 * float(s))        # 0.3 of a step: rounds up 30% of the time
    g = torch.Generator().manual_seed(0)
    y = fake_quantize(x, s, z, spec_sr.qmin, spec_sr.qmax, rounding="stochastic", generator=g)
    assert abs(float((y > 0).float().mean()) - 0.3) < 0.01
    assert abs(float(y.mean()) - float(x.mean())) < 0.01 * float(s)
