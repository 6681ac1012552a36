"""`qcard card validate` (issue 15 item 11): folders as render/compare take them, every bad file
reported, accuracies range-checked by the card schema."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cards.schema import card_from_dict
from qcard.cli import main
from qcard.errors import QcardError

FIXTURES = Path(__file__).parent / "fixtures" / "cards"


def ptq():
    return json.loads((FIXTURES / "ptq_w4a8_resnet18.json").read_text(encoding="utf-8"))


def test_accuracies_are_range_checked():
    for key, value in (("quantized", 250.0), ("fp32", -1.0), ("top5", 100.5), ("delta", -180.0), ("std", -0.1)):
        card = ptq()
        card["results"][key] = value
        with pytest.raises(QcardError, match=rf"results\.{key}: Input should be"):
            card_from_dict(card, "c.json")
    card = ptq()
    card["results"].update(quantized=100.0, delta=-100.0, fp32=0.0)
    card_from_dict(card)


def test_validate_takes_folders_and_reports_every_bad_file(tmp_path):
    root = tmp_path / "runs"
    for name in ("a", "b", "c", "d"):
        (root / name).mkdir(parents=True)
        shutil.copy(FIXTURES / "ptq_w4a8_resnet18.json", root / name / "card.json")
    bad = ptq()
    bad["results"]["quantized"] = 250.0
    (root / "b" / "card.json").write_text(json.dumps(bad))
    (root / "d" / "card.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["card", "validate", str(root), str(tmp_path / "missing.json"),
                                  str(tmp_path / "empty")])
    assert r.exit_code == 2
    assert f"{root / 'a' / 'card.json'}: ok" in r.stdout and f"{root / 'c' / 'card.json'}: ok" in r.stdout
    assert "b/card.json: not a valid qcard card: results.quantized" in r.stderr
    assert "d/card.json: not valid JSON" in r.stderr
    assert "no such card file or run folder" in r.stderr and "no card.json found under folder" in r.stderr
    assert "4 problem(s) among 3 path(s), 4 card file(s) checked" in r.stderr
    r = CliRunner().invoke(main, ["card", "validate", str(root / "a")])
    assert r.exit_code == 0 and r.stdout.count(": ok") == 1
