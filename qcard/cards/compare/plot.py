"""The comparison's Pareto plot: accuracy against the cost axis (cards.plots draws it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Union

from ...errors import QcardError
from .display import label_text
from .rows import X_AXES
from .words import is_number


def plot(cmp: Any, path: Union[str, Path]) -> List[Path]:
    """Accuracy against the x axis with the Pareto front: writes PATH.png and PATH.pdf."""
    from ..plots import pareto_plot
    key, label, needs_hw = X_AXES[cmp.x]
    rows = cmp.rows
    ok = [i for i, r in enumerate(rows) if r.status == "ok" and is_number(r[key]) and is_number(r.quantized)]
    if not ok:
        raise QcardError(f"no card has both an accuracy and cost.{key}; nothing to plot against --x {cmp.x}"
                         + (" (profiles without a hardware model give no energy or latency; name one that has "
                            "them with --profile NAME, or try --x bops or size)"
                            if needs_hw else ""))
    points = [{"label": f"{rows[i].card} {label_text(rows[i])}", "x": float(rows[i][key]),
               "y": float(rows[i].quantized),
               "err": float(rows[i].std) if is_number(rows[i].std) else None,
               "ci": ((float(rows[i].ci95_lo), float(rows[i].ci95_hi))
                      if is_number(rows[i].ci95_lo) and is_number(rows[i].ci95_hi) else None),
               "model": rows[i].model} for i in ok]
    pos = {i: n for n, i in enumerate(ok)}
    front = [pos[i] for i in cmp.pareto if i in pos]
    profiles = sorted({str(rows[i].profile) for i in ok if rows[i].profile})
    if needs_hw and profiles:
        label += f", profile {', '.join(profiles)}"
    title = "accuracy vs cost" + (" (cards differ in confounding settings)" if cmp.differences else "")
    return pareto_plot(points, front, label, Path(path), title=title)
