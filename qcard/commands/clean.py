"""`qcard clean RUNS...`: remove failed and superseded point folders and stale caches from run folders.

Dry run by default (lists what would go and why); --yes deletes. Only what qcard wrote is ever removed: a
point folder is one whose card.json is a valid card and whose name ends in `__` + the first 10 characters
of that card's id (the store's layout); a cache entry is a file of OUT/.cache/fp32/. A folder a run holds
the lock of is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import click

from . import user_errors


@dataclass
class Removal:
    path: Path
    why: str
    folder: bool = True


def point_folder(card_file: Path, card_id: str) -> Optional[Path]:
    """The point folder holding this card, when it has the store's layout (its name ends in __ID10)."""
    folder = card_file.parent
    return folder if card_id and folder.name.endswith("__" + card_id[:10]) else None


def plan(roots: List[Path]) -> Tuple[List[Removal], List[str]]:
    """(what to remove, notes on what was left and why) for these run folders."""
    from ..cards.compare import LoadedCard, find_card_files, load_card, superseded
    from ..errors import QcardError
    from ..store import LOCK_FILE
    notes: List[str] = []
    loaded: List[LoadedCard] = []
    for f in find_card_files(roots):
        try:
            loaded.append(LoadedCard(f, load_card(f)))
        except QcardError as exc:
            notes.append(f"left {f.parent}: its card.json is not a valid card ({str(exc).splitlines()[0][:120]})")
    out: List[Removal] = []
    seen = set()
    resolved_roots = {r.resolve() for r in roots}

    def add(lc: LoadedCard, why: str) -> None:
        folder = point_folder(lc.path, lc.card.id)
        if folder is None:
            notes.append(f"left {lc.path.parent}: not a point folder (its name does not end in __{lc.card.id[:10]}), "
                         f"though its card is {why.split(':')[0]}")
        elif folder.resolve() in resolved_roots:
            notes.append(f"left {folder}: it is a folder named on the command line")
        elif (folder / LOCK_FILE).exists():
            notes.append(f"left {folder}: a run holds its lock ({LOCK_FILE})")
        elif folder not in seen:
            seen.add(folder)
            out.append(Removal(folder, why))

    for k, by in superseded(loaded):
        later = loaded[by]
        add(loaded[k], f"superseded: a later card of the same point in {later.path.parent}")
    for lc in loaded:
        if lc.card.status != "ok":
            first = (lc.card.error or "no message recorded").strip().splitlines() or [""]
            add(lc, f"failed: {first[0][:100]}")
    out += stale_caches(roots)
    return out, notes


def stale_caches(roots: List[Path]) -> List[Removal]:
    """Entries of OUT/.cache/fp32 (beside or inside the run folders) that a run never reads again: unreadable
    ones and those of an older qcard without probe logits (runner: measured again), and temporary files of
    writes that were killed (older than the lock timeout, so no live write is touched)."""
    from ..store import TMP_PREFIX, stale_after_s
    out: List[Removal] = []
    caches = []
    for r in roots:
        for c in (r / ".cache" / "fp32", r.parent / ".cache" / "fp32"):
            if c.is_dir() and c.resolve() not in {x.resolve() for x in caches}:
                caches.append(c)
    old = time.time() - stale_after_s()
    for c in caches:
        for f in sorted(c.iterdir()):
            if not f.is_file():
                continue
            if f.name.startswith(TMP_PREFIX):
                if f.stat().st_mtime < old:
                    out.append(Removal(f, "stale cache: a temporary file of a write that was killed", folder=False))
                continue
            if f.suffix != ".json":
                continue
            try:
                entry = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                out.append(Removal(f, "stale cache: not readable JSON", folder=False))
                continue
            probe = entry.get("probe") if isinstance(entry, dict) else None
            if not isinstance(probe, dict) or not isinstance(probe.get("logits"), list):
                out.append(Removal(f, "stale cache: an FP32 baseline of an older qcard (no probe logits: never read "
                                      "again)", folder=False))
    return out


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--yes", is_flag=True, help="delete (without it, only list what would be removed)")
@user_errors
def clean(runs, yes):
    """Remove failed and superseded point folders and stale caches from run folders.

    A point folder is superseded when another folder holds a later card of the same point (same id); a
    failed point's folder goes too (`qcard run` reruns the point). Stale caches are FP32 baselines no run
    reads again and temporary files of killed writes. Without --yes, only lists what would go.

    \b
    Examples:
      qcard clean runs/quickstart            # what would be removed, and why
      qcard clean runs/quickstart --yes      # remove it
    """
    todo, notes = plan([Path(r) for r in runs])
    for n in notes:
        click.echo(f"note: {n}", err=True)
    if not todo:
        click.echo("nothing to remove")
        return
    verb = "removed" if yes else "would remove"
    for r in todo:
        if yes:
            if r.folder:
                shutil.rmtree(r.path)
            else:
                os.remove(r.path)
        click.echo(f"{verb} {r.path}{os.sep if r.folder else ''}  ({r.why})")
    folders = sum(r.folder for r in todo)
    summary = f"{folders} point folder(s), {len(todo) - folders} cache file(s)"
    click.echo(f"{verb} {summary}" if yes else f"{verb} {summary}; run again with --yes to delete")
