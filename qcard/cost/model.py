"""The analytical cost model (pure Python: no torch import).

`estimate(records, profile)` turns per-layer records into the card's cost block. Definitions,
for a layer with MACs multiply-accumulates, b_w weight bits, b_a activation bits
(None = FP32 = 32 bits):

- effective MACs = MACs · (1 − weight sparsity) when zero weights are skipped, else MACs
- BOPs = effective MACs · b_w · b_a;  UNIQ BOPs = effective MACs · (b_w·b_a + b_w + b_a + log2(fan-in))
  where fan-in = C_in·k²/g (MACs per output element). A matmul between two activations uses b_a for
  both operands unless the record gives weight bits (two operands on different grids: b_a is the
  wider, FP32 when one is FP32, and weight bits the narrower; qcard.quant.report.layer_records).
- size = Σ weights·b_w + biases at 32 bits + parameters outside the records (BN, embeddings) at 32
  bits; "with metadata" adds a 32-bit scale and a 32-bit zero-point per channel (or per tensor or
  per group) of every quantized weight and activation tensor.
- activations: a layer's inputs are stored at its activation bits, its output at output_bits if set,
  else at its activation bits. total = Σ outputs; peak = max over layers of inputs + output (what
  must be live to run one layer); largest map = the largest single tensor.
- compulsory traffic (batch 1) = weights·b_w + biases + inputs + outputs, per layer; the
  systolic-ws profile adds refetches when a tensor does not fit its SRAM.
- energy = Σ layers effective MACs · E_mac(b_w, b_a, b_acc) + Σ memory levels bits moved · e_level.
- latency: per the profile (closed-form systolic array, roofline, or measured lookup table).
- speedups name their baseline: the same layers, dense, at FP32 (32/32 bits) or INT8 (8/8 bits), on
  the same profile (systolic arrays: the fixed 8-bit PE).

Dynamic precision (SPARQ windows, MARViN trajectories): records carry a distribution of bits per
layer; the model uses its expectation and says so (`expected_cost` and a note).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..records import LayerRecord
from . import systolic
from .profile import Lookup, Profile, Roofline, SystolicWS, load_profile

FP32 = 32.0
BIAS_BITS = 32.0
META_BITS = 64          # a 32-bit scale and a 32-bit zero-point


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 0


def _is_dynamic(rec: LayerRecord) -> bool:
    return bool(rec.weight_bits_distribution) or bool(rec.activation_bits_distribution)


class _Bits:
    """The bit widths the model uses for one layer."""

    def __init__(self, rec: LayerRecord, sparq: bool):
        self.has_weight = bool(rec.weight_shape) or rec.params > 0
        ew, ea = rec.effective_weight_bits, rec.effective_activation_bits
        self.a = float(ea) if ea is not None else FP32
        if ew is not None:
            self.w = float(ew)
        elif not self.has_weight and rec.macs > 0:
            self.w = self.a            # activation × activation matmul
        else:
            self.w = FP32
        self.w_float = self.has_weight and ew is None
        self.a_float = ea is None
        self.nominal_w = (float(rec.weight_bits) if rec.weight_bits is not None else
                          (self.w if (rec.weight_bits_distribution or not self.has_weight) else FP32))
        self.nominal_a = float(rec.activation_bits) if rec.activation_bits is not None else self.a
        # SPARQ trims activations inside the PE only: in memory they keep their nominal width
        self.a_mem = self.nominal_a if sparq else self.a
        self.out = float(rec.output_bits) if rec.output_bits is not None else self.a_mem


def _metadata_bits(rec: LayerRecord, bits: _Bits) -> int:
    total = 0
    if bits.has_weight and not bits.w_float and rec.weight_shape:
        gran = rec.weight_granularity or "per_tensor"
        if gran == "per_channel":
            n = rec.weight_shape[0]
        elif gran == "per_group":
            gs = int((rec.extra or {}).get("group_size") or rec.weight_shape[-1])
            n = math.ceil(_numel(rec.weight_shape) / max(1, gs))
        else:
            n = 1
        total += n * META_BITS
    if not bits.a_float and rec.input_shape:
        n = rec.input_shape[1] if (rec.activation_granularity == "per_channel" and len(rec.input_shape) > 1) else 1
        total += n * META_BITS
    return total


def _input_tensors(rec: LayerRecord) -> List[int]:
    shapes = (rec.extra or {}).get("input_shapes") or ([rec.input_shape] if rec.input_shape else [])
    return [_numel(s) for s in shapes]


def _fan_in(rec: LayerRecord) -> float:
    f = (rec.extra or {}).get("fan_in")
    if f:
        return float(f)
    out = _numel(rec.output_shape)
    return rec.macs / out if out else 0.0


def _passes(b: float, native: int) -> int:
    return max(1, math.ceil(b / native - 1e-9))


def _pe_rate(w: float, a: float, nominal_a: float, lat: SystolicWS, mode: str) -> float:
    """MACs per PE per cycle (< 1 when wide operands need several passes of native-width slices)."""
    n = lat.native_bits
    if w > n or a > n or mode == "fixed8":
        return 1.0 / (_passes(w, n) * _passes(a, n))
    if mode == "sparq":
        return lat.sparq_rate if nominal_a <= n else 1.0
    def width(b: float) -> int:         # bit_scalable: the narrowest supported width that holds b
        return min((s for s in lat.scalable_bits if s >= b - 1e-9), default=n)
    return (n / width(w)) * (n / width(a))


def _lookup_rate(w: float, a: float, lat: Lookup) -> float:
    table = lat.macs_per_cycle
    a_keys = sorted(table)
    w_keys = sorted(next(iter(table.values())))
    a_max, w_max = a_keys[-1], w_keys[-1]
    ka = next((k for k in a_keys if k >= a - 1e-9), a_max)
    kw = next((k for k in w_keys if k >= w - 1e-9), w_max)
    # wider than the table: processed in slices of the widest entry
    return table[ka][kw] / (_passes(w, w_max) * _passes(a, a_max))


def _roofline_peak(w: float, a: float, lat: Roofline) -> Tuple[str, float]:
    b = max(w, a)
    peaks = sorted(lat.peaks, key=lambda p: p.max_bits)
    p = next((p for p in peaks if p.max_bits >= b - 1e-9), peaks[-1])
    return p.name, p.tera_ops_per_s * 1e12 / lat.ops_per_mac


def _mac_energy(bits: _Bits, prof: Profile) -> Tuple[float, float]:
    """(energy of one MAC, accumulator bits) in the profile's energy unit."""
    m = prof.energy.mac
    if bits.w_float or bits.a_float:
        fm = m.float_macs.get(32)
        if fm is not None:
            return fm.mult + fm.add, FP32
        return m.mult * FP32 * FP32 / m.anchor_bits ** 2 + m.add * FP32 / m.anchor_bits, FP32
    acc = float(m.accumulator_bits)
    return m.mult * bits.w * bits.a / m.anchor_bits ** 2 + m.add * acc / m.anchor_bits, acc


def _layer(rec: LayerRecord, prof: Profile, sparsity_aware: bool, pe_mode: Optional[str]) -> Dict[str, Any]:
    lat = prof.latency
    mode = pe_mode or (lat.pe_mode if isinstance(lat, SystolicWS) else None)
    if mode == "sparq" and rec.extra.get("sparq") is False:
        mode = "fixed8"  # a layer the method kept at plain 8 bits gets no SPARQ processing element
    bits = _Bits(rec, sparq=(mode == "sparq"))
    has_macs = rec.macs > 0
    nz = (1.0 - float(rec.weight_sparsity)) if (sparsity_aware and bits.has_weight) else 1.0
    eff_macs = rec.macs * nz
    fan_in = _fan_in(rec)
    bops = eff_macs * bits.w * bits.a if has_macs else 0.0
    uniq = (eff_macs * (bits.w * bits.a + bits.w + bits.a + (math.log2(fan_in) if fan_in > 1 else 0.0))
            if has_macs else 0.0)

    weight_numel = _numel(rec.weight_shape) if bits.has_weight else 0
    if weight_numel > rec.params:       # a shared weight already counted at its first use
        weight_numel = rec.params
    weight_bits_stored = weight_numel * bits.w + (rec.params - weight_numel) * BIAS_BITS
    ins = _input_tensors(rec)
    in_bits = sum(ins) * bits.a_mem
    out_bits = _numel(rec.output_shape) * bits.out
    compulsory = weight_bits_stored + in_bits + out_bits

    row: Dict[str, Any] = {
        "name": rec.name, "op": rec.op, "macs": rec.macs, "params": rec.params,
        "weight_bits": bits.nominal_w if (bits.has_weight or has_macs) else None,
        "activation_bits": bits.nominal_a,
        "bops": bops, "cycles": None, "energy_pj": None,
        "effective_activation_bits": bits.a,
        "effective_weight_bits": bits.w if (bits.has_weight or has_macs) else None,
        "effective_macs": eff_macs, "bops_uniq": uniq,
        "size_bits": weight_bits_stored, "metadata_bits": _metadata_bits(rec, bits),
        "activation_in_bits": in_bits, "activation_out_bits": out_bits,
        "largest_activation_map_bits": max([n * bits.a_mem for n in ins] + [out_bits]),
        "memory_traffic_bits": compulsory, "compulsory_traffic_bits": compulsory,
        "expected_cost": _is_dynamic(rec),
    }

    refetch = 0.0
    if isinstance(lat, SystolicWS):
        cycles = 0.0
        gemms = systolic.layer_gemms(rec)
        rate = _pe_rate(bits.w, bits.a, bits.nominal_a, lat, mode)
        sram = {"ifmap_reads": 0, "filter_reads": 0, "ofmap_writes": 0}
        for s_r, s_c, t, rep in gemms:
            cycles += rep * systolic.ws_cycles(s_r, s_c, t, lat.rows, lat.cols)
            for k, v in systolic.ws_sram_accesses(s_r, s_c, t, lat.rows, lat.cols).items():
                sram[k] += rep * v
        # zero-weight skipping shortens the stream in proportion; wide operands take several passes
        row["cycles"] = math.ceil(cycles * nz / rate) if gemms else 0
        if gemms:
            row["sram_accesses"] = sram
            s_r, s_c = gemms[0][0], gemms[0][1]
            col_folds, row_folds = math.ceil(s_c / lat.cols), math.ceil(s_r / lat.rows)
            # first-order buffer model: an ifmap larger than its SRAM is streamed again for every
            # column fold; partial sums that do not fit the ofmap SRAM spill (write + read back)
            if in_bits > lat.sram_kb.ifmap * 8192:
                refetch += in_bits * (col_folds - 1)
            # (SCALE-Sim's loop order: row folds inside column folds, so one column fold's
            # T × C partial sums must stay in the ofmap SRAM)
            acc_bits = float(prof.energy.mac.accumulator_bits) if prof.energy else FP32
            t_total = sum(g[2] * g[3] for g in gemms)
            if t_total * min(s_c, lat.cols) * acc_bits > lat.sram_kb.ofmap * 8192:
                refetch += 2 * _numel(rec.output_shape) * acc_bits * (row_folds - 1)
    elif isinstance(lat, Roofline):
        peak_name, peak = _roofline_peak(bits.w, bits.a, lat)
        t_compute = eff_macs / peak if has_macs else 0.0
        t_memory = compulsory / 8 / (lat.bandwidth_gb_s * 1e9)
        seconds = max(t_compute, t_memory)
        row["cycles"] = seconds * lat.clock_hz
        row["latency_s"] = seconds
        row["bound"] = "compute" if t_compute >= t_memory else "memory"
        row["peak"] = peak_name if has_macs else None
    elif isinstance(lat, Lookup):
        row["cycles"] = eff_macs / _lookup_rate(bits.w, bits.a, lat) if has_macs else 0.0
    row["memory_traffic_bits"] = compulsory + refetch

    if prof.energy is not None:
        e_mac, acc = _mac_energy(bits, prof)
        traffic = {"operands": eff_macs * (bits.w + bits.a) if has_macs else 0.0,
                   "partial_sums": eff_macs * 2 * acc if has_macs else 0.0,
                   "compulsory": compulsory, "dram": compulsory + refetch}
        energy = eff_macs * e_mac if has_macs else 0.0
        for lv in prof.energy.levels:
            energy += sum(traffic[k] for k in lv.traffic) * lv.energy / lv.access_bits
        row["energy"] = energy
        if prof.energy.unit == "pJ":
            row["energy_pj"] = energy
    return row


def _bit_weighted(records: Sequence[LayerRecord], bits_fn, sparsity_aware: bool) -> float:
    total = 0.0
    for r in records:
        if r.macs > 0:
            b = bits_fn(r)
            nz = (1.0 - r.weight_sparsity) if (sparsity_aware and (r.weight_shape or r.params)) else 1.0
            total += nz * r.macs * b
    return total


def _with_bits(records: Sequence[LayerRecord], w: Optional[float], a: Optional[float]) -> List[LayerRecord]:
    return [dataclasses.replace(r, weight_bits=w if (r.weight_shape or r.params) else None, activation_bits=a,
                                output_bits=None, weight_bits_distribution=None,
                                activation_bits_distribution=None, weight_sparsity=0.0)
            for r in records]


def _total_latency(records: Sequence[LayerRecord], prof: Profile, pe_mode: Optional[str]) -> Optional[float]:
    if prof.latency is None:
        return None
    return sum(_layer(r, prof, False, pe_mode)["cycles"] or 0 for r in records)


def _sum(rows: Iterable[Dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows]
    if any(v is None for v in vals):
        return None
    return sum(vals)


def _clean(x: float) -> Union[int, float]:
    """Integers stay integers in JSON (bits, MACs); fractional expected costs stay floats."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 62:
        return int(x)
    return x


def estimate(records: Sequence[LayerRecord], profile: Union[str, Profile], *,
             total_params: Optional[int] = None, not_run: Optional[Dict[str, int]] = None,
             weight_sparsity_aware: Optional[bool] = None) -> Dict[str, Any]:
    """The card's cost block for these layer records on one hardware profile.

    total_params: every parameter of the model (BN included); parameters not in any record are
    counted at 32 bits in the model size. not_run: {module: parameters} that never ran in the traced
    pass (qcard.cost.trace.ModelTrace.not_run), left out of total_params and reported apart
    (`params_not_run` and a note). weight_sparsity_aware: skip zero weights in MACs, BOPs,
    energy and latency (default: the profile's `skips_zero_weights`)."""
    prof = load_profile(profile)
    sparsity = prof.skips_zero_weights if weight_sparsity_aware is None else bool(weight_sparsity_aware)
    records = list(records)
    rows = [_layer(r, prof, sparsity, None) for r in records]
    total = _totals(records, rows, prof, sparsity, total_params)
    if not_run:     # only when there are some: cards of models that run every parameter keep their keys
        total["params_not_run"] = int(sum(not_run.values()))
    notes: List[str] = list(prof.notes)
    if prof.energy is not None:
        _energy(total, records, rows, prof, notes)
    _latency_and_speedups(total, records, rows, prof, sparsity)
    total["notes"] = notes + _notes(total, rows, prof.latency) + _not_run_note(not_run)
    _round(total, rows)
    total["layers"] = rows
    return total


def _totals(records: List[LayerRecord], rows: List[Dict[str, Any]], prof: Profile, sparsity: bool,
            total_params: Optional[int]) -> Dict[str, Any]:
    rec_params = sum(r.params for r in records)
    params = int(total_params) if total_params is not None else rec_params
    outside = max(0, params - rec_params)
    size = sum(r["size_bits"] for r in rows) + outside * FP32
    return {
        "profile": prof.name,
        "params": params,
        "size_bits": size,
        "size_bits_with_metadata": size + sum(r["metadata_bits"] for r in rows),
        "macs": sum(r.macs for r in records),
        "bops": sum(r["bops"] for r in rows),
        "bops_uniq": sum(r["bops_uniq"] for r in rows),
        "activation_peak_bits": max((r["activation_in_bits"] + r["activation_out_bits"] for r in rows), default=0),
        "memory_traffic_bits": sum(r["memory_traffic_bits"] for r in rows),
        "energy_pj": None,
        "latency_cycles": None,
        "speedup_vs_fp32": None,
        "speedup_vs_int8": None,
        "effective_macs": sum(r["effective_macs"] for r in rows),
        "activation_total_bits": sum(r["activation_out_bits"] for r in rows),
        "largest_activation_map_bits": max((r["largest_activation_map_bits"] for r in rows), default=0),
        "compulsory_traffic_bits": sum(r["compulsory_traffic_bits"] for r in rows),
        "params_outside_layers": outside,
        "weight_sparsity_aware": sparsity,
        "expected_cost": any(r["expected_cost"] for r in rows),
    }


def _energy(total: Dict[str, Any], records: List[LayerRecord], rows: List[Dict[str, Any]], prof: Profile,
            notes: List[str]) -> None:
    energy = sum(r["energy"] for r in rows)
    total["energy"] = energy
    total["energy_unit"] = prof.energy.unit
    if prof.energy.unit == "pJ":
        total["energy_pj"] = energy
    else:
        notes.append(f"energy is in {prof.energy.unit} ({prof.energy.unit_description}), not pJ: "
                     f"energy_pj is null and 'energy' holds the value")
    for tag, (w, a) in (("fp32", (None, None)), ("int8", (8, 8))):
        base = sum(_layer(r, prof, False, "fixed8" if isinstance(prof.latency, SystolicWS) else None)["energy"]
                   for r in _with_bits(records, w, a))
        total[f"energy_ratio_vs_{tag}"] = base / energy if energy else None


_BASELINE_TEXT = {"fp32": "the same layers, dense, with FP32 (32-bit) weights and activations",
                  "int8": "the same layers, dense, with 8-bit weights and activations"}


def _latency_and_speedups(total: Dict[str, Any], records: List[LayerRecord], rows: List[Dict[str, Any]],
                          prof: Profile, sparsity: bool) -> None:
    lat = prof.latency
    if lat is not None:
        cycles = _sum(rows, "cycles")
        total["latency_cycles"] = cycles
        clock = getattr(lat, "clock_hz", None)
        total["latency_s"] = cycles / clock if (clock and cycles is not None) else None
    definition = prof.speedup.definition if prof.speedup else None
    baselines: Dict[str, Any] = {}
    if definition == "latency" and lat is not None:
        base_mode = "fixed8" if isinstance(lat, SystolicWS) else None
        for tag, (w, a) in (("fp32", (None, None)), ("int8", (8, 8))):
            base = _total_latency(_with_bits(records, w, a), prof, base_mode)
            total[f"speedup_vs_{tag}"] = base / total["latency_cycles"] if total["latency_cycles"] else None
            where = f"{prof.name} (fixed 8-bit PE)" if base_mode else prof.name
            baselines[tag] = {"profile": prof.name, "baseline": f"{_BASELINE_TEXT[tag]} on {where}",
                              "definition": "baseline latency_cycles / latency_cycles"}
    elif definition == "weight_bit_weighted_macs":
        # MARViN's inference speedup: Σ 32·MACs / Σ nz·b_w·MACs (b_w = activation bits for a
        # matmul of two activations); uniform 16-bit gives exactly 2.0, uniform 8-bit 4.0
        denom = _bit_weighted(records, lambda r: _Bits(r, False).w, sparsity)
        for tag, ref in (("fp32", FP32), ("int8", 8.0)):
            num = _bit_weighted(records, lambda r: ref, False)
            total[f"speedup_vs_{tag}"] = num / denom if denom else None
            baselines[tag] = {"profile": prof.name, "baseline": _BASELINE_TEXT[tag],
                              "definition": f"Σ {ref:g}·MACs / Σ (1 − weight sparsity if skipped)·b_w·MACs "
                                            f"(bit-weighted MACs, MARViN)"}
    total["speedup_baselines"] = baselines or None


def _notes(total: Dict[str, Any], rows: List[Dict[str, Any]], lat) -> List[str]:
    notes = []
    if isinstance(lat, Roofline) and lat.caution:
        notes.append(lat.caution)
    if total["expected_cost"]:
        n = sum(r["expected_cost"] for r in rows)
        notes.append(f"expected cost: {n} layer(s) have a distribution of bit widths (dynamic precision); "
                     f"their cost uses the expected bits per layer")
    if isinstance(lat, SystolicWS):
        notes.append(f"systolic-ws: {lat.rows}x{lat.cols} weight-stationary array, PE mode {lat.pe_mode}; "
                     f"operands wider than {lat.native_bits} bits (FP32 included) run in "
                     f"{lat.native_bits}-bit slices, one pass per slice pair; ops without MACs take no array cycles")
    if isinstance(lat, Lookup):
        notes.append("lookup latency counts MAC layers only; operands wider than the table run in slices "
                     "of its widest entry (FP32 as 32-bit integers)")
    outside = total["params_outside_layers"]
    if outside:
        notes.append(f"{outside} parameters outside the traced layers (BN, embeddings, ...) counted at 32 bits")
    return notes


def _not_run_note(not_run: Optional[Dict[str, int]]) -> List[str]:
    if not not_run:
        return []
    where = ", ".join(f"{name} {n:,}" for name, n in not_run.items())
    return [f"{sum(not_run.values()):,} parameters never ran in the traced eval pass and are not counted in "
            f"params, size or cost ({where}; e.g. training-only auxiliary heads)"]


def _round(total: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """Whole-number sums as ints (_clean), in every row and in the totals."""
    for r in rows:
        for k in ("bops", "cycles", "energy_pj", "energy", "effective_macs", "bops_uniq", "size_bits",
                  "activation_in_bits", "activation_out_bits", "largest_activation_map_bits",
                  "memory_traffic_bits", "compulsory_traffic_bits", "weight_bits", "activation_bits",
                  "effective_activation_bits", "effective_weight_bits"):
            if r.get(k) is not None:
                r[k] = _clean(r[k])
    for k in ("size_bits", "size_bits_with_metadata", "bops", "bops_uniq", "activation_peak_bits",
              "memory_traffic_bits", "energy_pj", "latency_cycles", "effective_macs", "activation_total_bits",
              "largest_activation_map_bits", "compulsory_traffic_bits", "energy"):
        if total.get(k) is not None:
            total[k] = _clean(total[k])


def apply_bits(records: Sequence[LayerRecord], weight_bits: Optional[float], activation_bits: Optional[float],
               *, first_last: Optional[Union[float, Tuple[Optional[float], Optional[float]]]] = None
               ) -> List[LayerRecord]:
    """Copies of `records` with uniform bits: weight_bits on layers with weights, activation_bits on
    every layer's inputs (None = FP32). first_last: (w, a) bits for the first and last layers with
    weights, e.g. (None, None) to keep them FP32 or (8, 8); a single number sets both; None (the
    default) leaves them like the rest."""
    out = [dataclasses.replace(r, weight_bits=weight_bits if (r.weight_shape or r.params) else None,
                               activation_bits=activation_bits) for r in records]
    if first_last is None:
        return out
    fw, fa = (first_last, first_last) if isinstance(first_last, (int, float)) else first_last
    weighted = [i for i, r in enumerate(out) if r.weight_shape]
    for i in {weighted[0], weighted[-1]} if weighted else ():
        out[i] = dataclasses.replace(out[i], weight_bits=fw, activation_bits=fa)
    return out
