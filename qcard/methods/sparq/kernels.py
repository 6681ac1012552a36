"""SPARQ kernels: sparsity-aware post-training activation quantization (Shomron et al., NeurIPS 2021).

Rules (Shomron et al., Post-Training Sparsity-Aware Quantization, NeurIPS 2021, and the authors' code). All kernels take 8-bit unsigned
activation codes q in [0, 255] and return codes on the same 8-bit scale and dtype.

bSPARQ (one code, window of n bits whose top bit sits at a position t of the set T):
    q == 0 -> 0
    p   = position of the most significant set bit of q
    top = smallest t in T with t >= p;   lsb = top - n + 1
    raw:   (q >> lsb) << lsb
    round: min(round_half_to_even(q / 2**lsb), 2**n - 1) << lsb
           (an overflow saturates; the window never moves up: 127 with 5opt -> 120)

    bits=4: options 5 -> T={7,6,5,4,3}, 3 -> {7,5,3}, 2 -> {7,3}
    bits=3: the fixed 6opt set T={2..7} (options 6 or None)
    bits=2: the fixed 7opt set T={1..7} (options 7 or None)

vSPARQ (the full "SPARQ" of the released code): codes are paired along `dim`
(channels 2c, 2c+1). If either of a pair is zero, the non-zero one gets a 2n-bit budget
(n=4: kept exact; n=3: 6-bit window, T={5,6,7}; n=2: 4-bit window, T={3..7});
otherwise both go through bSPARQ(n, T). With an odd channel count the last channel is
paired with an implicit zero, so it always gets the 2n-bit budget (a choice; the code is silent).

vSPARQ-only ablation (a choice): both non-zero -> the fixed window 7:4 (plain 4-bit at 16*dx,
rounded and saturated at 15, or truncated); a zero partner -> kept exact (8 bits).

Implementation: every result depends only on (code, partner-has-zero), so one 512-entry table
per (mode, bits, options, rounding), cached per device and dtype, is indexed by
code + 256 * partner_has_zero. The same index feeds a bincount that gives every statistic.

"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

WINDOW_SETS: Dict[Tuple[int, int], Tuple[int, ...]] = {
    (4, 5): (7, 6, 5, 4, 3),
    (4, 3): (7, 5, 3),
    (4, 2): (7, 3),
    (3, 6): (2, 3, 4, 5, 6, 7),
    (2, 7): (1, 2, 3, 4, 5, 6, 7),
}
DEFAULT_OPTIONS = {4: 5, 3: 6, 2: 7}
# The 2n-bit budget a value gets when its partner is zero: (window bits, T); None = kept exact.
_PARTNER_BUDGET = {4: None, 3: (6, (5, 6, 7)), 2: (4, (3, 4, 5, 6, 7))}
_ROUNDINGS = ("round", "raw")
_MODES = ("sparq", "bsparq", "vsparq")
_ALLOWED_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)

# Histogram buckets of the class table: 0..7 = window top position, then these two.
_ZERO, _BUDGET = 8, 9


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def resolve_setting(mode: str, bits: int, options: Optional[int], rounding: str) -> Tuple[str, int, Optional[int], str]:
    """Validate the settings; return (mode, bits, options, rounding) with options filled in."""
    if mode not in _MODES:
        raise ValueError(f"SPARQ mode must be one of {', '.join(repr(m) for m in _MODES)}; got {mode!r}")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"SPARQ rounding must be 'round' (half to even, saturating) or 'raw' (truncate); "
                         f"got {rounding!r}")
    if mode == "vsparq":
        # the ablation's window is fixed (7:4), so bits/options do not choose anything
        if bits != 4:
            raise ValueError(f"the vSPARQ-only ablation uses a fixed 4-bit window (7:4); bits must be 4, got {bits!r}")
        return mode, 4, None, rounding
    if isinstance(bits, bool) or bits not in DEFAULT_OPTIONS:
        raise ValueError(f"SPARQ window bits must be 4, 3 or 2; got {bits!r}")
    if options is None:
        options = DEFAULT_OPTIONS[bits]
    allowed = sorted((o for (b, o) in WINDOW_SETS if b == bits), reverse=True)
    if isinstance(options, bool) or (bits, options) not in WINDOW_SETS:
        extra = "" if bits == 4 else " or None (the fixed set)"
        raise ValueError(f"SPARQ options for bits={bits} must be {' / '.join(map(str, allowed))}{extra}; "
                         f"got {options!r}")
    return mode, bits, options, rounding


def _check_codes(q) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"SPARQ kernels take a torch.Tensor of 8-bit codes; got {type(q).__name__}")
    if q.dtype not in _ALLOWED_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in _ALLOWED_DTYPES)
        hint = ""
        if q.dtype.is_floating_point or q.dtype.is_complex:
            hint = " (quantize first: q = clamp(round(x / dx), 0, 255))"
        elif q.dtype == torch.int8:
            hint = " (int8 cannot hold codes 128..255)"
        raise TypeError(f"SPARQ kernels take integer codes in [0, 255] of dtype {allowed}; "
                        f"got dtype {str(q.dtype).replace('torch.', '')}{hint}")
    if q.dtype != torch.uint8 and q.numel():
        lo, hi = (int(v) for v in torch.aminmax(q))
        if lo < 0 or hi > 255:
            raise ValueError(f"SPARQ kernels take unsigned 8-bit codes in [0, 255]; found values in [{lo}, {hi}]")


def _check_dim(q: torch.Tensor, dim: int) -> int:
    if q.dim() == 0:
        raise ValueError("SPARQ pairs channels along `dim`, so the tensor needs at least one dimension; got a scalar")
    if not -q.dim() <= dim < q.dim():
        raise ValueError(f"SPARQ pair dim must be in [{-q.dim()}, {q.dim() - 1}] for a {q.dim()}-d tensor; got {dim}")
    return dim % q.dim()


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------

def _window(n: int, tops: Tuple[int, ...], rounding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(result, window top) for every code 0..255 under an n-bit window with top positions `tops`.
    The top of code 0 is -1 (no window)."""
    codes = torch.arange(256, dtype=torch.int64)
    msb = torch.zeros(256, dtype=torch.int64)
    for k in range(1, 8):                       # msb position = number of powers 2^k (k>=1) <= q
        msb += (codes >= (1 << k)).long()
    top_of = [min(t for t in tops if t >= p) for p in range(8)]   # loop over 8 positions, not codes
    top = torch.tensor(top_of, dtype=torch.int64)[msb]
    scale = torch.pow(2, top - n + 1)
    if rounding == "raw":
        val = codes // scale * scale
    else:  # q / 2^lsb is exact in float64, and torch.round rounds half to even
        val = torch.round(codes.double() / scale).clamp(max=(1 << n) - 1).long() * scale
    val[0], top[0] = 0, -1
    return val, top


def window_lut(bits: int = 4, options: Optional[int] = None, rounding: str = "round") -> torch.Tensor:
    """The 256-entry bSPARQ table (int64, CPU): window_lut(...)[q] == bsparq(q, ...)."""
    _, bits, options, rounding = resolve_setting("bsparq", bits, options, rounding)
    return _window(bits, WINDOW_SETS[(bits, options)], rounding)[0]


_CLASS_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_DEVICE_TABLES: Dict[tuple, torch.Tensor] = {}


def _class_tables(cfg: tuple) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """512-entry (value, bits used, histogram bucket) over class = code + 256 * partner_has_zero."""
    if cfg in _CLASS_TABLES:
        return _CLASS_TABLES[cfg]
    mode, n, options, rounding = cfg
    codes = torch.arange(256, dtype=torch.int64)
    nz = codes > 0
    if mode == "vsparq":
        lo_val, lo_top = _window(4, (7,), rounding)        # fixed window 7:4
    else:
        lo_val, lo_top = _window(n, WINDOW_SETS[(n, options)], rounding)
    lo_bits = nz.long() * n
    lo_bucket = torch.where(nz, lo_top, torch.full_like(codes, _ZERO))
    if mode == "bsparq":                                   # partner is not looked at
        hi_val, hi_bits, hi_bucket = lo_val, lo_bits, lo_bucket
    else:
        budget = None if mode == "vsparq" else _PARTNER_BUDGET[n]
        hi_val = codes.clone() if budget is None else _window(budget[0], budget[1], rounding)[0]
        hi_bits = nz.long() * (8 if budget is None else budget[0])
        hi_bucket = torch.where(nz, torch.full_like(codes, _BUDGET), torch.full_like(codes, _ZERO))
    out = (torch.cat([lo_val, hi_val]), torch.cat([lo_bits, hi_bits]), torch.cat([lo_bucket, hi_bucket]))
    _CLASS_TABLES[cfg] = out
    return out


def _device_table(cfg: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (cfg, str(device), dtype)
    tab = _DEVICE_TABLES.get(key)
    if tab is None:
        tab = _DEVICE_TABLES[key] = _class_tables(cfg)[0].to(device=device, dtype=dtype)
    return tab


# ---------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------

def mark_pairs_(idx: torch.Tensor, dim: int) -> int:
    """In place on a contiguous int32 code tensor: add 256 to every code whose pair (2c, 2c+1
    along dim) holds a zero; an odd last channel has an implicit zero partner. Returns the
    number of odd-channel values."""
    C = idx.shape[dim]
    even = C - C % 2
    if even:
        pairs = idx.narrow(dim, 0, even).unflatten(dim, (even // 2, 2))   # a view: writes go to idx
        a, b = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
        # codes are >= 0, so min == 0 <=> one of the pair is zero; eq_ in place saves an allocation
        flag = torch.minimum(a, b).eq_(0).unsqueeze(dim + 1)
        pairs.add_(flag, alpha=256)
    odd = 0
    if C % 2:
        last = idx.narrow(dim, C - 1, 1)
        last.add_(256)
        odd = last.numel()
    return odd


class SparqKernel:
    """One SPARQ setting, applied to code tensors, optionally accumulating statistics.

    mode: "sparq" (vSPARQ pair rule + bSPARQ, the released code), "bsparq" (bSPARQ only, no
    partner test) or "vsparq" (the vSPARQ-only ablation). Calling it on codes returns the new
    codes; fake_quant(x, dx) goes from float activations to dequantized SPARQ activations.
    With track_stats=True every call also adds to the counts that stats() turns into a dict
    (see sparq_stats). Statistics are additive over calls (e.g. over evaluation batches).
    """

    def __init__(self, mode: str = "sparq", bits: int = 4, options: Optional[int] = None,
                 rounding: str = "round", dim: int = 1, track_stats: bool = False):
        self.cfg = resolve_setting(mode, bits, options, rounding)
        self.mode, self.bits, self.options, self.rounding = self.cfg
        self.dim = dim
        self.track_stats = track_stats
        self.reset_stats()

    def reset_stats(self) -> None:
        self._counts: Optional[torch.Tensor] = None     # 512 class counts
        self._odd = 0                                   # values paired with an implicit zero
        self._pairs = 0

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """SPARQ the codes q (integer tensor in [0, 255]); same shape and dtype."""
        _check_codes(q)
        needs_pairs = self.mode != "bsparq" or self.track_stats
        dim = _check_dim(q, self.dim) if needs_pairs else self.dim
        table = _device_table(self.cfg, q.device, q.dtype)
        if q.numel() == 0:
            return q.clone()
        if not needs_pairs:
            flat = q.reshape(-1)
            flat = flat if flat.dtype == torch.int64 else flat.to(torch.int32)
            return table.index_select(0, flat).view(q.shape)
        idx = q.to(torch.int32, memory_format=torch.contiguous_format, copy=True)
        self._index_(idx, dim)
        return table.index_select(0, idx.view(-1)).view(q.shape)

    def fake_quant(self, x: torch.Tensor, dx) -> torch.Tensor:
        """dx * SPARQ(clamp(round(x / dx), 0, 255)) for float activations x, in x's dtype.

        The fast path a simulated model uses: no uint8 intermediate and few full-size buffers.
        Negative x are clamped to code 0 here; the paper's code rejects them, so a caller that
        wants that check must make it. dx: a positive float or a 0-d tensor.
        """
        return self.float_codes(x, dx, "fake_quant").mul_(dx)

    def float_codes(self, x: torch.Tensor, dx, _who: str = "float_codes") -> torch.Tensor:
        """SPARQ(clamp(round(x / dx), 0, 255)) as integer-valued floats in x's dtype (not rescaled):
        what a simulated integer layer multiplies with its weight codes before rescaling by dx."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{_who} takes a floating-point activation tensor; got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        needs_pairs = self.mode != "bsparq" or self.track_stats
        dim = _check_dim(x, self.dim) if needs_pairs else self.dim
        if x.numel() == 0:
            return x.clone()
        codes = torch.div(x, dx).round_().clamp_(0, 255)           # round half to even
        idx = codes.to(torch.int32, memory_format=torch.contiguous_format)
        if needs_pairs:
            self._index_(idx, dim)
        table = _device_table(self.cfg, x.device, x.dtype)
        flat = idx.view(-1)
        if codes.is_contiguous():                                  # reuse the codes buffer for the result
            out = torch.index_select(table, 0, flat, out=codes.view(-1))
        else:
            out = table.index_select(0, flat)
        return out.view(x.shape)

    def _index_(self, idx: torch.Tensor, dim: int) -> None:
        """Turn contiguous int32 codes into class indices in place; count them if tracking."""
        odd = mark_pairs_(idx, dim)
        if self.track_stats:
            counts = torch.bincount(idx.view(-1), minlength=512)
            self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)
            self._odd += odd
            C = idx.shape[dim]
            self._pairs += idx.numel() // C * ((C + 1) // 2)

    def stats(self) -> dict:
        """Statistics of every code seen since the last reset (see sparq_stats for the keys)."""
        counts = torch.zeros(512, dtype=torch.int64) if self._counts is None else self._counts.cpu()
        return _stats_from_counts(self.cfg, counts, self._pairs, self._odd)


def _stats_from_counts(cfg: tuple, counts: torch.Tensor, pairs: int, odd: int) -> dict:
    mode, bits, options, rounding = cfg
    val, used, bucket = _class_tables(cfg)
    codes = torch.arange(512) % 256
    total = int(counts.sum())
    zeros = int(counts[0] + counts[256])
    nonzero = total - zeros
    # each flagged even-part pair puts 2 values in the upper half; each odd-channel value 1
    zero_pairs = (int(counts[256:].sum()) - odd) // 2 + odd
    per_bucket = torch.bincount(bucket, weights=counts.double(), minlength=10).long().tolist()
    hist: Dict[str, int] = {}
    positions = (7,) if mode == "vsparq" else WINDOW_SETS[(bits, options)]
    for t in sorted(positions, reverse=True):
        hist[str(t)] = per_bucket[t]
    hist["partner_budget"] = per_bucket[_BUDGET]
    hist["zero"] = per_bucket[_ZERO]
    bits_sum = float((counts.double() * used.double()).sum())
    sq_err = float((counts.double() * (val - codes).double().pow(2)).sum())
    dist: Dict[float, float] = {}
    if total:
        per_bits = torch.bincount(used, weights=counts.double(), minlength=17)
        dist = {float(b): float(c) / total for b, c in enumerate(per_bits.tolist()) if c}
    return {
        "mode": mode, "bits": bits, "options": options, "rounding": rounding,
        "window_tops": list(positions),
        "values": total, "nonzero": nonzero, "pairs": pairs,
        "zero_fraction": zeros / total if total else None,
        "zero_partner_fraction": zero_pairs / pairs if pairs else None,
        "window_hist": hist,
        "bits_distribution": dist,
        "mean_bits": bits_sum / total if total else None,
        "mean_bits_nonzero": bits_sum / nonzero if nonzero else None,
        "mse": sq_err / total if total else None,
    }


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------

def bsparq(q: torch.Tensor, bits: int = 4, options: Optional[int] = None, rounding: str = "round") -> torch.Tensor:
    """bSPARQ every code of q (no partner test): an n-bit window starting at the code's most
    significant set bit, its top placed at the smallest allowed position t >= that bit.

    q: integer tensor (uint8/int16/int32/int64) of codes in [0, 255]; result: same shape and dtype.
    bits=4 with options 5 (T={7,6,5,4,3}), 3 ({7,5,3}) or 2 ({7,3}); bits=3 with options 6 or None
    (T={2..7}); bits=2 with options 7 or None (T={1..7}). options=None picks the default set for
    the bits (5opt for bits=4). rounding: "round" = half to even, saturating at 2^n-1 without
    moving the window (127 with 5opt -> 120); "raw" = truncate the bits below the window.
    """
    return SparqKernel("bsparq", bits, options, rounding)(q)


def vsparq(q: torch.Tensor, bits: int = 4, options: Optional[int] = None, rounding: str = "round",
           dim: int = 1) -> torch.Tensor:
    """SPARQ (vSPARQ pair rule + bSPARQ) on codes q, pairing entries 2c, 2c+1 along `dim`.

    If either of a pair is zero, the non-zero one gets a 2n-bit budget (bits=4: kept exact;
    bits=3: 6-bit window with T={5,6,7}; bits=2: 4-bit window with T={3..7}); otherwise both
    go through bsparq(bits, options, rounding). An odd last channel is paired with an implicit
    zero (so it gets the 2n-bit budget). Same shape and dtype as q; arguments as in bsparq.
    """
    return SparqKernel("sparq", bits, options, rounding, dim)(q)


def vsparq_only(q: torch.Tensor, dim: int = 1, rounding: str = "round") -> torch.Tensor:
    """The vSPARQ-only ablation: pairs along `dim` with both codes non-zero get the fixed window
    7:4 (plain 4-bit at 16*dx: round half to even and saturate at 15, or truncate with "raw");
    a code whose partner is zero (or an odd last channel) is kept exact."""
    return SparqKernel("vsparq", 4, None, rounding, dim)(q)


def sparq_stats(q: torch.Tensor, bits: int = 4, options: Optional[int] = None, rounding: str = "round",
                dim: int = 1, mode: str = "sparq") -> dict:
    """Statistics of one SPARQ setting on codes q (computed with one bincount over the same
    class index the kernel uses). mode: "sparq" = vsparq(), "bsparq" = bsparq(),
    "vsparq" = vsparq_only() (bits must be 4, options is ignored).

    Keys:
      values, nonzero, pairs        counts (pairs along dim; an odd last channel makes a pair with
                                    an implicit zero)
      zero_fraction                 zero codes / values
      zero_partner_fraction         pairs with at least one zero (implicit zeros count) / pairs
      window_hist                   {"<t>": values whose n-bit window has top t, for every t in T,
                                     "partner_budget": non-zero values given the 2n-bit budget
                                     (kept exact for bits=4), "zero": zero codes}
      bits_distribution             {bits: fraction of values}; bits used = n for an n-bit window,
                                    2n for the partner budget (8 = exact), 0 for a zero code
      mean_bits, mean_bits_nonzero  mean bits used over all values / over non-zero codes
      mse                           mean (result - q)^2 in code units (times dx^2 for real units)
    Means over no values are None.
    """
    k = SparqKernel(mode, bits, options if mode != "vsparq" else None, rounding, dim, track_stats=True)
    k(q)
    return k.stats()


