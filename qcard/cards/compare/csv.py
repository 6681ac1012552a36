"""`qcard compare --format csv`: one line per card with the values as the cards store them (per_channel,
folded, numbers) and the card ids; the swept method parameters as `param.NAME` columns. With reference
rows, a second table follows a '# reported' line, and published real-engine rows (shown only beside deploy
results) a third after '# reported runtime'."""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, List

from .rows import REFERENCE_COLUMNS
from .words import missing

REFERENCE_NOTE = "# reported: published figures from qcard/cards/literature.yaml, not measured here\n"
RUNTIME_REFERENCE_NOTE = ("# reported runtime: published top-1 of real INT8 engines from qcard/cards/literature.yaml, "
                          "not a simulation, not measured here; beside the runtime column only\n")
# a text cell a spreadsheet would run as a formula (labels, paths and errors come from users' files)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def export(cmp: Any) -> str:
    rows = [r.flat(cmp.params) for r in cmp.rows]
    text = table(rows, list(rows[0]) if rows else [])
    if cmp.reference_rows:
        text += "\n" + REFERENCE_NOTE
        text += table(cmp.reference_rows, REFERENCE_COLUMNS)
    if cmp.runtime_reference_rows:      # its own table: never among the simulated reported rows
        text += "\n" + RUNTIME_REFERENCE_NOTE
        text += table(cmp.runtime_reference_rows, REFERENCE_COLUMNS)
    return text


def table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if missing(r.get(c)) else _cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _cell(v: Any) -> Any:
    """Numbers as they are; text that starts like a formula gets a leading ' so it stays text."""
    if isinstance(v, str) and v.startswith(_FORMULA_STARTS):
        return "'" + v
    return v
