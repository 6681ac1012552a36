"""`qcard card validate` (issue 15 item 11, issue 20): folders as render/compare take them, every bad file
reported, accuracies range-checked by the card schema, figures checked against the card's own outcomes
(exit 2 when a file is not a card, else 1 when a card disagrees with its outcomes)."""
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
    assert "no per-sample evidence: figures not checked" in r.stdout     # the fixture is a schema-1 card
    assert "b/card.json: not a valid qcard card: results.quantized" in r.stderr
    assert "d/card.json: not valid JSON" in r.stderr
    assert "no such card file or run folder" in r.stderr and "no card.json found under folder" in r.stderr
    assert "4 problem(s) among 3 path(s), 4 card file(s) checked" in r.stderr
    r = CliRunner().invoke(main, ["card", "validate", str(root / "a")])
    assert r.exit_code == 0 and r.stdout.count(": ok") == 1


PUBLISHED = sorted((Path(__file__).resolve().parent.parent / "cards" / "quickstart").glob("*/card.json"))


def test_exit_1_for_a_card_that_disagrees_with_its_outcomes_2_when_a_file_is_not_a_card(tmp_path):
    good = json.loads(PUBLISHED[0].read_text(encoding="utf-8"))
    bad = json.loads(PUBLISHED[0].read_text(encoding="utf-8"))
    bad["results"]["fp32"] = round(bad["results"]["fp32"] - 1.0, 4)
    for name, data in (("good", good), ("bad", bad)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["card", "validate", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert f"{tmp_path / 'good' / 'card.json'}: ok (schema v2, status ok; figures agree with the per-sample " \
           "outcomes)" in r.stdout
    assert (f"mismatch: {tmp_path / 'bad' / 'card.json'}: results.fp32: stored {bad['results']['fp32']:.4f}, "
            f"the outcomes give {good['results']['fp32']:.4f}") in r.stderr
    assert "1 card(s) disagree with their own outcomes" in r.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "card.json").write_text("{not json")
    r = CliRunner().invoke(main, ["card", "validate", str(tmp_path)])
    assert r.exit_code == 2 and "2 problem(s) among 1 path(s), 3 card file(s) checked" in r.stderr
    r = CliRunner().invoke(main, ["card", "validate", *map(str, PUBLISHED)])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("figures agree with the per-sample outcomes") == len(PUBLISHED) > 0
