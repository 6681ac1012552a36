"""Refactoring guard: a config's cards before and after a change carry identical numbers.

Runs CONFIG into a fresh folder and compares each card's `results`, `cost` and `quantization` blocks
(and per-layer records inside them) with the cards of a reference folder: the published cards, or a run
of the same config made on this machine before the change. Cards are matched by model and method label
(a point id may change when a method's params change shape; that is reported, not an error).
Keys that only the new cards have (fields added to the schema since the reference) are not differences.

    python benchmarks/check_cards_identical.py                          # vs cards/quickstart
    python benchmarks/check_cards_identical.py --reference /tmp/before  # vs a run made here before
    python benchmarks/check_cards_identical.py --cards /tmp/after --reference /tmp/before  # no run

CPU reductions differ in the last bits between machines: compare against a reference made on the same
machine and software (the published cards were made on an Intel Xeon). Exit 0 when every block of
every card is identical, 1 otherwise (the differences are printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = ("results", "cost", "quantization")


def cards_in(folder: Path) -> Dict[str, Dict[str, Any]]:
    """{point folder name (model__label__id): card} for every card.json below folder."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.rglob("card.json"))}


def pair_up(before: Dict[str, Any], after: Dict[str, Any]) -> Iterator[Tuple[str, str, str]]:
    """(name, before folder or '', after folder or ''): same folder first; else the same model__label
    when only one such card is left on each side (the point id changed)."""
    rest_b = sorted(set(before) - set(after))
    rest_a = sorted(set(after) - set(before))
    for name in sorted(set(before) & set(after)):
        yield name, name, name
    stem = lambda n: n.rsplit("__", 1)[0]
    for b in list(rest_b):
        same_a = [a for a in rest_a if stem(a) == stem(b)]
        same_b = [x for x in rest_b if stem(x) == stem(b)]
        if len(same_a) == 1 and len(same_b) == 1:
            rest_b.remove(b)
            rest_a.remove(same_a[0])
            yield stem(b), b, same_a[0]
    for b in rest_b:
        yield b, b, ""
    for a in rest_a:
        yield a, "", a


def differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """Paths where two JSON values differ (exact: numbers must be equal to the last bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                yield f"{where}.{k}: only in before"
            elif k not in a:
                continue        # a key the schema added since the reference: new information, no number moved
            else:
                yield from differences(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} items before, {len(b)} after"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} before, {b!r} after"


def run_config(config: Path, out: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    import qcard
    exp = qcard.load_config(str(config))
    summary = qcard.run(exp, out=str(out), force=True, progress=False)
    if summary.failed:
        raise SystemExit(f"{len(summary.failed)} point(s) failed; see {summary.out_dir}")
    return Path(summary.out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--reference", default=str(ROOT / "cards" / "quickstart"),
                    help="folder of cards made before the change")
    ap.add_argument("--cards", default=None, help="compare this folder instead of running the config")
    ap.add_argument("--blocks", default=",".join(BLOCKS), help="card blocks to compare")
    args = ap.parse_args(argv)
    blocks = [b for b in args.blocks.split(",") if b]
    before = cards_in(Path(args.reference))
    if args.cards:
        after = cards_in(Path(args.cards))
    else:
        with tempfile.TemporaryDirectory(prefix="qcard-identical-") as tmp:
            after = cards_in(run_config(Path(args.config), Path(tmp)))
    bad = total = 0
    for key, id_b, id_a in pair_up(before, after):
        total += 1
        if not id_b or not id_a:
            print(f"{key}: only {'after' if not id_b else 'before'} the change")
            bad += 1
            continue
        card_b, card_a = before[id_b], after[id_a]
        diffs = [d for blk in blocks for d in differences(card_b.get(blk), card_a.get(blk), blk)]
        note = "" if id_a == id_b else f"  (point id {id_b.rsplit('__', 1)[1]} -> {id_a.rsplit('__', 1)[1]})"
        if diffs:
            bad += 1
            print(f"{key}: {len(diffs)} difference(s){note}")
            for d in diffs[:10]:
                print(f"    {d}")
        else:
            print(f"{key}: identical{note}")
    print(f"{total - bad} identical, {bad} different ({', '.join(blocks)})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
