"""SPARQ's PE cost: the run's layers beside A8W8 and plain A4W8, on the systolic-ws profile."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from ...records import LayerRecord
from .params import WINDOW_VARIANTS

NOTE = ("systolic-ws 32x32 weight-stationary array, batch 1, input shape of the dataset. a8w8: the "
        "SPARQ layers at 8-bit activations on the fixed 8-bit PE; a4w8: the same layers at 4-bit "
        "activations on a bit-scalable PE (4-bit activations in memory); sparq: the SPARQ PE (two "
        "4bx8b multipliers per pair: 2x the 8bx8b MAC rate, 8-bit activations in memory, BOPs at the "
        "measured expected bits, a zero code counting 0 bits and the partner of a zero its full 8; "
        "the SPARQ PE's cycles do not depend on that distribution). Layers that do not run SPARQ (FP32 first/last, excluded 8-bit "
        "layers) keep their fixed 8-bit PE cycles in every row. speedup_vs_int8: against every layer "
        "(first/last included) at W8A8 on the fixed 8-bit PE; speedup_vs_a8w8: against the a8w8 row; "
        "quantized_layers_cycles: the SPARQ-candidate layers alone (without FP32/excluded layers); "
        "this_run: this run's layers on the PE its variant is meant for (sparq, bSPARQ, vSPARQ: the "
        "SPARQ PE; a2/a3/a4: bit-scalable, a3 running as 4-bit; a8: fixed 8-bit).")
FIELDS = ("weight_bits", "activation_bits", "output_bits", "weight_granularity", "weight_symmetric",
          "activation_granularity", "activation_symmetric", "weight_sparsity",
          "activation_bits_distribution", "weight_bits_distribution", "quantized", "reason")


def merge_records(traced: List[LayerRecord], layers: List[LayerRecord]) -> List[LayerRecord]:
    """The traced ops (copies) with the quantization fields of the method's records."""
    by_name = {r.name: r for r in layers}
    merged = []
    for r in traced:
        r = dataclasses.replace(r)
        src = by_name.get(r.name)
        if src is not None:
            for f in FIELDS:
                setattr(r, f, getattr(src, f))
        merged.append(r)
    return merged


def cost_comparison(traced: List[LayerRecord], layers: List[LayerRecord], window_layers: set,
                     variant: str = "sparq") -> Dict[str, Any]:
    """A8W8 on a fixed 8-bit array, A4W8 on a bit-scalable array and SPARQ on the SPARQ array, for
    the same layers (first/last and excluded layers as the method ran them), on systolic-ws."""
    from ...cost import apply_bits, estimate

    merged = merge_records(traced, layers)

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
    if variant in WINDOW_VARIANTS:
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
        "note": NOTE,
    }
