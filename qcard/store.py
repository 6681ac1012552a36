"""Point folders and caches on disk. Every write is atomic: a temporary file, then os.replace.

A run killed at any moment leaves each file either absent or complete; a rerun skips points whose
card.json validates against the card schema and says "ok", and redoes the rest.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from .errors import QcardError

CARD_FILE = "card.json"
POINT_FILE = "point.yaml"
TMP_PREFIX = ".tmp-"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


class RunStore:
    """OUT/EXPERIMENT/<point folder>/{point.yaml, card.json, card.md, error.log}; OUT/.cache/ for baselines.
    point.yaml: the point's canonical config (what its id hashes) and `index`, its place in the config's order."""

    def __init__(self, root: Path, cache_root: Optional[Path] = None):
        self.root = Path(root)
        self.cache = Path(cache_root) if cache_root else self.root.parent / ".cache"

    def point_dir(self, folder: str) -> Path:
        return self.root / folder

    def clean_partial(self, folder: str) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        d = self.point_dir(folder)
        n = 0
        if d.is_dir():
            for p in d.glob(TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def finished_card(self, folder: str, point_id: str) -> Optional[Dict[str, Any]]:
        return self.card_state(folder, point_id)[0]

    def card_state(self, folder: str, point_id: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(card, None) for a finished point; (None, why) when a card is there but cannot count as
        finished (unreadable, not a valid card, another point's); (None, None) for no card or a failed one.
        Only a card that validates marks a point finished: compare and render reject the others."""
        from .cards.schema import card_from_dict
        path = self.point_dir(folder) / CARD_FILE
        if not path.exists():
            return None, None
        card = read_json(path)
        if card is None:
            return None, f"{path} is not readable JSON"
        try:
            card_from_dict(card, str(path))
        except QcardError as exc:
            return None, str(exc)
        if card.get("id") != point_id:
            return None, f"{path} holds another point's card (id {str(card.get('id'))[:10]})"
        return (card, None) if card.get("status") == "ok" else (None, None)

    def write_point_config(self, folder: str, canonical: Dict[str, Any]) -> None:
        atomic_write_text(self.point_dir(folder) / POINT_FILE, yaml.safe_dump(canonical, sort_keys=True))

    def write_card(self, folder: str, card_json: str) -> Path:
        path = self.point_dir(folder) / CARD_FILE
        atomic_write_text(path, card_json)
        return path

    def write_text(self, folder: str, name: str, text: str) -> Path:
        path = self.point_dir(folder) / name
        atomic_write_text(path, text)
        return path

    # FP32 baselines are keyed by a fingerprint of weights, data split and preprocessing
    def baseline(self, fingerprint: str) -> Optional[Dict[str, Any]]:
        return read_json(self.cache / "fp32" / f"{fingerprint}.json")

    def save_baseline(self, fingerprint: str, result: Dict[str, Any]) -> None:
        atomic_write_json(self.cache / "fp32" / f"{fingerprint}.json", result)
