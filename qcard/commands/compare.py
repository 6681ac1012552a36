"""`qcard compare PATH...`: cards side by side, confounding differences, Pareto front, exports.

pandas and matplotlib are imported inside the command only.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import echo_document, user_errors
from ..cards.compare.display import COLUMNS
from ..cards.compare.exporters import EXPORTERS
from ..cards.compare.tex import COMPACT


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(list(EXPORTERS)), default="md", show_default=True,
              help="export format: " + "; ".join(f"{k}: {v[1]}" for k, v in EXPORTERS.items()))
@click.option("--columns", metavar="COL,COL,...",
              help=f"tex: the table's columns (default {','.join(COMPACT)}); any of {', '.join(COLUMNS)}, or a "
                   "swept method parameter by name")
@click.option("--width", default="\\columnwidth", show_default=True,
              help="tex: the width the table fits (\\textwidth: a full-width table*)")
@click.option("--all", "show_all", is_flag=True,
              help="show every card: also those superseded by a later card of the same point, and failed cards as "
                   "rows (by default failed cards are listed in one short section)")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="write the export to FILE (default: stdout)")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="draw accuracy against --x with the Pareto front: FILE.png, FILE.pdf and FILE.svg")
@click.option("--x", "x_axis", type=click.Choice(["bops", "size", "energy", "latency"]), default="bops",
              show_default=True, help="cost axis of the Pareto front")
@click.option("--profile", "profile", metavar="NAME",
              help="cost profile to read the cost from (default: each card's main one; for --x energy or "
                   "latency the first profile on the cards that has them)")
@click.option("--baseline", metavar="CARD_ID",
              help="test every row against this card (a prefix of its id) instead of the FP32 card of the same "
                   "model (paired on the per-sample outcomes of all seeds)")
@click.option("--family", type=click.Choice(["table", "model", "experiment"]), default="model", show_default=True,
              help="the tests that Benjamini-Hochberg corrects together: each model's rows (default), each "
                   "experiment's, or the whole table; the legend and the vs-ref column give each family's size")
@click.option("--reference", is_flag=True,
              help="add published rows (marked 'reported', with their source) for the models among the cards; "
                   "published real-engine (runtime) figures go in their own table, beside deploy results only")
@click.option("--reference-all", is_flag=True, help="add every published row, whatever the models")
@user_errors
def compare(paths, fmt, columns, width, show_all, output, plot_path, x_axis, profile, baseline, family, reference,
            reference_all):
    """Compare cards: PATH is a card.json or a run folder (searched recursively).

    The settings that differ between the cards, other than the method's own choices, are named above
    the table: a gap in accuracy may be due to them. Failed points are listed in one short section (with
    --all, as rows too); a card superseded by a later card of the same point is left out (--all shows it).
    A method parameter swept among rows of the same label gets a column and is named in the label. Cards with
    per-sample outcomes on the same eval set are tested against their reference row (the FP32 card of
    the same model, or --baseline) over all their seeds; "≈" marks a difference that is not significant
    at a false discovery rate of 0.05 within its --family, and the Δ interval of a tested row is adjusted
    to the same error rate, so it excludes 0 exactly when the row is not "≈".

    \b
    Examples:
      qcard compare runs/quickstart
      qcard compare runs/a/*/card.json runs/b --format tex -o table.tex
      qcard compare runs/sweep --format tex --columns card,label,wa,quantized,delta,bops --width '\\textwidth'
      qcard compare runs/sweep --plot pareto --x energy      # pareto.png + .pdf + .svg
      qcard compare runs/imagenet --reference                # beside published figures
      qcard compare runs/sweep --baseline 3f2a9c1d             # test every row against that card
    """
    from ..cards.compare import compare_cards, load_cards

    ref = "all" if reference_all else ("matching" if reference else False)
    cmp = compare_cards(load_cards(paths), x=x_axis, reference=ref, profile=profile, baseline=baseline,
                        family=family, show_all=show_all)
    if cmp.profile_note:
        click.echo(f"note: {cmp.profile_note}", err=True)
    if fmt != "tex" and (columns or width != "\\columnwidth"):
        raise click.UsageError("--columns and --width apply to --format tex only")
    options = {"width": width, **({"columns": columns.split(",")} if columns else {})} if fmt == "tex" else {}
    text = cmp.export(fmt, **options)
    if output:
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        click.echo(f"wrote {target}", err=True)
    else:
        echo_document(text, fmt == "md")
    if plot_path:
        for p in cmp.plot(plot_path):
            click.echo(f"wrote {p}", err=True)
    if cmp.failed:
        click.echo(f"note: {len(cmp.failed)} failed point(s), listed as failed", err=True)
    if cmp.superseded:
        click.echo(f"note: {len(cmp.superseded)} superseded card(s) left out (a later card of the same point); "
                   "--all shows them, `qcard clean` removes them", err=True)
