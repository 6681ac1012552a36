"""Closed-form weight-stationary systolic array (pure Python).

A layer is mapped to GEMMs: a conv with C_in, C_out, k×k kernel, g groups and an H_o×W_o output is
g GEMMs with S_R = k²·C_in/g rows of reduction, S_C = C_out/g columns and T = H_o·W_o output pixels.
For g = 1 this is exactly the mapping of SCALE-Sim 3.0.0, and per fold the array needs R cycles to
load the weights, T cycles to stream the ifmap, and R + C − 2 cycles of skew to drain, so

    cycles = ⌈S_R/R⌉ · ⌈S_C/C⌉ · (2R + C + T − 2)

Groups are separate GEMMs because a weight-stationary array cannot share an ifmap row between
columns that read different input channels (SCALE-Sim has no grouped conv; its depthwise mode also
runs one GEMM per channel).

SCALE-Sim takes inputs already padded and computes the output size as ⌈(H − k + s)/s⌉, whereas
PyTorch floors (H + 2p − k)/s + 1. `scalesim_topology_row` therefore gives SCALE-Sim the part of the
padded input that PyTorch's output actually reads, (H_o − 1)·s + k, so both agree on H_o.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

from ..errors import QcardError
from ..records import LayerRecord

Gemm = Tuple[int, int, int, int]     # (S_R, S_C, T, repeats)


def ws_cycles(s_r: int, s_c: int, t: int, rows: int, cols: int) -> int:
    """Cycles of one GEMM on an R×C weight-stationary array (SCALE-Sim's compute cycles)."""
    return math.ceil(s_r / rows) * math.ceil(s_c / cols) * (2 * rows + cols + t - 2)


def ws_sram_accesses(s_r: int, s_c: int, t: int, rows: int, cols: int) -> Dict[str, int]:
    """SRAM accesses (elements) of one GEMM: the ifmap is re-read for every column fold, each
    weight is read once, and partial outputs are written once per row fold."""
    return {"ifmap_reads": t * s_r * math.ceil(s_c / cols),
            "filter_reads": s_r * s_c,
            "ofmap_writes": t * s_c * math.ceil(s_r / rows)}


def layer_gemms(rec: LayerRecord) -> List[Gemm]:
    """The GEMMs a layer runs on the array; [] for ops without multiply-accumulates."""
    if rec.macs <= 0:
        return []
    gemms = rec.extra.get("gemms") if rec.extra else None
    if gemms:       # matmul / attention / multi-head input projection: (batch, M, K, N)
        return [(int(k), int(n), int(m), int(b)) for b, m, k, n in gemms]
    batch = rec.output_shape[0] if rec.output_shape else 1
    if rec.op.startswith("conv_transpose"):
        # scatter form: every input pixel times a (C_in/g) × (C_out/g·k²) weight slice
        g = rec.groups
        c_in, c_out_g = rec.weight_shape[0], rec.weight_shape[1]
        t = math.prod(rec.input_shape[2:]) if len(rec.input_shape) > 2 else 1
        return [(c_in // g, c_out_g * math.prod(rec.kernel_size), t, g * batch)]
    if rec.op.startswith("conv"):
        g = rec.groups
        s_r = rec.weight_shape[1] * math.prod(rec.kernel_size)
        s_c = rec.weight_shape[0] // g
        t = math.prod(rec.output_shape[2:]) if len(rec.output_shape) > 2 else 1
        return [(s_r, s_c, t, g * batch)]
    if rec.op == "linear" or rec.weight_shape:
        out_features = rec.output_shape[-1] if rec.output_shape else 1
        in_features = rec.macs // max(1, math.prod(rec.output_shape))
        t = math.prod(rec.output_shape) // max(1, out_features)
        return [(in_features, out_features, t, 1)]
    return []


def scalesim_topology_row(rec: LayerRecord) -> Tuple[str, int, int, int, int, int, int, int]:
    """The SCALE-Sim conv topology row (name, ifmap H, ifmap W, filter H, filter W, channels,
    filters, stride) whose GEMM is this layer's, with the padded input size that makes SCALE-Sim's
    output size equal PyTorch's. Linear layers become 1×1 convs on a 1×1 input."""
    if rec.op == "linear" and not (rec.extra or {}).get("gemms"):
        (s_r, s_c, t, _), = layer_gemms(rec)
        if t != 1:
            raise QcardError(f"{rec.name}: a linear layer over {t} tokens has no 1×1 SCALE-Sim row")
        return (rec.name, 1, 1, 1, 1, s_r, s_c, 1)
    if rec.op != "conv2d":
        raise QcardError(f"{rec.name}: only conv2d and linear layers map to SCALE-Sim rows, not {rec.op}")
    if rec.groups != 1:
        raise QcardError(f"{rec.name}: SCALE-Sim has no grouped conv (groups={rec.groups})")
    if any(d != 1 for d in (rec.extra or {}).get("dilation", (1, 1))):
        raise QcardError(f"{rec.name}: SCALE-Sim has no dilated conv")
    kh, kw = rec.kernel_size
    sh, sw = rec.stride
    if sh != sw:
        raise QcardError(f"{rec.name}: SCALE-Sim takes one stride for both directions, got {rec.stride}")
    ho, wo = rec.output_shape[2], rec.output_shape[3]
    return (rec.name, (ho - 1) * sh + kh, (wo - 1) * sw + kw, kh, kw, rec.weight_shape[1], rec.weight_shape[0], sh)


def scalesim_output_size(ifmap: int, filt: int, stride: int) -> int:
    """SCALE-Sim 3.0.0's output size (topology_utils.topo_calc_hyperparams)."""
    return int(math.ceil((ifmap - filt + stride) / stride))
