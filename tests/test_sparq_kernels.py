"""SPARQ kernels against a plain-Python reference of shared/specs/sparq.md.

The reference below is written from the spec's pseudo-code alone (bit loops, Decimal half-to-even),
with its own copy of the spec's window tables, so that it shares no code with qcard.methods.sparq.
"""
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache

import pytest
import torch

from qcard.methods.sparq import kernels as sparq_kernels
from qcard.methods.sparq import SparqKernel, bsparq, sparq_stats, vsparq, vsparq_only, window_lut

torch.set_num_threads(1)

# ---------------------------------------------------------------- reference (spec pseudo-code)

SPEC_T = {  # (n, options) -> T, copied from the spec's table
    (4, 5): {7, 6, 5, 4, 3},
    (4, 3): {7, 5, 3},
    (4, 2): {7, 3},
    (3, 6): {2, 3, 4, 5, 6, 7},
    (2, 7): {1, 2, 3, 4, 5, 6, 7},
}
CONFIGS = [(n, o, r) for (n, o) in SPEC_T for r in ("round", "raw")]


@lru_cache(maxsize=None)
def ref_bsparq(q, n, T, rounding):
    if q == 0:
        return 0
    p = 7
    while not (q >> p) & 1:          # most significant set bit
        p -= 1
    top = min(t for t in T if t >= p)
    lsb = top - n + 1
    if rounding == "raw":
        return (q >> lsb) << lsb
    r = int((Decimal(q) / Decimal(2 ** lsb)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    r = min(r, 2 ** n - 1)           # saturate; the window does not move
    return r << lsb


def ref_budget(x, n, rounding):
    """The 2n-bit budget of a value whose partner is zero."""
    if n == 4:
        return x
    if n == 3:
        return ref_bsparq(x, 6, frozenset({5, 6, 7}), rounding)
    return ref_bsparq(x, 4, frozenset({3, 4, 5, 6, 7}), rounding)


def ref_pair(a, b, n, options, rounding):
    T = frozenset(SPEC_T[(n, options)])
    if a == 0 or b == 0:
        return ref_budget(a, n, rounding), ref_budget(b, n, rounding)
    return ref_bsparq(a, n, T, rounding), ref_bsparq(b, n, T, rounding)


def ref_pair_vonly(a, b, rounding):
    if a == 0 or b == 0:
        return a, b
    return ref_bsparq(a, 4, frozenset({7}), rounding), ref_bsparq(b, 4, frozenset({7}), rounding)


ALL_CODES = torch.arange(256, dtype=torch.int64)
# every ordered pair (a, b): both orders of each pair are included
ALL_PAIRS = torch.stack([ALL_CODES.repeat_interleave(256), ALL_CODES.repeat(256)], dim=1)


# ---------------------------------------------------------------- bSPARQ tables

@pytest.mark.parametrize("n,options,rounding", CONFIGS)
def test_bsparq_every_code_matches_reference(n, options, rounding):
    got = bsparq(ALL_CODES, bits=n, options=options, rounding=rounding).tolist()
    want = [ref_bsparq(q, n, frozenset(SPEC_T[(n, options)]), rounding) for q in range(256)]
    assert got == want
    assert window_lut(n, options, rounding).tolist() == want


def test_saturation_example_from_spec():
    # 127 with 5opt takes window 6:3; rounding would give 128, so the result saturates at 120
    assert bsparq(torch.tensor([127]), 4, 5, "round").item() == 120
    assert bsparq(torch.tensor([127], dtype=torch.uint8)).item() == 120   # defaults: 4 bits, 5opt, round


@pytest.mark.parametrize("n,options,rounding,pins", [
    (4, 5, "round", {0: 0, 1: 1, 7: 7, 15: 15, 24: 24, 25: 24, 27: 28, 31: 30, 127: 120, 200: 192, 255: 240}),
    (4, 5, "raw", {31: 30, 127: 120, 200: 192, 255: 240, 17: 16}),
    (4, 3, "round", {9: 9, 40: 40, 41: 40, 100: 96, 127: 128, 255: 240}),
    (4, 3, "raw", {127: 112, 41: 40, 63: 60}),
    (4, 2, "round", {15: 15, 16: 16, 40: 32, 56: 64, 255: 240}),
    (4, 2, "raw", {40: 32, 31: 16, 255: 240}),
    (3, 6, "round", {3: 3, 9: 8, 11: 12, 255: 224, 127: 112}),
    (3, 6, "raw", {11: 10, 255: 224}),
    (2, 7, "round", {3: 3, 5: 4, 7: 6, 255: 192}),
    (2, 7, "raw", {7: 6, 255: 192, 5: 4}),
])
def test_hand_computed_values(n, options, rounding, pins):
    got = bsparq(torch.tensor(list(pins)), bits=n, options=options, rounding=rounding).tolist()
    assert got == list(pins.values())


def test_options_none_selects_default_set():
    assert torch.equal(bsparq(ALL_CODES), bsparq(ALL_CODES, 4, 5))
    assert torch.equal(bsparq(ALL_CODES, bits=3), bsparq(ALL_CODES, 3, 6))
    assert torch.equal(bsparq(ALL_CODES, bits=2, options=None), bsparq(ALL_CODES, 2, 7))


# ---------------------------------------------------------------- vSPARQ pairs

@pytest.mark.parametrize("n,options,rounding", CONFIGS)
def test_vsparq_all_pairs_match_reference(n, options, rounding):
    got = vsparq(ALL_PAIRS, bits=n, options=options, rounding=rounding, dim=1).tolist()
    want = [list(ref_pair(a, b, n, options, rounding)) for a, b in ALL_PAIRS.tolist()]
    assert got == want


@pytest.mark.parametrize("rounding", ["round", "raw"])
def test_vsparq_only_all_pairs_match_reference(rounding):
    got = vsparq_only(ALL_PAIRS, dim=1, rounding=rounding).tolist()
    want = [list(ref_pair_vonly(a, b, rounding)) for a, b in ALL_PAIRS.tolist()]
    assert got == want
    # both non-zero: the same as a plain 4-bit requantization at 16*dx
    both = ALL_PAIRS[(ALL_PAIRS > 0).all(1)]
    plain = (torch.round(both / 16).clamp(0, 15) * 16).long() if rounding == "round" else both // 16 * 16
    assert torch.equal(vsparq_only(both, rounding=rounding), plain)


def test_partner_budget_pins():
    # n=4: kept exact; n=3: 6-bit window T={5,6,7}; n=2: 4-bit window T={3..7}
    x = torch.tensor([[0, 255], [127, 0], [50, 0]])
    assert vsparq(x, 4).tolist() == [[0, 255], [127, 0], [50, 0]]
    assert vsparq(x, 3).tolist() == [[0, 252], [126, 0], [50, 0]]
    assert vsparq(x, 2).tolist() == [[0, 240], [120, 0], [48, 0]]


@pytest.mark.parametrize("n,options", list(SPEC_T))
def test_odd_channel_count_last_channel_has_implicit_zero_partner(n, options):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(1, 256, (3, 5, 2, 2), generator=g)    # no zeros: every real pair is bSPARQ'd
    out = vsparq(q, n, options, dim=1)
    T = frozenset(SPEC_T[(n, options)])
    for idx, v in zip(torch.cartesian_prod(*(torch.arange(s) for s in q.shape)).tolist(), q.flatten().tolist()):
        want = ref_budget(v, n, "round") if idx[1] == 4 else ref_bsparq(v, n, T, "round")
        assert out[tuple(idx)].item() == want
    # single channel: it is alone with its implicit zero
    one = torch.tensor([[200], [127]])
    assert vsparq(one, 4, 5).tolist() == [[200], [127]]


def test_dim_handling_nchw_vs_nhwc_and_other_layouts():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 256, (2, 7, 3, 4), generator=g)
    q[q < 90] = 0                                            # plenty of zero partners
    nchw = vsparq(q, dim=1)
    nhwc = vsparq(q.permute(0, 2, 3, 1), dim=-1)             # a non-contiguous view
    assert torch.equal(nchw, nhwc.permute(0, 3, 1, 2))
    assert torch.equal(nchw, vsparq(q, dim=-3))
    # (N, C) and (N, L, C) against the reference, pairs along the last dim
    for shape in [(4, 6), (3, 5, 9)]:
        x = torch.randint(0, 256, shape, generator=g)
        x[x < 80] = 0
        flat = x.reshape(-1, shape[-1]).tolist()
        want = []
        for row in flat:
            padded = row + [0] * (len(row) % 2)
            res = []
            for c in range(0, len(padded), 2):
                res += ref_pair(padded[c], padded[c + 1], 4, 5, "round")
            want.append(res[:len(row)])
        assert vsparq(x, dim=-1).reshape(-1, shape[-1]).tolist() == want
        assert vsparq(x, dim=len(shape) - 1).reshape(-1, shape[-1]).tolist() == want


def test_pairs_are_channels_2c_2c_plus_1():
    # (0, 127) is a zero pair -> 127 kept; (127, 127) is not -> both bSPARQ'd; the pairing
    # (127, 0) in the middle would only arise if pairs were (1, 2)
    x = torch.tensor([[0, 127, 127, 127]])
    assert vsparq(x).tolist() == [[0, 127, 120, 120]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_dtype_preserved(dtype):
    q = ALL_PAIRS[::97].to(dtype)
    for out in (bsparq(q), vsparq(q), vsparq(q, 3), vsparq_only(q), bsparq(q, 2, 7, "raw")):
        assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(vsparq(q).long(), vsparq(q.long()))
    assert torch.equal(bsparq(q, 4, 3).long(), bsparq(q.long(), 4, 3))


def test_empty_and_scalar():
    e = torch.empty(0, 4, dtype=torch.uint8)
    assert vsparq(e).shape == (0, 4) and bsparq(e).dtype == torch.uint8
    assert bsparq(torch.tensor(127)).item() == 120


def test_input_not_modified():
    q = ALL_PAIRS[::13].clone()
    before = q.clone()
    vsparq(q)
    bsparq(q)
    sparq_stats(q)
    assert torch.equal(q, before)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), torch.tensor([True, False]),
                                 torch.tensor([1, 2], dtype=torch.int8)])
def test_non_integer_or_narrow_dtype_raises_type_error(bad):
    for fn in (bsparq, vsparq, vsparq_only, sparq_stats):
        with pytest.raises(TypeError, match=r"integer codes in \[0, 255\].*got dtype"):
            fn(bad)
    with pytest.raises(TypeError, match="Tensor"):
        bsparq([1, 2, 3])


@pytest.mark.parametrize("values,found", [([0, 256], r"\[0, 256\]"), ([-1, 3], r"\[-1, 3\]")])
def test_out_of_range_codes_raise_value_error(values, found):
    for dtype in (torch.int16, torch.int32, torch.int64):
        with pytest.raises(ValueError, match=r"in \[0, 255\]; found values in " + found):
            vsparq(torch.tensor(values, dtype=dtype))
        with pytest.raises(ValueError, match="found values"):
            bsparq(torch.tensor(values, dtype=dtype))


@pytest.mark.parametrize("bits,options,match", [
    (4, 4, r"bits=4 must be 5 / 3 / 2; got 4"),
    (4, 6, r"bits=4 must be 5 / 3 / 2"),
    (3, 5, r"bits=3 must be 6 or None"),
    (2, 5, r"bits=2 must be 7 or None"),
    (5, None, r"bits must be 4, 3 or 2; got 5"),
    (8, 5, r"bits must be 4, 3 or 2"),
])
def test_bad_bits_or_options(bits, options, match):
    q = torch.tensor([3, 0])
    with pytest.raises(ValueError, match=match):
        bsparq(q, bits=bits, options=options)
    with pytest.raises(ValueError, match=match):
        vsparq(q, bits=bits, options=options)


def test_bad_rounding_mode_dim():
    q = torch.tensor([[3, 0]])
    with pytest.raises(ValueError, match="'round'.*'raw'.*got 'floor'"):
        bsparq(q, rounding="floor")
    with pytest.raises(ValueError, match="mode must be one of"):
        sparq_stats(q, mode="psparq")
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 2"):
        vsparq(q, dim=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        vsparq(torch.tensor(5))
    with pytest.raises(ValueError, match="bits must be 4"):
        sparq_stats(q, bits=3, mode="vsparq")


# ---------------------------------------------------------------- statistics

def test_stats_all_zero():
    s = sparq_stats(torch.zeros(2, 4, 3, dtype=torch.uint8))
    assert s["values"] == 24 and s["nonzero"] == 0 and s["pairs"] == 12
    assert s["zero_fraction"] == 1.0 and s["zero_partner_fraction"] == 1.0
    assert s["window_hist"] == {"7": 0, "6": 0, "5": 0, "4": 0, "3": 0, "partner_budget": 0, "zero": 24}
    assert s["mean_bits"] == 0.0 and s["mean_bits_nonzero"] is None and s["mse"] == 0.0
    assert s["bits_distribution"] == {0.0: 1.0}


def test_stats_small_tensor_hand_computed():
    # pairs: (0, 127) (5, 200) (33, implicit 0)
    x = torch.tensor([[0, 127, 5, 200, 33]])
    s = sparq_stats(x)                                   # sparq, 4 bits, 5opt, round
    assert (s["values"], s["nonzero"], s["pairs"]) == (5, 4, 3)
    assert s["zero_fraction"] == pytest.approx(1 / 5)
    assert s["zero_partner_fraction"] == pytest.approx(2 / 3)
    # 5 -> window 3:0 (top 3); 200 -> window 7:4 (top 7) -> 192; 127 and 33 keep 8 bits
    assert s["window_hist"] == {"7": 1, "6": 0, "5": 0, "4": 0, "3": 1, "partner_budget": 2, "zero": 1}
    assert s["mean_bits"] == pytest.approx((0 + 8 + 4 + 4 + 8) / 5)
    assert s["mean_bits_nonzero"] == pytest.approx(24 / 4)
    assert s["bits_distribution"] == pytest.approx({0.0: 0.2, 4.0: 0.4, 8.0: 0.4})
    assert s["mse"] == pytest.approx(8 ** 2 / 5)

    b = sparq_stats(x, mode="bsparq")                    # no partner test: 127 -> 120 (top 6), 33 -> 32 (top 5)
    assert b["window_hist"] == {"7": 1, "6": 1, "5": 1, "4": 0, "3": 1, "partner_budget": 0, "zero": 1}
    assert b["mean_bits"] == pytest.approx(16 / 5) and b["mean_bits_nonzero"] == pytest.approx(4.0)
    assert b["mse"] == pytest.approx((7 ** 2 + 8 ** 2 + 1) / 5)
    assert b["zero_partner_fraction"] == pytest.approx(2 / 3)   # a property of the data, any mode

    v = sparq_stats(x, mode="vsparq")                    # 5 -> 0 and 200 -> 192 in window 7:4
    assert v["window_hist"] == {"7": 2, "partner_budget": 2, "zero": 1}
    assert v["mse"] == pytest.approx((25 + 64) / 5)

    s2 = sparq_stats(x, bits=2)                          # 127 -> 120 and 33 -> 32 in the 4-bit budget
    assert s2["window_hist"]["partner_budget"] == 2 and s2["window_hist"]["7"] == 1
    assert s2["mean_bits"] == pytest.approx((0 + 4 + 2 + 2 + 4) / 5)


@pytest.mark.parametrize("mode,bits,options,rounding", [
    ("sparq", 4, 5, "round"), ("sparq", 4, 2, "raw"), ("sparq", 3, 6, "round"), ("sparq", 2, 7, "raw"),
    ("bsparq", 4, 3, "round"), ("vsparq", 4, None, "round"),
])
def test_stats_agree_with_kernel_output(mode, bits, options, rounding):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (4, 9, 5, 5), generator=g)
    q[q < 100] = 0
    s = sparq_stats(q, bits=bits, options=options, rounding=rounding, dim=1, mode=mode)
    fn = {"sparq": lambda t: vsparq(t, bits, options, rounding),
          "bsparq": lambda t: bsparq(t, bits, options, rounding),
          "vsparq": lambda t: vsparq_only(t, rounding=rounding)}[mode]
    out = fn(q)
    assert s["mse"] == pytest.approx(((out - q).double() ** 2).mean().item())
    assert s["zero_fraction"] == pytest.approx((q == 0).double().mean().item())
    assert sum(s["window_hist"].values()) == q.numel()
    padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)    # odd C: implicit zero partner
    pair_zero = (padded.unflatten(1, (5, 2)) == 0).any(2)
    assert s["pairs"] == pair_zero.numel()
    assert s["zero_partner_fraction"] == pytest.approx(pair_zero.double().mean().item())
    assert sum(s["bits_distribution"].values()) == pytest.approx(1.0)
    assert s["mean_bits"] == pytest.approx(sum(b * f for b, f in s["bits_distribution"].items()))


def test_kernel_stats_accumulate_over_calls():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 256, (2, 6, 3, 3), generator=g)
    b = torch.randint(0, 256, (3, 6, 3, 3), generator=g)
    a[a < 128] = 0
    k = SparqKernel("sparq", 4, 3, track_stats=True)
    assert torch.equal(k(a), vsparq(a, 4, 3)) and torch.equal(k(b), vsparq(b, 4, 3))
    assert k.stats() == sparq_stats(torch.cat([a, b]), 4, 3)
    k.reset_stats()
    assert k.stats()["values"] == 0 and k.stats()["mse"] is None


def test_tables_cached_per_config_and_device():
    bsparq(ALL_CODES, 4, 3)
    key = (("bsparq", 4, 3, "round"), "cpu", torch.int64)
    first = sparq_kernels._DEVICE_TABLES[key]
    bsparq(ALL_CODES, 4, 3)
    assert sparq_kernels._DEVICE_TABLES[key] is first


# ---------------------------------------------------------------- float fast path

@pytest.mark.parametrize("mode,bits,options", [("sparq", 4, 5), ("sparq", 3, None), ("bsparq", 4, 2),
                                               ("vsparq", 4, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quant_equals_codes_path(mode, bits, options, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(3, 7, 4, 5, generator=g, dtype=dtype))
    dx = float(x.max()) / 255
    codes = torch.clamp(torch.round(x / dx), 0, 255).long()
    k = SparqKernel(mode, bits, options, track_stats=True)
    ref = SparqKernel(mode, bits, options, track_stats=True)
    got = k.fake_quant(x, dx)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, ref(codes).to(dtype) * dx)
    assert k.stats() == ref.stats()
    # channels-last input (a non-contiguous buffer) and a 0-d tensor dx give the same values
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(SparqKernel(mode, bits, options).fake_quant(cl, torch.tensor(dx, dtype=dtype)), got)


def test_fake_quant_clamps_and_rejects_integer_input():
    k = SparqKernel()
    x = torch.tensor([[-1.0, 3.0, 300.0, 127.0]])
    assert k.fake_quant(x, 1.0).tolist() == [[0.0, 3.0, 240.0, 120.0]]
    with pytest.raises(TypeError, match="floating-point"):
        k.fake_quant(torch.tensor([[1, 2]]), 1.0)
