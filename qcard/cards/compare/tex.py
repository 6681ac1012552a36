"""`qcard compare --format tex`: a table float for a paper. By default the compact columns that fit a
two-column paper's \\columnwidth for ~8 rows (card, model, label with its swept parameters, W/A bits, top-1
with its interval and ≈ mark, Δ); `columns` chooses others, `width` another width (\\textwidth: a table*).
Notes, legend and card ids go in a \\parbox below the (\\resizebox-ed) tabular, inside the float."""
from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence

from ...errors import QcardError
from ..render import TexRaw, environment, tex_escape
from .display import check_columns, context, param_text

COMPACT = ("card", "model", "label", "wa", "quantized", "delta")
# a LaTeX length: an optional factor and a width macro, or a number with a unit (nothing else reaches LaTeX raw)
_WIDTH = re.compile(r"^(\d*\.?\d+)?\\(columnwidth|textwidth|linewidth)$|^\d*\.?\d+(pt|cm|mm|in|em)$")


def export(cmp: Any, columns: Optional[Sequence[str]] = None, width: str = "\\columnwidth") -> str:
    width = width.strip()
    if not _WIDTH.match(width):
        raise QcardError(f"--width '{width}': give a LaTeX width such as \\columnwidth (default), \\textwidth "
                         "(a full-width table*), 0.9\\textwidth or 8cm")
    cols = check_columns(columns if columns else COMPACT, cmp.params)
    ctx = context(cmp, cols)
    if "label" in cols:      # swept parameters on a second line under the label: a narrower column
        at = cols.index("label")
        for view, r in zip(ctx["rows"], cmp.rows):
            if r.swept:
                params = ", ".join(f"{k}={param_text(r.params.get(k))}" for k in r.swept)
                view["cells"][at] = TexRaw("\\begin{tabular}[t]{@{}l@{}}" + tex_escape(r.label) + "\\\\[-1pt]"
                                           "{\\scriptsize " + tex_escape(params) + "}\\end{tabular}")
    ctx.update(width=width, env="table*" if "textwidth" in width else "table",
               card_list=f"{cmp.rows[0].card}–{cmp.rows[-1].card}" if len(cmp.rows) > 1 else
               (cmp.rows[0].card if cmp.rows else "none"),
               notes_block=notes(ctx, cmp))
    return environment("tex").get_template("compare.tex.j2").render(**ctx)


def notes(ctx: dict, cmp: Any) -> List[str]:
    """The lines under the table, each a sentence: what to read first, differences, legend, failed cards,
    and the card ids behind the letters (so a reader can find each card)."""
    out = [f"Read first: {line}" for line in ctx["read_first"]]
    if ctx["differences"]:
        out.append("Confounding differences: " + "; ".join(ctx["differences"]))
    out += ctx["legend"]
    out += ctx["within_noise"] + ctx["notes"]
    if ctx["failed"]:
        out.append("Failed: " + "; ".join(f"{f['card']} ({f['label']}: {f['error']})" for f in ctx["failed"]))
    if ctx["superseded"]:
        n = len(ctx["superseded"])
        out.append(f"{n} superseded card{'s' if n != 1 else ''} left out (a later card of the same point)")
    out.append("Card ids: " + ", ".join(f"{r.card} {r.id[:10]}" for r in cmp.rows))
    return out
