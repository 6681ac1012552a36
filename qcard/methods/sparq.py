"""SPARQ: sparsity-aware post-training activation quantization (Shomron et al., NeurIPS 2021).

Rules (shared/specs/sparq.md, read from the authors' code). All kernels take 8-bit unsigned
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

The second half of this file is the method (SPARQ, registered as "sparq"): it swaps the model's
conv/linear layers for SparqConv2d/SparqLinear, calibrates the paper's base 8-bit model (or
qcard's own PTQ settings), and fills the card; see the comment block above class SparqParams.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from ..errors import QcardError
from ..records import LayerRecord
from .base import Method, MethodParams, QuantResult

__all__ = [
    "WINDOW_SETS",
    "bsparq",
    "vsparq",
    "vsparq_only",
    "sparq_stats",
    "SparqKernel",
    "window_lut",
    "SPARQ",
    "SparqParams",
    "SparqError",
    "SparqConv2d",
    "SparqLinear",
]

# (bits, options) -> window top positions T, in the spec's order.
WINDOW_SETS: Dict[Tuple[int, int], Tuple[int, ...]] = {
    (4, 5): (7, 6, 5, 4, 3),
    (4, 3): (7, 5, 3),
    (4, 2): (7, 3),
    (3, 6): (2, 3, 4, 5, 6, 7),
    (2, 7): (1, 2, 3, 4, 5, 6, 7),
}
_DEFAULT_OPTIONS = {4: 5, 3: 6, 2: 7}
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

def _resolve(mode: str, bits: int, options: Optional[int], rounding: str) -> Tuple[str, int, Optional[int], str]:
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
    if isinstance(bits, bool) or bits not in _DEFAULT_OPTIONS:
        raise ValueError(f"SPARQ window bits must be 4, 3 or 2; got {bits!r}")
    if options is None:
        options = _DEFAULT_OPTIONS[bits]
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
    _, bits, options, rounding = _resolve("bsparq", bits, options, rounding)
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

def _mark_pairs_(idx: torch.Tensor, dim: int) -> int:
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
        self.cfg = _resolve(mode, bits, options, rounding)
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
        odd = _mark_pairs_(idx, dim)
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


# ---------------------------------------------------------------------------
# The method: SPARQ on a model (the card's "sparq" method)
# ---------------------------------------------------------------------------
#
# What runs (base "paper", the authors' code as read in shared/specs/sparq.md):
#   * quantized layers: every nn.Conv2d and nn.Linear except the first and the last MAC layer
#     (first conv and final FC stay FP32). Hidden Linear layers (not in the paper's CNNs) are
#     treated like convs by default (a choice: hidden_linear="fp32" keeps them FP32).
#   * weights: symmetric per output channel, dw = 2*max|w|/255, codes clamp(round(w/dw), -128, 127),
#     computed once and cached as integer-valued float32 tensors.
#   * activations (inputs of each quantized layer): unsigned per tensor, dx = max_mean/255
#     (max_mean = mean over calibration samples of each sample's max), codes
#     clamp(round(x/dx), 0, 255), then the variant's window rule on the codes.
#   * the layer computes conv(codes_x, codes_w) in float32 and rescales by dx*dw[c], then adds
#     the float bias; BN is not folded; pooling, adds, concat stay FP32.
#   * calibration: one pass over the calibration set with batch norms in train mode (no weight
#     update) that also refreshes their running statistics, then (bn_recalibration) the same
#     pass with the quantized model before evaluating; finally a statistics pass in eval mode.
# Base "qcard": BN folded first (conv weights absorb the BN), dw = max|w|/127, activation ranges
# min-max (or percentile), first/last layers at plain 8-bit, no BN passes (nothing left to refresh).

_VARIANTS = ("sparq", "bsparq", "vsparq", "a2", "a3", "a4", "a8")
_PLAIN_BITS = {"a2": 2, "a3": 3, "a4": 4, "a8": 8}
_WINDOW_VARIANTS = ("sparq", "bsparq", "vsparq")
_PAPER_CAL_BATCH = 128          # the reference code: 17 batches of 128 (~2,048 images)


class SparqError(QcardError):
    """A model SPARQ cannot handle as asked (e.g. negative activations where SPARQ is applied)."""


class SparqParams(MethodParams):
    """Parameters of the sparq method (plain scalars, so a config can sweep any of them)."""
    variant: Literal["sparq", "bsparq", "vsparq", "a2", "a3", "a4", "a8"] = Field(
        "sparq", description="sparq: vSPARQ pairs + bSPARQ windows (the paper); bsparq: windows only; "
                             "vsparq: the vSPARQ-only ablation (fixed 7:4 window); a4 (a3, a2): plain "
                             "4-bit (3-, 2-bit) activations on the grid 2^(8-n)*dx, the baseline with the "
                             "same calibration; a8: the 8-bit base model itself")
    bits: Literal[4, 3, 2] = Field(4, description="window bits n (sparq/bsparq); set by the variant for "
                                                   "a2/a3/a4; ignored for a8")
    options: Optional[Literal[5, 3, 2, 6, 7]] = Field(
        None, description="window placements: 5/3/2 for bits=4 (5opt default); 6 for bits=3; 7 for bits=2")
    rounding: Literal["round", "raw"] = Field("round", description="window rounding: half to even "
                                              "(saturating) or truncation")
    base: Literal["paper", "qcard"] = Field("paper", description="paper: the reference 8-bit model; "
                                            "qcard: BN folded, 127-divisor weights, min-max ranges")
    negatives: Literal["error", "exclude"] = Field(
        "error", description="negative inputs of a SPARQ layer: error (the reference raises) or exclude "
                             "(that layer runs at plain signed 8-bit, recorded on the card)")
    bn_recalibration: bool = Field(True, description="paper base: repeat the BN pass with SPARQ on")
    bn_stats: Literal["cumulative", "ema"] = Field(
        "cumulative", description="BN running statistics in the calibration passes: cumulative = reset "
                                  "and average over the calibration batches (momentum=None); ema = the "
                                  "reference's train-mode update (each BN's own momentum, from the trained stats)")
    activation_range: Optional[Literal["max_mean", "minmax", "percentile"]] = Field(
        None, description="activation range; default max_mean (paper) or minmax (qcard)")
    percentile: float = Field(99.99, gt=50, le=100, description="for activation_range=percentile")
    hidden_linear: Literal["sparq", "fp32"] = Field("sparq", description="Linear layers other than the last")
    first_last: Optional[Literal["fp32", "int8"]] = Field(
        None, description="first and last MAC layer: fp32 (paper default) or plain 8-bit (qcard default)")
    calibration_batch_size: int = Field(_PAPER_CAL_BATCH, ge=1, description="images per calibration batch")
    stats_size: int = Field(512, ge=1, description="calibration images in the statistics pass")

    @model_validator(mode="after")
    def _resolve(self) -> "SparqParams":
        v = self.variant
        if v == "vsparq" or v in _PLAIN_BITS:
            if self.options is not None:
                raise ValueError(f"options choose window placements of sparq/bsparq; variant '{v}' has none "
                                 f"(leave options out)")
            if v == "vsparq" and self.bits != 4:
                raise ValueError(f"variant 'vsparq' uses a fixed 4-bit window (7:4); bits must be 4 (got {self.bits})")
            if v in ("a2", "a3", "a4") and "bits" in self.model_fields_set and self.bits != _PLAIN_BITS[v]:
                raise ValueError(f"variant '{v}' is {_PLAIN_BITS[v]}-bit by definition; leave bits out "
                                 f"(got bits={self.bits})")
            if v in ("a2", "a3", "a4"):
                object.__setattr__(self, "bits", _PLAIN_BITS[v])
            if v in _PLAIN_BITS and self.rounding != "round":
                raise ValueError(f"rounding chooses how SPARQ windows round; variant '{v}' uses plain "
                                 f"round-to-nearest (leave rounding out)")
        else:
            try:
                _, _, opts, _ = _resolve(v, self.bits, self.options, self.rounding)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            object.__setattr__(self, "options", opts)     # defaults expanded for the card
        if self.activation_range is None:
            object.__setattr__(self, "activation_range", "max_mean" if self.base == "paper" else "minmax")
        if self.first_last is None:
            object.__setattr__(self, "first_last", "fp32" if self.base == "paper" else "int8")
        return self


# ------------------------------------------------------------------ per-layer pieces

class _Observer:
    """Range statistics of one layer's input over the calibration pass."""

    def __init__(self, percentile: Optional[float]):
        self.n = 0
        self.sum_max = self.sum_absmax = 0.0
        self.max = self.absmax = 0.0
        self.min = math.inf
        self.pct = percentile
        self.sum_pct = self.sum_abspct = 0.0
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        flat = x.detach().reshape(x.shape[0], -1).float()
        mn, mx = torch.aminmax(flat, dim=1)
        absmax = torch.maximum(mx, -mn)
        self.n += flat.shape[0]
        self.sum_max += float(mx.sum())
        self.sum_absmax += float(absmax.sum())
        self.max = max(self.max, float(mx.max()))
        self.absmax = max(self.absmax, float(absmax.max()))
        self.min = min(self.min, float(mn.min()))
        if self.pct is not None:
            v = flat.reshape(-1)
            if v.numel() > 1 << 24:                       # torch.quantile's size limit: a strided sample
                v = v[:: math.ceil(v.numel() / (1 << 24))]
            q = torch.tensor([self.pct / 100.0], device=v.device)
            self.sum_pct += float(torch.quantile(v, q))
            self.sum_abspct += float(torch.quantile(v.abs(), q))
            self.batches += 1

    def range(self, how: str, signed: bool) -> float:
        if self.n == 0:
            return 0.0
        if how == "max_mean":
            return (self.sum_absmax if signed else self.sum_max) / self.n
        if how == "minmax":
            return self.absmax if signed else self.max
        return (self.sum_abspct if signed else self.sum_pct) / max(1, self.batches)


class _PlainStats:
    """Statistics of a plain (non-window) activation quantizer, in the kernel's vocabulary."""

    def __init__(self, mode: str, bits: int):
        self.mode, self.bits = mode, bits
        self.values = self.zeros = self.pairs = self.zero_pairs = 0
        self.sq = 0.0

    def update(self, q8: torch.Tensor, result: torch.Tensor, dim: int) -> None:
        idx = q8.abs().to(torch.int32, memory_format=torch.contiguous_format)
        dim = dim % idx.dim()
        odd = _mark_pairs_(idx, dim)
        C = idx.shape[dim]
        flagged = int((idx >= 256).sum())
        self.values += idx.numel()
        self.pairs += idx.numel() // C * ((C + 1) // 2)
        self.zero_pairs += (flagged - odd) // 2 + odd
        self.zeros += int((q8 == 0).sum())
        self.sq += float((result.double() - q8.double()).pow_(2).sum())

    def stats(self) -> dict:
        t = self.values
        return {"mode": self.mode, "bits": self.bits, "options": None, "rounding": "round", "window_tops": None,
                "values": t, "nonzero": t - self.zeros, "pairs": self.pairs,
                "zero_fraction": self.zeros / t if t else None,
                "zero_partner_fraction": self.zero_pairs / self.pairs if self.pairs else None,
                "window_hist": None, "bits_distribution": {float(self.bits): 1.0} if t else {},
                "mean_bits": float(self.bits) if t else None,
                "mean_bits_nonzero": float(self.bits) if t > self.zeros else None,
                "mse": self.sq / t if t else None}


class _SparqLayerMixin:
    """Shared by SparqConv2d and SparqLinear. State "fp32": the float layer; "observe": the float
    layer plus range statistics of its input; "quant": the integer simulation
    (codes_x (*) codes_w in float32, rescaled by dx*dw[c], plus the float bias)."""

    def _sparq_setup(self, name: str, channel_dim: int, percentile: Optional[float]) -> None:
        self.sparq_name = name
        self.sparq_state = "fp32"
        self.sparq_role: Optional[str] = None    # sparq | bsparq | vsparq | a4 | u8 | s8
        self.channel_dim = channel_dim
        self.observer = _Observer(percentile)
        self.kernel: Optional[SparqKernel] = None
        self.plain_bits = 8
        self.dx = 1.0
        self.dw: Optional[torch.Tensor] = None
        self.plain_stats: Optional[_PlainStats] = None
        self.collect_stats = False

    # -- conversion ------------------------------------------------------------------------
    @torch.no_grad()
    def sparq_convert(self, role: str, dx: float, weight_divisor: float, kernel: Optional[SparqKernel] = None,
                      plain_bits: int = 8) -> None:
        """role: sparq | bsparq | vsparq (kernel given) | plain (plain_bits-bit grid) | u8 | s8."""
        self.sparq_role, self.dx, self.kernel, self.plain_bits = role, float(dx), kernel, int(plain_bits)
        w = self.weight.detach().double()       # float64 once: w = -max|w| gives exactly -127.5 -> -128
        wmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
        dw = torch.where(wmax > 0, wmax / weight_divisor, torch.ones_like(wmax))
        shape = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.round(w / dw.view(shape)).clamp_(-128, 127)
        self.dw = dw
        self.register_buffer("w_codes", codes.to(self.weight.dtype), persistent=False)
        scale = (dw * self.dx).to(self.weight.dtype)
        self.register_buffer("out_scale", scale.view(1, -1, 1, 1) if isinstance(self, nn.Conv2d) else scale,
                             persistent=False)

    # -- the quantized input ---------------------------------------------------------------
    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's activation codes (integer-valued floats, in units of dx) for input x."""
        role, dx = self.sparq_role, self.dx
        if role in _WINDOW_VARIANTS:
            out = self.kernel.float_codes(x, dx)
        elif role == "plain":                   # plain n-bit: the grid 2^(8-n)*dx, codes 0..2^n-1
            step = float(1 << (8 - self.plain_bits))
            out = torch.div(x, step * dx).round_().clamp_(0, (1 << self.plain_bits) - 1).mul_(step)
        elif role == "u8":
            out = torch.div(x, dx).round_().clamp_(0, 255)
        elif role == "s8":
            out = torch.div(x, dx).round_().clamp_(-128, 127)
        else:
            raise RuntimeError(f"layer {self.sparq_name}: not converted (role {role!r})")
        if self.collect_stats and self.plain_stats is not None:
            lo = -128 if role == "s8" else 0
            q8 = torch.div(x, dx).round_().clamp_(lo, 127 if role == "s8" else 255)
            self.plain_stats.update(q8, out, self.channel_dim)
        return out

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantized input the layer computes with: dx * input_codes(x)."""
        return self.input_codes(x).mul_(self.dx)

    def set_collect_stats(self, on: bool) -> None:
        self.collect_stats = on
        if self.kernel is not None:
            self.kernel.track_stats = on
            if on:
                self.kernel.reset_stats()
        if on and self.sparq_role not in _WINDOW_VARIANTS:
            mode = {"plain": f"a{self.plain_bits}", "u8": "a8", "s8": "int8_signed"}[self.sparq_role]
            self.plain_stats = _PlainStats(mode, self.plain_bits if self.sparq_role == "plain" else 8)

    def layer_stats(self) -> dict:
        st = self.kernel.stats() if self.sparq_role in _WINDOW_VARIANTS else self.plain_stats.stats()
        st["dx"] = self.dx
        st["mse_real"] = st["mse"] * self.dx ** 2 if st.get("mse") is not None else None
        return st


class SparqConv2d(nn.Conv2d, _SparqLayerMixin):
    def forward(self, x):
        if self.sparq_state == "quant":
            out = self._conv_forward(self.input_codes(x), self.w_codes, None).mul_(self.out_scale)
            return out if self.bias is None else out.add_(self.bias.view(1, -1, 1, 1))
        if self.sparq_state == "observe":
            self.observer.update(x)
        return super().forward(x)


class SparqLinear(nn.Linear, _SparqLayerMixin):
    def forward(self, x):
        if self.sparq_state == "quant":
            out = F.linear(self.input_codes(x), self.w_codes).mul_(self.out_scale)
            return out if self.bias is None else out.add_(self.bias)
        if self.sparq_state == "observe":
            self.observer.update(x)
        return super().forward(x)


def _swap_in(model: nn.Module, name: str, module: nn.Module, percentile: Optional[float]) -> _SparqLayerMixin:
    """Replace model.<name> by its SPARQ twin sharing the same weight and bias Parameters."""
    if type(module) is nn.Conv2d:
        new = SparqConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, module.bias is not None,
                          module.padding_mode, device="meta")
        dim = 1
    else:
        new = SparqLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
        dim = -1
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    new._sparq_setup(name, dim, percentile)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return new


def _batch_norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def _bn_train(model: nn.Module, how: str):
    """Everything in eval mode except batch norms, which use batch statistics and refresh their
    running statistics (cumulative: reset, then the plain average over the batches)."""
    bns = _batch_norms(model)
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.train()
        if how == "cumulative":
            m.reset_running_stats()
            m.momentum = None
    try:
        yield bns
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _run_batches(model, loader, device, progress: bool, desc: str, skip_single: bool = False,
                 after_batch=None) -> int:
    n = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            x = _images(batch)
            if skip_single and x.shape[0] < 2:      # BN in train mode cannot take one sample at 1x1
                continue
            model(x.to(device))
            n += x.shape[0]
            if after_batch is not None:
                after_batch()
    return n


# ------------------------------------------------------------------ BN folding (base "qcard")

def _fold_batch_norms(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold every batch norm that directly consumes the output of a conv/linear into it and
    replace the BN with Identity. Pairs are found from one forward pass (the BN's input is the
    very tensor the layer returned). Checked: the FP32 outputs must not change."""
    from ..quant.bn import can_fold, fold_bn

    names = {id(m): n for n, m in model.named_modules()}
    produced: Dict[int, Tuple[str, torch.Tensor]] = {}
    pairs: List[Tuple[str, str]] = []
    handles = []

    def after_gemm(mod, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[id(mod)], out)

    def before_bn(mod, args):
        src = produced.get(id(args[0])) if args else None
        if src is not None and src[1] is args[0]:
            pairs.append((src[0], names[id(mod)]))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(after_gemm))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn))
    model.eval()
    try:
        with torch.no_grad():
            ref = model(example)
    finally:
        for h in handles:
            h.remove()
    produced.clear()
    counts: Dict[str, int] = {}
    for g, b in pairs:
        counts[g] = counts.get(g, 0) + 1
        counts[b] = counts.get(b, 0) + 1
    folded = []
    for g, b in dict.fromkeys(pairs):
        layer, bn = model.get_submodule(g), model.get_submodule(b)
        if counts[g] > 1 or counts[b] > 1 or can_fold(layer, bn):
            continue                                    # shared or unfoldable: BN stays (recorded)
        fold_bn(layer, bn)
        parent, _, attr = b.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        folded.append((g, b))
    if isinstance(ref, torch.Tensor) and folded:
        with torch.no_grad():
            new = model(example)
        err = float((new - ref).abs().max())
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not err <= tol:
            raise SparqError(f"folding batch norm changed the FP32 outputs by {err:.3g} (tolerance {tol:.3g}): "
                             f"a batch norm's input is also used elsewhere; use base: paper (BN kept)")
    return folded


# ------------------------------------------------------------------ cost comparison

def _cost_comparison(traced: List[LayerRecord], layers: List[LayerRecord], window_layers: set,
                     variant: str = "sparq") -> Dict[str, Any]:
    """A8W8 on a fixed 8-bit array, A4W8 on a bit-scalable array and SPARQ on the SPARQ array, for
    the same layers (first/last and excluded layers as the method ran them), on systolic-ws."""
    from ..cost import apply_bits, estimate

    fields = ("weight_bits", "activation_bits", "output_bits", "weight_granularity", "weight_symmetric",
              "activation_granularity", "activation_symmetric", "weight_sparsity",
              "activation_bits_distribution", "weight_bits_distribution", "quantized", "reason")
    by_name = {r.name: r for r in layers}
    merged = []
    for r in traced:
        r = dataclasses.replace(r)
        src = by_name.get(r.name)
        if src is not None:
            for f in fields:
                setattr(r, f, getattr(src, f))
        merged.append(r)

    def at(bits: Optional[float], dist: bool) -> List[LayerRecord]:
        out = []
        for r in merged:
            if r.name in window_layers:
                r = dataclasses.replace(r, activation_bits=bits if bits is not None else r.activation_bits,
                                        activation_bits_distribution=r.activation_bits_distribution if dist else None)
            out.append(r)
        return out

    def act_traffic(est):
        return sum((row.get("activation_in_bits") or 0) + (row.get("activation_out_bits") or 0)
                   for row in est["layers"])

    int8 = estimate(apply_bits(merged, 8, 8), "systolic-ws")["latency_cycles"]
    a8 = estimate(at(8, False), "systolic-ws")
    a4 = estimate(at(4, False), "systolic-ws:pe_mode=bit_scalable")
    sp_recs = at(8, True)
    sp = estimate(sp_recs, "systolic-ws:pe_mode=sparq")
    fixed = estimate(sp_recs, "systolic-ws")
    # the SPARQ PE mode is chosen per profile; layers that do not run SPARQ (FP32, excluded 8-bit)
    # take their fixed 8-bit cycles here
    rows = [s if r.name in window_layers else f for r, s, f in zip(sp_recs, sp["layers"], fixed["layers"])]
    sp_cycles = sum(row["cycles"] or 0 for row in rows)
    sp_traffic = sum(row["memory_traffic_bits"] for row in rows)

    def window_cycles(layer_rows):
        return sum(row["cycles"] or 0 for r, row in zip(merged, layer_rows) if r.name in window_layers)

    def entry(pe, cycles, traffic, act, bops, wcycles):
        return {"profile": "systolic-ws", "pe_mode": pe, "latency_cycles": cycles,
                "speedup_vs_int8": int8 / cycles if cycles else None,
                "speedup_vs_a8w8": a8["latency_cycles"] / cycles if cycles else None,
                "quantized_layers_cycles": wcycles,
                "memory_traffic_bits": traffic, "activation_traffic_bits": act, "bops": bops}

    out = {
        "a8w8": entry("fixed8", a8["latency_cycles"], a8["memory_traffic_bits"], act_traffic(a8), a8["bops"],
                      window_cycles(a8["layers"])),
        "a4w8": entry("bit_scalable", a4["latency_cycles"], a4["memory_traffic_bits"], act_traffic(a4), a4["bops"],
                      window_cycles(a4["layers"])),
        "sparq": entry("sparq", sp_cycles, sp_traffic,
                       sum((row.get("activation_in_bits") or 0) + (row.get("activation_out_bits") or 0) for row in rows),
                       sum(row["bops"] for row in rows), window_cycles(rows)),
    }
    # this run's own layers on the PE it is meant for
    if variant in _WINDOW_VARIANTS:
        out["this_run"] = dict(out["sparq"])
    elif variant == "a8":
        out["this_run"] = dict(out["a8w8"])
    else:
        own = estimate(merged, "systolic-ws:pe_mode=bit_scalable")
        out["this_run"] = entry("bit_scalable", own["latency_cycles"], own["memory_traffic_bits"], act_traffic(own),
                                own["bops"], window_cycles(own["layers"]))
    out["this_run"]["variant"] = variant
    return {
        **out,
        "note": ("systolic-ws 32x32 weight-stationary array, batch 1, input shape of the dataset. a8w8: the "
                 "SPARQ layers at 8-bit activations on the fixed 8-bit PE; a4w8: the same layers at 4-bit "
                 "activations on a bit-scalable PE (4-bit activations in memory); sparq: the SPARQ PE (two "
                 "4bx8b multipliers per pair: 2x the 8bx8b MAC rate, 8-bit activations in memory, BOPs at the "
                 "measured expected bits, a zero code counting 0 bits and the partner of a zero its full 8; "
                 "the SPARQ PE's cycles do not depend on that distribution). Layers that do not run SPARQ (FP32 first/last, excluded 8-bit "
                 "layers) keep their fixed 8-bit PE cycles in every row. speedup_vs_int8: against every layer "
                 "(first/last included) at W8A8 on the fixed 8-bit PE; speedup_vs_a8w8: against the a8w8 row; "
                 "quantized_layers_cycles: the SPARQ-candidate layers alone (without FP32/excluded layers); "
                 "this_run: this run's layers on the PE its variant is meant for (sparq, bSPARQ, vSPARQ: the "
                 "SPARQ PE; a2/a3/a4: bit-scalable, a3 running as 4-bit; a8: fixed 8-bit)."),
    }


# ------------------------------------------------------------------ the method

class SPARQ(Method):
    """Sparsity-aware post-training activation quantization (Shomron et al., NeurIPS 2021)."""
    name = "sparq"
    family = "sparsity_aware_ptq"
    Params = SparqParams

    def apply(self, model: nn.Module, data, params: SparqParams, ctx) -> QuantResult:
        p = params
        device = ctx.device
        log = ctx.log
        pipeline: List[str] = []
        warnings: List[str] = []
        model.eval()

        # 1. layers, in execution order (names = module paths, as the cost tracer names them)
        from ..cost import trace_layers
        traced = trace_layers(model, tuple(data.input_shape), device=device)
        modules = dict(model.named_modules())
        gemms = [r for r in traced if r.op in ("conv2d", "linear") and r.name in modules]
        if not gemms:
            raise SparqError("sparq: the model has no Conv2d or Linear layer to quantize")
        first, last = gemms[0].name, gemms[-1].name
        unquantized: List[Dict[str, Any]] = []
        candidates: List[str] = []
        edge: List[str] = []
        for r in gemms:
            m = modules[r.name]
            if r.name in candidates or r.name in edge:
                continue
            if r.name in (first, last):
                why = ("first layer: its input (the normalized image) is signed" if r.name == first
                       else "last layer (the classifier)")
                if p.first_last == "fp32":
                    unquantized.append({"name": r.name, "op": r.op, "reason": f"{why}; kept FP32 as in the paper"})
                    continue
                if type(m) in (nn.Conv2d, nn.Linear):
                    edge.append(r.name)
                    continue
            if type(m) not in (nn.Conv2d, nn.Linear):
                unquantized.append({"name": r.name, "op": r.op,
                                    "reason": f"{type(m).__name__} is not a plain nn.Conv2d/nn.Linear "
                                              f"(its forward is its own); left FP32"})
            elif r.op == "linear" and p.hidden_linear == "fp32":
                unquantized.append({"name": r.name, "op": r.op, "reason": "hidden Linear layer kept FP32 "
                                    "(hidden_linear: fp32; the paper quantizes convs only)"})
            else:
                candidates.append(r.name)
        seen = {u["name"] for u in unquantized} | set(candidates) | set(edge)
        for r in traced:
            base_name, _, suffix = r.name.rpartition("_")
            if suffix.isdigit() and base_name in seen:   # a second call of a layer already handled
                continue
            if r.macs > 0 and r.name not in seen:
                unquantized.append({"name": r.name, "op": r.op,
                                    "reason": "not a Conv2d/Linear layer: SPARQ quantizes conv and linear inputs only"})
                seen.add(r.name)
        pipeline.append(f"layers: {len(candidates)} SPARQ-candidate conv/linear layer(s), first/last layer "
                        f"{'FP32' if p.first_last == 'fp32' else 'plain 8-bit'}")

        cal = data.calibration_set()
        loader = data.loader(cal, batch_size=p.calibration_batch_size)
        has_bn = had_bn = bool(_batch_norms(model))

        # 2. base qcard: fold batch norms first
        folded: List[Tuple[str, str]] = []
        if p.base == "qcard" and has_bn:
            example = _images(next(iter(loader)))[:2].to(device)
            folded = _fold_batch_norms(model, example)
            pipeline.append(f"fold batch norm ({len(folded)} folded)")
            has_bn = bool(_batch_norms(model))
            if has_bn:
                warnings.append(f"{len(_batch_norms(model))} batch norm(s) could not be folded and stay FP32")

        # 3. swap in the SPARQ layers, observe ranges on the calibration set
        pct = p.percentile if p.activation_range == "percentile" else None
        layers: Dict[str, _SparqLayerMixin] = {}
        for name in candidates + edge:
            layers[name] = _swap_in(model, name, model.get_submodule(name), pct)
        for lay in layers.values():
            lay.sparq_state = "observe"

        negatives: Dict[str, float] = {}

        def check_negatives():
            bad = {n: layers[n].observer.min for n in candidates if layers[n].observer.min < 0}
            if bad and p.negatives == "error":
                listing = ", ".join(f"'{n}' (min {v:.4g})" for n, v in bad.items())
                raise SparqError(
                    f"sparq: negative activations at the input of layer(s) {listing}: SPARQ needs unsigned "
                    f"8-bit activations (inputs that come from a ReLU), and the reference code raises here. "
                    f"Set the method parameter negatives: exclude to run such layers at plain signed 8-bit "
                    f"(recorded on the card), or base/first_last to change which layers are quantized")
            negatives.update(bad)

        bn_mode = p.base == "paper" and has_bn
        if bn_mode:
            with _bn_train(model, p.bn_stats):
                n_cal = _run_batches(model, loader, device, ctx.progress, "sparq calibrate", True, check_negatives)
            pipeline.append(f"calibrate activation ranges ({p.activation_range}) on {n_cal} training images, "
                            f"batch norms in train mode (running statistics refreshed, {p.bn_stats})")
        else:
            model.eval()
            n_cal = _run_batches(model, loader, device, ctx.progress, "sparq calibrate", False, check_negatives)
            pipeline.append(f"calibrate activation ranges ({p.activation_range}) on {n_cal} training images "
                            f"(eval mode)")
        check_negatives()

        # 4. convert: roles, scales, cached weight codes
        divisor = 255.0 / 2.0 if p.base == "paper" else 127.0
        window_role = p.variant if p.variant in _WINDOW_VARIANTS else ("u8" if p.variant == "a8" else "plain")
        overrides: List[Dict[str, Any]] = []
        excluded: List[Dict[str, Any]] = []
        roles: Dict[str, str] = {}
        for name, lay in layers.items():
            signed = lay.observer.min < 0
            if name in edge:
                role = "s8" if signed else "u8"
            elif name in negatives:
                role = "s8"
                reason = f"negative inputs (min {negatives[name]:.4g}); SPARQ off, plain signed 8-bit per tensor"
                excluded.append({"name": name, "reason": reason, "min_input": negatives[name]})
                overrides.append({"name": name, "activations": "8-bit signed per tensor (SPARQ off)",
                                  "reason": reason})
                log(f"sparq: layer {name} left at plain signed 8-bit: {reason}")
                warnings.append(f"layer {name} runs at plain signed 8-bit (negative inputs, negatives: exclude)")
            else:
                role = window_role
            r = lay.observer.range(p.activation_range, role == "s8")
            if not r > 0:
                warnings.append(f"layer {name} saw no positive input during calibration; its inputs quantize to 0")
                r = torch.finfo(torch.float32).tiny * 255
            dx = r / (127.0 if role == "s8" else 255.0)
            kernel = None
            if role in _WINDOW_VARIANTS:
                kernel = SparqKernel(role, p.bits, p.options if role != "vsparq" else None, p.rounding, lay.channel_dim)
            lay.sparq_convert(role, dx, divisor, kernel, _PLAIN_BITS.get(p.variant, 8))
            lay.to(device)
            lay.sparq_state = "quant"
            roles[name] = role
        pipeline.append(f"quantize weights: per output channel, symmetric, dw = "
                        f"{'2*max|w|/255' if p.base == 'paper' else 'max|w|/127'} (codes cached)")
        pipeline.append(f"quantize activations: {self._act_words(p)}")

        # 5. BN recalibration with SPARQ on (paper base)
        if bn_mode and p.bn_recalibration:
            with _bn_train(model, p.bn_stats):
                n_re = _run_batches(model, loader, device, ctx.progress, "sparq BN recalibration", True)
            pipeline.append(f"BN recalibration with {p.variant} on ({n_re} training images, {p.bn_stats})")
        elif p.base == "paper" and p.bn_recalibration:
            pipeline.append("BN recalibration skipped: the model has no batch norm")
        model.eval()

        # 6. statistics pass: eval mode, on the first stats_size calibration images
        n_stats = min(p.stats_size, len(cal))
        stats_set = torch.utils.data.Subset(cal, range(n_stats))
        for lay in layers.values():
            lay.set_collect_stats(True)
        try:
            _run_batches(model, data.loader(stats_set, batch_size=p.calibration_batch_size), device,
                         ctx.progress, "sparq statistics")
        finally:
            for lay in layers.values():
                lay.set_collect_stats(False)         # off for the runner's evaluation (speed)
        pipeline.append(f"statistics pass: {n_stats} calibration images, eval mode")
        per_layer = {name: lay.layer_stats() for name, lay in layers.items()}

        # 7. records for the cost model
        records: List[LayerRecord] = []
        op_of = {r.name: r.op for r in gemms}
        for name, lay in layers.items():
            role, st = roles[name], per_layer[name]
            dist = None
            if role in _WINDOW_VARIANTS and st["bits_distribution"]:
                dist = {float(b): float(f) for b, f in st["bits_distribution"].items()}
            records.append(LayerRecord(
                name=name, op=op_of[name], weight_bits=8, activation_bits=lay.plain_bits if role == "plain" else 8,
                weight_granularity="per_channel", weight_symmetric=True, activation_granularity="per_tensor",
                activation_symmetric=role == "s8", activation_bits_distribution=dist, quantized=True,
                extra={"sparq_role": role, "sparq": role in _WINDOW_VARIANTS, "dx": lay.dx}))
        for u in unquantized:
            records.append(LayerRecord(name=u["name"], op=u["op"], weight_bits=None, activation_bits=None,
                                       quantized=False, reason=u["reason"]))
        window_layers = {n for n, r in roles.items() if r in _WINDOW_VARIANTS + ("plain", "u8") and n not in edge}
        try:
            comparison = _cost_comparison(traced, records, window_layers, p.variant)
        except QcardError as exc:                   # the cost model is another module: say so, go on
            comparison = {"error": str(exc)}
            warnings.append(f"sparq cost comparison failed: {exc}")

        stats = self._stats_block(p, per_layer, roles, excluded, comparison, n_cal, n_stats, folded, edge)
        quantization = self._quantization_block(p, traced, first, last, edge, roles, unquantized, overrides,
                                                per_layer, has_bn, had_bn)
        calibration = {"split": "train", "size": len(cal), "seed": data.calibration_seed, "labels_used": False}
        return QuantResult(model=model, quantization=quantization, layers=records, stats={"sparq": stats},
                           pipeline=pipeline, calibration=calibration, warnings=warnings)

    # -- card blocks ---------------------------------------------------------------------------
    @staticmethod
    def _act_words(p: SparqParams) -> str:
        if p.variant == "sparq":
            return f"SPARQ (vSPARQ pairs + bSPARQ {p.bits}-bit windows, {p.options}opt, {p.rounding}) of 8-bit codes"
        if p.variant == "bsparq":
            return f"bSPARQ {p.bits}-bit windows ({p.options}opt, {p.rounding}) of 8-bit codes"
        if p.variant == "vsparq":
            return f"vSPARQ only (zero partner: exact 8 bits; else window 7:4, {p.rounding}) of 8-bit codes"
        if p.variant in ("a2", "a3", "a4"):
            n = _PLAIN_BITS[p.variant]
            return f"plain {n}-bit unsigned per tensor (grid {1 << (8 - n)}*dx)"
        return "plain 8-bit unsigned per tensor (the base model)"

    @staticmethod
    def _summary(per_layer: Dict[str, dict], names) -> Dict[str, Optional[float]]:
        tot = sum(per_layer[n]["values"] for n in names)
        if not tot:
            return {"zero_fraction": None, "zero_partner_fraction": None, "mean_bits": None, "mse": None}

        def wmean(key, weight="values"):
            num = den = 0.0
            for n in names:
                v = per_layer[n].get(key)
                if v is not None:
                    num += v * per_layer[n][weight]
                    den += per_layer[n][weight]
            return num / den if den else None
        return {"zero_fraction": wmean("zero_fraction"), "zero_partner_fraction": wmean("zero_partner_fraction", "pairs"),
                "mean_bits": wmean("mean_bits"), "mse": wmean("mse")}

    def _stats_block(self, p, per_layer, roles, excluded, comparison, n_cal, n_stats, folded, edge) -> dict:
        sparq_names = [n for n in per_layer if n not in edge and not any(e["name"] == n for e in excluded)]
        summary = self._summary(per_layer, sparq_names)
        layers = {}
        for n, st in per_layer.items():
            st = dict(st)
            st["bits_distribution"] = {f"{b:g}": f for b, f in st["bits_distribution"].items()}
            st["role"] = roles[n]
            layers[n] = st
        own = comparison.get("this_run") or {}
        return {
            "variant": p.variant, "base": p.base,
            "bits": p.bits if p.variant in _WINDOW_VARIANTS else _PLAIN_BITS[p.variant],
            "options": p.options, "rounding": p.rounding if p.variant in _WINDOW_VARIANTS else None,
            "window_tops": list(WINDOW_SETS[(p.bits, p.options)]) if p.variant in ("sparq", "bsparq") else
                           ([7] if p.variant == "vsparq" else None),
            # value-weighted over the SPARQ layers (first/last and excluded layers not included)
            "zero_fraction": summary["zero_fraction"],
            "zero_partner_fraction": summary["zero_partner_fraction"],
            "mean_effective_bits": summary["mean_bits"],
            "mse_codes": summary["mse"],
            "pe_mode": own.get("pe_mode"),
            "speedup_vs_a8w8": own.get("speedup_vs_a8w8"),     # this run on its PE (cost_comparison.this_run)
            "stats_source": f"calibration set (training split), first {n_stats} images, eval mode, after "
                            f"calibration{' and BN recalibration' if p.base == 'paper' and p.bn_recalibration else ''}",
            "stats_images": n_stats,
            "calibration_images": n_cal,
            "calibration_note": ("the paper calibrates on about 2,048 training images (17 batches of 128); "
                                 "this run used the config's dataset.calibration.size"),
            "excluded_layers": excluded,
            "folded_batch_norms": [{"layer": g, "batch_norm": b} for g, b in folded],
            "layers": layers,
            "cost_comparison": comparison,
            "notes": [
                "mse_codes: mean squared difference from the 8-bit codes, in code units (times dx^2 = mse_real)",
                "bits_distribution: fraction of values by bits used (0 = zero code; 8 = partner budget at n=4)",
                "pairs are adjacent input channels (2c, 2c+1); for depthwise convs and Linear layers "
                "the same channel/feature pairing is used (a choice)",
            ],
        }

    def _quantization_block(self, p, traced, first, last, edge, roles, unquantized, overrides, per_layer,
                            has_bn, had_bn) -> dict:
        ops = {r.op for r in traced}
        has_add = "add" in ops
        fp32_ops = [o for o in ("add", "concat", "avgpool", "maxpool", "mul") if o in ops]
        if p.base == "paper" and has_bn:
            fp32_ops.insert(0, "batch_norm")
        act_bits = p.bits if p.variant in _WINDOW_VARIANTS else _PLAIN_BITS[p.variant]
        edge_bits = None if p.first_last == "fp32" else 8
        unfriendly = []
        if p.first_last == "fp32":
            unfriendly.append("first/last layers FP32")
        if has_add:
            unfriendly.append("residual adds unquantized (FP32)")
        if "concat" in ops:
            unfriendly.append("concat unquantized (FP32)")
        if p.base == "paper" and has_bn:
            unfriendly.append("batch norm kept in FP32 (not folded)")
        unfriendly.append("float scales (not power of two)")
        if any(r == "s8" for n, r in roles.items() if n not in edge):
            unfriendly.append("some layers at plain signed 8-bit (SPARQ excluded)")
        return {
            "preset": None, "graph_mode": "eager",
            "weights": {"bits": 8, "granularity": "per_channel", "group_size": None, "symmetric": True,
                        "signed": True, "scale_format": "float",
                        "range_setting": "max_abs_255" if p.base == "paper" else "max_abs_127",
                        "rounding": "nearest"},
            "activations": {"bits": act_bits, "granularity": "per_tensor", "symmetric": False, "signed": False,
                            "range_setting": p.activation_range if p.activation_range != "percentile"
                            else f"percentile_{p.percentile:g}",
                            "dynamic": False, "quant_point": "after_activation",
                            "storage_bits": 8,
                            "note": (f"{self._act_words(p)}; inputs of each quantized conv/linear (after the "
                                     f"ReLU that feeds them); 8-bit codes in memory"
                                     if p.variant in _WINDOW_VARIANTS else self._act_words(p))},
            "first_layer": {"weight_bits": edge_bits, "activation_bits": edge_bits, "name": first},
            "last_layer": {"weight_bits": edge_bits, "activation_bits": edge_bits, "name": last},
            "batch_norm": "none" if not had_bn else ("kept" if has_bn else "folded"),
            "residual_add": "gemm_inputs_only" if has_add else "not_present",
            "concat": None if "concat" in ops else "not_present",
            "avg_pool": None if "avgpool" in ops else "not_present",
            "fp32_ops": fp32_ops,
            "bias_bits": None, "accumulator_bits": None,
            "accumulator": "float32 sums of integer products, rescaled by dx*dw[c]; float bias",
            "cross_layer_equalization": {"applied": False, "bias_absorption": False},
            "bias_correction": "none",
            "mixed_precision": {"enabled": False},
            "dynamic_precision": ({"kind": "sparq", "mean_effective_activation_bits":
                                   self._summary(per_layer, [n for n, r in roles.items()
                                                             if r in _WINDOW_VARIANTS])["mean_bits"]}
                                  if p.variant in _WINDOW_VARIANTS else None),
            "overrides": overrides,
            "unquantized_layers": unquantized,
            "hardware_unfriendly": unfriendly,
        }
