"""`qcard site RUNS... -o SITE/`: a static gallery of cards (index, card pages, experiments, plots).

Heavy modules (pandas through compare, matplotlib for the plots) are imported inside the command only.
Cards are loaded as compare loads them (refused when their figures disagree with their own outcomes);
cards written before methods handed over their sections get them here (qcard.methods.with_sections).
"""
from __future__ import annotations

import click

from . import user_errors


@click.command("site")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=True),
              help="the site's folder: new, empty, or one an earlier `qcard site` wrote (replaced whole)")
@click.option("--title", default="Quantization cards", show_default=True, help="the index page's title")
@user_errors
def site(runs, out_dir, title):
    """Write a static gallery of the cards under RUNS (card files, point folders or run folders).

    The site needs no server: open SITE/index.html from disk, or copy the folder to any static host.
    It has an index of every card (sort by clicking a column, filter by model, method, bits, status),
    each card's page with its card.json, and one page per experiment with the confounding differences,
    the significance marks and intervals of `qcard compare`, the Pareto plot and published reference rows.

    \b
    Example:
      qcard site runs/quickstart -o site/ && xdg-open site/index.html
    """
    from pathlib import Path
    from ..cards.compare import find_card_files, load_cards
    from ..errors import QcardError
    from ..methods import with_sections
    from ..site import build_site
    # a site written inside RUNS holds copies of the cards: they are not cards of the runs
    out = Path(out_dir).resolve()
    files = [f for f in find_card_files(runs) if out not in f.resolve().parents]
    if not files:
        raise QcardError(f"no card.json under {', '.join(runs)} outside the site folder {out_dir}")
    loaded = load_cards(files)
    summary = build_site(loaded, out_dir, prepare=with_sections, title=title,
                         log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {summary.out}/index.html: {summary.cards} card(s), {summary.experiments} experiment(s), "
               f"{len(summary.pages)} page(s)")
