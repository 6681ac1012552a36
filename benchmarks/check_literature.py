"""The shipped published rows against the team's reference data: qcard/cards/literature.yaml must hold
exactly the rows and sources of ../shared/reference/literature.yaml (beside the checkout), numbers as
published. Not a test: the shared file is not part of the package, and CI may not have it.

    python benchmarks/check_literature.py                          # vs ../shared/reference/literature.yaml
    python benchmarks/check_literature.py --shared PATH

Exit 0 when both files hold the same sources and the same rows (order aside), 1 otherwise (each row that
only one file has is printed), 2 when the shared file is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "qcard" / "cards" / "literature.yaml"


def _rows(path: Path) -> tuple:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data.get("sources") or {}, Counter(json.dumps(r, sort_keys=True) for r in data.get("rows") or [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "reference" / "literature.yaml")
    args = ap.parse_args()
    if not args.shared.is_file():
        print(f"{args.shared}: no such file (give --shared PATH)", file=sys.stderr)
        return 2
    ours_src, ours = _rows(SHIPPED)
    theirs_src, theirs = _rows(args.shared)
    bad = 0
    for key in sorted(set(ours_src) | set(theirs_src)):
        if ours_src.get(key) != theirs_src.get(key):
            bad += 1
            print(f"source {key}: shipped {ours_src.get(key)!r}, shared {theirs_src.get(key)!r}")
    for row in sorted((ours - theirs).elements()):
        bad += 1
        print(f"only shipped: {row}")
    for row in sorted((theirs - ours).elements()):
        bad += 1
        print(f"only shared:  {row}")
    print(f"{sum(ours.values())} shipped rows, {sum(theirs.values())} shared rows, {bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
