"""`qcard render CARD.json...`: card.json as Markdown, HTML or LaTeX.

Heavy modules are imported inside the command (matplotlib only for HTML, through the renderer).
A card written before methods handed over their sections gets them here, from its method's
protocol (qcard.methods.with_sections), when the method resolves; cards/ itself never imports methods.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import echo_document, user_errors
from ..errors import QcardError


@click.command()
@click.argument("cards", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["md", "html", "tex"]), default="md", show_default=True,
              help="md: Markdown; html: one self-contained page with plots; tex: a booktabs fragment to \\input")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="write files under DIR instead of printing (card.json -> DIR/card.<ext>; several cards keep "
                   "their folder names: DIR/<point folder>/card.<ext>)")
@user_errors
def render(cards, fmt, out_dir):
    """Render card files (or every card.json under run folders) as Markdown, HTML or LaTeX.

    A card whose figures disagree with its own per-sample outcomes is refused (exit 2, the file, field and
    both values named; `qcard card validate` lists every mismatch).

    \b
    Examples:
      qcard render runs/quickstart/*/card.json                  # Markdown on stdout
      qcard render runs/quickstart --format html --out site/     # one page per card
      qcard render card.json --format tex > table.tex            # \\input{table} in a paper
    """
    from ..cards.compare import find_card_files
    from ..cards.render import EXTENSIONS, render_card
    from ..cards.evidence import require_evidence
    from ..cards.schema import load_card
    from ..methods import with_sections

    def load(f):
        """The card, refused when its figures disagree with its own outcomes; a warning (an interval by a
        superseded method) on stderr. A card without outcomes renders without intervals, as it always has."""
        card = load_card(f, check_evidence=False)
        for w in require_evidence(card, str(f)).warnings:
            click.echo(f"warning: {f}: {w}", err=True)
        return with_sections(card)

    files = find_card_files(cards)
    if out_dir is None:
        if fmt == "html" and len(files) > 1:
            raise QcardError(f"{len(files)} cards as HTML make {len(files)} pages: give --out DIR to write them")
        texts = [render_card(load(f), fmt) for f in files]
        echo_document(("\n" if fmt == "md" else "\n\n").join(t.rstrip("\n") + "\n" for t in texts), fmt == "md")
        return
    out = Path(out_dir)
    # mirror the folders below the inputs' common parent, so point folders keep their names
    common = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if len(files) > 1 else None
    for f in files:
        rel = f.resolve().parent.relative_to(common) if common else Path()
        target = out / rel / f"{f.stem}.{EXTENSIONS[fmt]}"
        text = render_card(load(f), fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        click.echo(f"wrote {target}")
