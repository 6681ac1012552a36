"""`qcard compare --format json`: everything the comparison holds, values as the cards store them, with
the card ids; the sentences (differences, legend, notes) as text."""
from __future__ import annotations

import json
import math
from typing import Any, Dict

from .words import missing


def clean(v: Any) -> Any:
    if missing(v) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if hasattr(v, "item"):       # numpy scalars
        v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
    return v


def export(cmp: Any) -> str:
    rows = [{k: clean(v) for k, v in r.as_dict().items()} for r in cmp.rows]
    data = {"x": cmp.x, "profile": cmp.profile, "differences": cmp.differences,
            "difference_details": cmp.difference_details, "method_differences": cmp.method_differences,
            "params": cmp.params,
            "pareto": [cmp.rows[i].card for i in cmp.pareto],
            "cards": rows, "failed": cmp.failed, "superseded": cmp.superseded,
            "significance": _significance(cmp), "notes": cmp.notes, "read_first": cmp.read_first(),
            "reference": _published(cmp.reference_rows),
            # real-engine figures, apart from the simulated "reference" rows (beside deploy results only)
            "reference_runtime": _published(cmp.runtime_reference_rows)}
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _published(rows: Any) -> Any:
    return [{k: clean(v) for k, v in r.items()} for r in rows] if rows is not None else None


def _significance(cmp: Any) -> Dict[str, Any]:
    sig, card = cmp.significance, lambda i: cmp.rows[i].card
    return {"legend": sig.legend, "notes": sig.notes, "within_noise": sig.within_noise, "family": sig.family,
            "references": [card(j) for j in sig.references],
            "tests": [{"card": card(i), "id": cmp.rows[i].id, "ref": card(t["ref"]), "ref_id": cmp.rows[t["ref"]].id,
                       "n": t["n"], "seeds": t["seeds"],
                       "only_card_correct": t["b"], "only_ref_correct": t["c"], "delta": t["delta"],
                       "p": t["p"], "p_adjusted": t["p_adjusted"], "significant": t["significant"],
                       "family": t["family"], "family_size": t["family_size"],
                       "interval_level": t["level"], "delta_interval": [t["lo"], t["hi"]]}
                      for i, t in sig.tests.items()]}
