"""Range setting: every observer against a direct computation on the same data."""
import numpy as np
import pytest
import torch

from qcard.quant.qspec import QSpec
from qcard.quant.quantizer import compute_qparams, fake_quantize
from qcard.quant.ranges import (BNObserver, CrossEntropyObserver, EMAMinMaxObserver, Histogram, KLObserver,
                                MinMaxObserver, MSEObserver, PercentileObserver, make_observer, tensor_range)

torch.manual_seed(0)



@pytest.fixture(autouse=True)
def _threads():
    from test_quant_support import one_thread
    with one_thread():
        yield

def _batches(n=4, shape=(8, 6, 10, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def test_minmax_per_tensor_and_per_channel():
    xs = _batches()
    allx = torch.cat(xs)
    obs = MinMaxObserver()
    obs_c = MinMaxObserver(axis=1)
    for x in xs:
        obs.update(x)
        obs_c.update(x)
    lo, hi = obs.compute_range(QSpec())
    assert float(lo) == float(allx.min()) and float(hi) == float(allx.max())
    lo, hi = obs_c.compute_range(QSpec())
    assert torch.equal(lo, allx.amin(dim=(0, 2, 3))) and torch.equal(hi, allx.amax(dim=(0, 2, 3)))


def test_ema_minmax():
    xs = _batches()
    obs = EMAMinMaxObserver(momentum=0.8)
    for x in xs:
        obs.update(x)
    lo, hi = float(xs[0].min()), float(xs[0].max())
    for x in xs[1:]:
        lo = 0.8 * lo + 0.2 * float(x.min())
        hi = 0.8 * hi + 0.2 * float(x.max())
    rlo, rhi = obs.compute_range(QSpec())
    assert float(rlo) == pytest.approx(lo, rel=1e-6) and float(rhi) == pytest.approx(hi, rel=1e-6)


def test_histogram_growth_keeps_mass_and_percentile():
    xs = _batches(n=5)
    allx = torch.cat([x.reshape(-1) for x in xs]).numpy()
    h = Histogram(2048)
    for x in xs:
        h.update(x)
    assert h.total == pytest.approx(allx.size)
    assert h.lo == pytest.approx(allx.min()) and h.hi == pytest.approx(allx.max())
    width = (h.hi - h.lo) / 2048
    obs = PercentileObserver(percentile=99.9)
    for x in xs:
        obs.update(x)
    lo, hi = obs.compute_range(QSpec())
    # re-binning spreads counts by interpolation, so allow a few bin widths
    assert abs(float(hi) - np.percentile(allx, 99.9)) < 4 * width
    assert abs(float(lo) - np.percentile(allx, 0.1)) < 4 * width
    single = PercentileObserver(percentile=99.0)
    single.update(xs[0])
    lo, hi = single.compute_range(QSpec())
    w0 = float(xs[0].max() - xs[0].min()) / 2048
    assert abs(float(hi) - np.percentile(xs[0].numpy(), 99.0)) < w0


def test_percentile_exact_per_channel():
    w = torch.randn(16, 3, 5, 5)
    lo, hi = tensor_range(w, QSpec(granularity="per_channel"), "percentile", percentile=99.0)
    flat = w.reshape(16, -1)
    assert torch.allclose(hi, torch.quantile(flat, 0.99, dim=1), atol=1e-6)
    assert torch.allclose(lo, torch.quantile(flat, 0.01, dim=1), atol=1e-6)


def _brute_mse(x, spec, grid=100):
    mn, mx = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    best = None
    for k in range(grid, 0, -1):
        a = k / grid
        s, z = compute_qparams(torch.tensor(mn * a), torch.tensor(mx * a), spec)
        err = float(((fake_quantize(x, s, z, spec.qmin, spec.qmax) - x) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, mn * a, mx * a)
    return best


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_weight_search_matches_brute_force(symmetric):
    w = torch.randn(8, 2048)
    w[0, 0] = 12.0                                  # one outlier: the MSE range clips it at 4 bits
    spec = QSpec(bits=4, symmetric=symmetric, granularity="per_channel")
    lo, hi = tensor_range(w, spec, "mse")
    for c in range(8):
        _, blo, bhi = _brute_mse(w[c], spec.model_copy(update={"granularity": "per_tensor"}))
        assert float(lo[c]) == pytest.approx(blo, rel=1e-5, abs=1e-7)
        assert float(hi[c]) == pytest.approx(bhi, rel=1e-5, abs=1e-7)
    assert float(hi[0]) < 12.0 * 0.9
    spec_t = QSpec(bits=4, symmetric=symmetric)
    lo_t, hi_t = tensor_range(w, spec_t, "mse")
    _, blo, bhi = _brute_mse(w, spec_t)
    assert float(hi_t) == pytest.approx(bhi, rel=1e-5) and float(lo_t) == pytest.approx(blo, rel=1e-5, abs=1e-7)


def test_mse_histogram_close_to_exact():
    x = torch.cat([torch.randn(200_000), torch.randn(50) * 15])
    spec = QSpec(bits=4, symmetric=False)
    obs = MSEObserver()
    for part in x.split(50_000):
        obs.update(part)
    lo, hi = obs.compute_range(spec)
    exact = MSEObserver(exact=True)
    exact.update(x)
    elo, ehi = exact.compute_range(spec)
    # the histogram search lands within two grid steps (2%) of the exact one
    assert abs(float(hi) - float(ehi)) <= 0.021 * float(x.max()) + 1e-6
    assert abs(float(lo) - float(elo)) <= 0.021 * abs(float(x.min())) + 1e-6
    assert float(hi) < float(x.max()) * 0.6          # outliers clipped


def _naive_kl(counts, edges, levels):
    counts = list(counts)
    counts[0] = counts[1]                  # zero-spike suppression, as in NVIDIA's implementation
    best = (float("inf"), None)
    for i in range(levels, len(counts) + 1):
        p = list(counts[:i])
        p[-1] += sum(counts[i:])
        q = [0.0] * i
        for j in range(levels):
            start, stop = -(-j * i // levels), -(-(j + 1) * i // levels)
            chunk = counts[start:stop]
            nz = sum(1 for c in chunk if c > 0)
            for k in range(start, stop):
                q[k] = sum(chunk) / nz if counts[k] > 0 else 0.0
        ps, qs = sum(p), sum(q)
        kl = sum((pi / ps) * np.log((pi / ps) / max(qi / qs, 1e-12)) for pi, qi in zip(p, q) if pi > 0)
        if kl < best[0]:
            best = (kl, edges[i])
    return best[1]


def test_kl_matches_naive_tensorrt_algorithm():
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(20000, generator=g)) ** 1.5
    obs = KLObserver(bins=128)
    obs.update(x)
    spec = QSpec(bits=3, symmetric=True, signed=True)       # 4 levels per side
    lo, hi = obs.compute_range(spec)
    levels = spec.qmax - spec.qmin + 1        # data is non-negative: all 8 levels
    expect = _naive_kl(list(obs.hist.counts), obs.hist.edges, levels)
    assert float(hi) == pytest.approx(expect, rel=1e-6)
    assert float(hi) < float(x.max())
    assert float(lo) == 0.0


def test_bn_observer():
    beta = torch.tensor([0.5, -1.0, 2.0])
    gamma = torch.tensor([1.0, -0.5, 0.1])
    obs = BNObserver(alpha=6.0)
    obs.set_bn(beta, gamma, "relu")
    lo, hi = obs.compute_range(QSpec())
    assert float(lo) == 0.0 and float(hi) == pytest.approx(6.5)
    obs_c = BNObserver(axis=1)
    obs_c.set_bn(beta, gamma, None)
    lo, hi = obs_c.compute_range(QSpec())
    assert torch.allclose(lo, beta - 6 * gamma.abs()) and torch.allclose(hi, beta + 6 * gamma.abs())
    obs6 = BNObserver()
    obs6.set_bn(beta, gamma, "relu6")
    assert float(obs6.compute_range(QSpec())[1]) == 6.0
    # no batch norm: min-max fallback, with a reason
    nobn = BNObserver()
    nobn.update(torch.tensor([-1.0, 3.0]))
    lo, hi = nobn.compute_range(QSpec())
    assert (float(lo), float(hi)) == (-1.0, 3.0) and "min-max" in nobn.fallback_reason


def test_cross_entropy_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 10, generator=g) * 3
    z[0, 0] = 40.0
    spec = QSpec(bits=4, symmetric=False)
    obs = CrossEntropyObserver()
    for part in z.split(64):
        obs.update(part)
    lo, hi = obs.compute_range(spec)
    p = torch.softmax(z, -1)
    best = None
    for k in range(100, 0, -1):
        a = k / 100
        s, zp = compute_qparams(z.min() * a, z.max() * a, spec)
        ce = float(-(p * torch.log_softmax(fake_quantize(z, s, zp, spec.qmin, spec.qmax), -1)).sum(-1).mean())
        if best is None or ce < best[0] - 1e-9:
            best = (ce, float(z.min() * a), float(z.max() * a))
    assert float(lo) == pytest.approx(best[1], rel=1e-6) and float(hi) == pytest.approx(best[2], rel=1e-6)


def test_per_group_weight_range_and_unknown_name():
    w = torch.randn(4, 70)
    spec = QSpec(bits=4, granularity="per_group", group_size=32)
    lo, hi = tensor_range(w, spec, "minmax")
    assert lo.shape == (12,)                 # 3 groups per channel (last one padded with zeros)
    assert float(hi[0]) == float(w[0, :32].max().clamp(min=0))
    with pytest.raises(KeyError, match="did you mean 'minmax'"):
        make_observer("minmx")
    with pytest.raises(KeyError, match="weight range"):
        tensor_range(w, QSpec(), "kl")
