"""Point ids stay stable: every published card's id is recomputed from the point config it carries.

A point's id hashes every resolved param, so a new PTQ setting that entered the hash while unset would
change the id of every PTQ point and `qcard verify` would reject every published card."""
import json
from pathlib import Path

import pytest

from qcard.config import config_from_dict, expand

CARDS = sorted((Path(__file__).resolve().parents[1] / "cards" / "quickstart").glob("*/card.json"))


def test_there_are_published_cards():
    assert len(CARDS) >= 4


@pytest.mark.parametrize("path", CARDS, ids=[p.parent.name for p in CARDS])
def test_published_card_id_is_recomputed_from_its_point_config(path):
    card = json.loads(path.read_text())
    exp = config_from_dict(card["point"]["config"], source=str(path), check_files=False)
    points = expand(exp)
    assert len(points) == 1
    assert points[0].id == card["id"], f"{path.parent.name}: the id of its point config changed"
