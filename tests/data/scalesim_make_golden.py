"""Regenerate tests/data/scalesim_resnet18.csv (run by hand, never by the tests).

SCALE-Sim is not a dependency of qcard. Install it in a throwaway environment outside the repo:

    python3 -m venv /tmp/scalesim-venv
    /tmp/scalesim-venv/bin/pip install scalesim==3.0.0 'numpy<2.4'

then, from the repo root, with qcard's own environment:

    .venv/bin/python tests/data/scalesim_make_golden.py --scalesim-python /tmp/scalesim-venv/bin/python

It traces torchvision's resnet18 at 3×224×224 with qcard, writes one SCALE-Sim topology row per
distinct conv/linear shape (with the padded input size from qcard.cost.systolic, so SCALE-Sim's
output sizes equal PyTorch's), runs SCALE-Sim once (weight stationary, 32×32 array, SRAM
256/256/128 KB, CALC bandwidth mode, no traces), and reads the per-layer cycles from
COMPUTE_REPORT.csv ("Total Cycles": SCALE-Sim's total-cycles helper is broken) and the SRAM access
counts from DETAILED_ACCESS_REPORT.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = """[general]
run_name = qcard_golden_ws_32x32

[architecture_presets]
ArrayHeight : 32
ArrayWidth : 32
IfmapSramSzkB : 256
FilterSramSzkB : 256
OfmapSramSzkB : 128
IfmapOffset : 0
FilterOffset : 10000000
OfmapOffset : 20000000
Bandwidth : 10
Dataflow : ws
MemoryBanks : 1
ReadRequestBuffer : 512
WriteRequestBuffer : 512

[layout]
IfmapCustomLayout : False
FilterCustomLayout : False
IfmapSRAMBankBandwidth : 10
IfmapSRAMBankNum : 1
IfmapSRAMBankPort : 2
FilterSRAMBankBandwidth : 10
FilterSRAMBankNum : 1
FilterSRAMBankPort : 2

[sparsity]
SparsitySupport : false

[run_presets]
InterfaceBandwidth : CALC
UseRamulatorTrace : False
"""

HEADER = ["layer", "ifmap_h", "ifmap_w", "filter_h", "filter_w", "channels", "num_filter", "stride",
          "cycles", "ifmap_sram_reads", "filter_sram_reads", "ofmap_sram_writes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scalesim-python", required=True)
    ap.add_argument("--out", default=str(Path(__file__).with_name("scalesim_resnet18.csv")))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch
    import torchvision
    from qcard.cost.systolic import scalesim_topology_row
    from qcard.cost.trace import trace_layers

    torch.set_num_threads(1)
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    records = trace_layers(model, (3, 224, 224), device="meta")
    rows, seen = [], set()
    for rec in records:
        if rec.op in ("conv2d", "linear"):
            row = scalesim_topology_row(rec)
            if row[1:] not in seen:          # distinct shapes only: SCALE-Sim is slow
                seen.add(row[1:])
                rows.append(row)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcard-scalesim-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "scale.cfg").write_text(CONFIG)
    with open(work / "topology.csv", "w") as fh:
        fh.write("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,\n")
        for r in rows:
            fh.write(", ".join(str(x) for x in r) + ",\n")
    with open(work / "layout.csv", "w") as fh:   # required by the CLI, unused without custom layouts
        fh.write("Layer name," + ",".join(["x"] * 20) + ",\n")
        for r in rows:
            fh.write(r[0] + "," + ",".join(["1"] * 20) + ",\n")
    cmd = [args.scalesim_python, "-m", "scalesim.scale", "-c", str(work / "scale.cfg"),
           "-t", str(work / "topology.csv"), "-l", str(work / "layout.csv"), "-p", str(work / "out"), "-s", "N"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=work)
    report_dir = next((work / "out").iterdir())
    compute = list(csv.reader(open(report_dir / "COMPUTE_REPORT.csv")))[1:]
    access = list(csv.reader(open(report_dir / "DETAILED_ACCESS_REPORT.csv")))[1:]
    with open(args.out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for r, c, a in zip(rows, compute, access):
            w.writerow(list(r) + [int(float(c[2])), int(float(a[3])), int(float(a[6])), int(float(a[9]))])
    print(f"wrote {args.out} ({len(rows)} layers); SCALE-Sim output in {report_dir}")


if __name__ == "__main__":
    sys.exit(main())
