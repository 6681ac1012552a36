"""Finding, loading and ordering the cards to compare; which of them are superseded by a later card of
the same point."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from pydantic import ValidationError

from ...errors import QcardError
from ..schema import Card, card_from_dict

CARD_FILE = "card.json"


@dataclass
class LoadedCard:
    path: Optional[Path]
    card: Card


def find_card_files(paths: Iterable[Union[str, Path]]) -> List[Path]:
    """Card files named directly, plus every card.json under each folder (recursively, sorted).
    The same file reached twice is listed once."""
    out: List[Path] = []
    seen = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                if CARD_FILE in files:
                    found.append(Path(root) / CARD_FILE)
            if not found:
                raise QcardError(f"no {CARD_FILE} found under folder {p}")
            files_here = sorted(found)
        elif p.is_file():
            files_here = [p]
        else:
            raise QcardError(f"no such card file or run folder: {p}")
        for f in files_here:
            key = os.path.normcase(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def load_card(path: Path) -> Card:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QcardError(f"cannot read card {path}: {exc}") from None
    from ..evidence import require_evidence
    try:
        # fast path: pydantic parses and validates the JSON bytes in one go
        card = Card.model_validate_json(raw)
    except ValidationError:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise QcardError(f"{path}: not valid JSON ({exc})") from None
        card = card_from_dict(data, str(path))   # older schema versions upgrade here, else a clear error
    require_evidence(card, str(path))    # figures that disagree with the card's own outcomes: refused
    return card


def load_cards(paths: Iterable[Union[str, Path]]) -> List[LoadedCard]:
    """Load card files and run folders (searched recursively for card.json). An unreadable or invalid
    card is an error naming the file; a card whose run failed loads fine (status "failed")."""
    return [LoadedCard(f, load_card(f)) for f in find_card_files(paths)]


def as_loaded(items: Sequence[Any]) -> List[LoadedCard]:
    out = []
    for it in items:
        if isinstance(it, LoadedCard):
            out.append(it)
        elif isinstance(it, Card):
            out.append(LoadedCard(None, it))
        elif isinstance(it, dict):
            out.append(LoadedCard(None, card_from_dict(it)))
        elif isinstance(it, (str, Path)):
            out.extend(load_cards([it]))
        else:
            raise TypeError(f"compare_cards takes cards, dicts, LoadedCard or paths, not {type(it).__name__}")
    return out


# ---------------------------------------------------------------------------
# row order (issue 15 item 15)
# ---------------------------------------------------------------------------

def point_index(card: Card) -> Optional[int]:
    idx = (card.point or {}).get("index")
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else None


def config_order(loaded: Sequence[LoadedCard]) -> List[LoadedCard]:
    """Rows in the config's order when the cards carry point.index: grouped by experiment (in the order
    the experiments first appear), then by index; a card without an index follows the indexed cards of
    its experiment, as given. Cards without any index keep the order given (file order)."""
    indices = [point_index(lc.card) for lc in loaded]
    if all(i is None for i in indices):
        return list(loaded)
    rank: Dict[str, int] = {}
    for lc in loaded:
        rank.setdefault(lc.card.experiment, len(rank))
    keys = sorted(range(len(loaded)), key=lambda k: (rank[loaded[k].card.experiment], indices[k] is None,
                                                      indices[k] or 0, k))
    return [loaded[k] for k in keys]


# ---------------------------------------------------------------------------
# superseded cards (issue 25 item 3)
# ---------------------------------------------------------------------------

def created(card: Card) -> str:
    """When the card was made (provenance: finished, else started; ISO 8601 UTC sorts as text), '' unknown."""
    p = card.provenance
    return str(getattr(p, "finished_at", None) or getattr(p, "started_at", None) or "")


def superseded(loaded: Sequence[LoadedCard]) -> List[Tuple[int, int]]:
    """(position, position of the card that supersedes it) for every card with a later card of the same
    point id: the latest by creation time counts; of two made at the same time, a finished card beats a
    failed one, then the one listed last. Only card files take part (what a run folder holds): cards
    handed over in memory are the caller's choice, and cards without an id are never superseded."""
    latest: Dict[str, int] = {}
    rank = lambda k: (created(loaded[k].card), loaded[k].card.status == "ok", k)
    files = [k for k, lc in enumerate(loaded) if lc.path is not None and lc.card.id]
    for k in files:
        pid = loaded[k].card.id
        if pid not in latest or rank(k) > rank(latest[pid]):
            latest[pid] = k
    return [(k, latest[loaded[k].card.id]) for k in files if latest[loaded[k].card.id] != k]
