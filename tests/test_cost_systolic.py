"""The closed-form weight-stationary array against SCALE-Sim 3.0.0 on ResNet-18.

Golden file tests/data/scalesim_resnet18.csv was produced ONCE (SCALE-Sim is not a dependency
of qcard and never runs in tests) with:

    python3 -m venv /tmp/scalesim-venv
    /tmp/scalesim-venv/bin/pip install scalesim==3.0.0 'numpy<2.4'      # numpy 2.3.5 was installed
    .venv/bin/python tests/data/scalesim_make_golden.py --scalesim-python /tmp/scalesim-venv/bin/python

(Python 3.11.7, torch 2.14.1, torchvision 0.29.1, scalesim 3.0.0, numpy 2.3.5; about 2.5 minutes.)
The script traces torchvision resnet18 at 3×224×224 with qcard, writes one SCALE-Sim conv topology
row per distinct conv/linear shape (12 of them: ResNet-18 repeats its shapes), runs SCALE-Sim with
the weight-stationary dataflow on a 32×32 array (SRAM 256/256/128 KB, CALC bandwidth, no
sparsity), and stores per layer: the topology row, the cycles from COMPUTE_REPORT.csv ("Total
Cycles": the total-cycles helper of SCALE-Sim is broken) and the SRAM reads/writes from
DETAILED_ACCESS_REPORT.csv.

SCALE-Sim takes inputs already padded and sizes outputs as ⌈(H − k + s)/s⌉; the row's input size
is the padded extent PyTorch's output actually reads, (H_o − 1)·s + k, so the output sizes agree.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from qcard.cost import apply_bits, estimate
from qcard.cost.systolic import (layer_gemms, scalesim_output_size, scalesim_topology_row, ws_cycles,
                                 ws_sram_accesses)

GOLDEN = Path(__file__).parent / "data" / "scalesim_resnet18.csv"
TOPO = ["ifmap_h", "ifmap_w", "filter_h", "filter_w", "channels", "num_filter", "stride"]


def golden_rows():
    with open(GOLDEN, newline="") as fh:
        return [{k: (v if k == "layer" else int(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def records():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from qcard.cost import trace_layers
    with torch.device("meta"):
        model = torchvision.models.resnet18().eval()
    return trace_layers(model, (3, 224, 224), device="meta")


def test_golden_file_covers_resnet18_shapes(records):
    rows = golden_rows()
    assert len(rows) == 12
    shapes = {tuple(r[k] for k in TOPO) for r in rows}
    gemm_layers = [r for r in records if r.op in ("conv2d", "linear")]
    assert len(gemm_layers) == 21
    for rec in gemm_layers:          # every ResNet-18 layer has the shape of a golden row
        assert scalesim_topology_row(rec)[1:] in shapes, rec.name


def test_topology_rows_match_golden(records):
    by_name = {r.name: r for r in records}
    for row in golden_rows():
        assert scalesim_topology_row(by_name[row["layer"]]) == (row["layer"], *(row[k] for k in TOPO))


def test_scalesim_output_size_equals_pytorch(records):
    for rec in records:
        if rec.op == "conv2d":
            _, h, w, kh, kw, _, _, s = scalesim_topology_row(rec)
            assert scalesim_output_size(h, kh, s) == rec.output_shape[2]
            assert scalesim_output_size(w, kw, s) == rec.output_shape[3]
    # why not simply H + 2p: conv1 (224, k7, s2, p3) padded to 230 gives SCALE-Sim 113 rows, PyTorch 112
    assert scalesim_output_size(224 + 2 * 3, 7, 2) == 113
    assert scalesim_output_size(229, 7, 2) == 112


def test_closed_form_cycles_within_one_of_scalesim(records):
    by_name = {r.name: r for r in records}
    for row in golden_rows():
        (s_r, s_c, t, rep), = layer_gemms(by_name[row["layer"]])
        assert rep == 1
        cycles = ws_cycles(s_r, s_c, t, 32, 32)
        assert abs(cycles - row["cycles"]) <= 1, row["layer"]


def test_closed_form_sram_accesses_equal_scalesim(records):
    by_name = {r.name: r for r in records}
    for row in golden_rows():
        (s_r, s_c, t, _), = layer_gemms(by_name[row["layer"]])
        acc = ws_sram_accesses(s_r, s_c, t, 32, 32)
        assert acc == {"ifmap_reads": row["ifmap_sram_reads"], "filter_reads": row["filter_sram_reads"],
                       "ofmap_writes": row["ofmap_sram_writes"]}, row["layer"]


def test_estimate_systolic_ws_per_layer_cycles(records):
    """The same agreement through estimate() on an 8-bit ResNet-18 (the fixed 8-bit PE)."""
    out = estimate(apply_bits(records, 8, 8), "systolic-ws")
    by_name = {r["name"]: r for r in out["layers"]}
    golden = {tuple(r[k] for k in TOPO): r["cycles"] for r in golden_rows()}
    for rec in records:
        if rec.op in ("conv2d", "linear"):
            expected = golden[scalesim_topology_row(rec)[1:]]
            assert abs(by_name[rec.name]["cycles"] - expected) <= 1, rec.name
        else:
            assert by_name[rec.name]["cycles"] == 0
    assert out["layers"][0]["sram_accesses"]["filter_reads"] == 7 * 7 * 3 * 64
    total = sum(golden[scalesim_topology_row(r)[1:]] for r in records if r.op in ("conv2d", "linear"))
    assert abs(out["latency_cycles"] - total) <= 21


def test_cycles_formula_small_cases():
    # one fold: R cycles to load weights, T to stream, R + C - 2 to drain the skew
    assert ws_cycles(32, 32, 1, 32, 32) == 2 * 32 + 32 + 1 - 2
    assert ws_cycles(33, 32, 10, 32, 32) == 2 * (2 * 32 + 32 + 10 - 2)
    assert ws_cycles(576, 64, 3136, 32, 32) == math.ceil(576 / 32) * 2 * (64 + 32 + 3136 - 2)
