"""`qcard verify CARD.json|POINT_DIR|FOLDER...`: rerun each card's point from the card alone and judge it.

torch and the runner are imported inside the command (through qcard.verify's rerun) only.
"""
from __future__ import annotations

import sys

import click

from . import user_errors


@click.command()
@click.argument("cards", nargs=-1, required=True, type=click.Path())
@click.option("--keep", "keep", type=click.Path(file_okay=False), metavar="DIR",
              help="keep the reruns under DIR/EXPERIMENT/<point folder> (default: a temporary folder, removed after)")
@user_errors
def verify(cards, keep):
    """Rerun each card's point from the card alone and say whether its numbers hold on this machine.

    CARDS are card.json files, point folders or run folders (every card.json below). Per card: its figures
    against its own per-sample outcomes (every top-1, Δ, std and interval recomputed); the rerun against
    the card image by image (per seed and FP32: how many eval images changed outcome, and the exact
    McNemar p of that change); each top-1 figure card beside rerun; cost totals and the quantization
    block identical or the fields that differ; and what differs between the card's environment and this
    one (torch, CPU, threads, code). On the same environment no image may change outcome; where the
    environment differs, the change must not be significant at 0.05. Cost and quantization must be
    identical everywhere.

    Exit code: 0 when every card verifies, 1 when some card does not, 2 when a card cannot be
    verified at all (missing file, not a card, a failed card, a card without its point config, or an
    input it needs that is not here: a weights file or folder at a relative path, user code not on
    PYTHONPATH; the message names the fix, and a card found so before anything runs stops the command).

    \b
    Examples:
      qcard verify runs/quickstart                      # every card of a run
      qcard verify cards/quickstart/*/card.json --keep /tmp/reruns
    """
    from ..verify import format_verdict, verify_cards

    verdicts = verify_cards(cards, keep=keep, log=lambda m: click.echo(m, err=True),
                            report=lambda v: click.echo(format_verdict(v) + "\n"))
    bad = [v for v in verdicts if not v.ok and not v.unverifiable]
    unknown = [v for v in verdicts if v.unverifiable]
    good = len(verdicts) - len(bad) - len(unknown)
    click.echo(f"qcard verify: {good} of {len(verdicts)} card(s) verified"
               + (f"; not verified: {', '.join(str(v.path) for v in bad)}" if bad else "")
               + (f"; could not verify: {', '.join(str(v.path) for v in unknown)}" if unknown else ""))
    if keep:
        click.echo(f"reruns kept under {keep}")
    # a card that does not hold outweighs one that could not be checked here
    sys.exit(1 if bad else 2 if unknown else 0)
