"""The contract every method keeps (as timm tests every registered model): on a tiny bundled model,
each registered method, and a user's method from tests/user_methods.py, gives a card that validates,
renders in md, html and tex, shows the sections its method handed over, and `qcard compare` accepts.

All methods run in one experiment (one model load, one FP32 baseline), with cheap parameters: a
method registered without an entry in CHEAP runs with its defaults.
"""
import json

import pytest
from click.testing import CliRunner

import qcard
from qcard.cards.render import render_card
from qcard.cards.schema import card_from_dict, load_card
from qcard.cli import main
from qcard.methods import METHODS, resolve_method

USER_METHOD = "user_methods:ScaleWeights"
TINY_TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 32, "schedule": "none"}
CHEAP = {
    "qat": {"w_bits": 4, "a_bits": 8, "train": TINY_TRAIN},
    "fp32_train": {"train": TINY_TRAIN},
    "marvin": {"train": TINY_TRAIN, "min_lookback": 1, "max_lookback": 2},
    "sparq": {"calibration_batch_size": 16, "stats_size": 16},
    USER_METHOD: {"tags": ["contract"]},
}
ALL = METHODS.names() + [USER_METHOD]

CONFIG = """\
experiment: contract
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {{size: 32}}}}
cost: {{profiles: [bitops]}}
methods:
{methods}"""


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    """{method name: card.json path} from one run of every method."""
    root = tmp_path_factory.mktemp("contract")
    lines = "".join(f"  - {json.dumps({'name': name, 'label': name.replace(':', '_'), 'params': CHEAP.get(name, {})})}\n"
                    for name in ALL)
    cfg = root / "contract.yaml"
    cfg.write_text(CONFIG.format(out=root / "runs", methods=lines))
    summary = qcard.run(cfg, progress=False)
    failed = [(o.point.method, o.error) for o in summary.outcomes if o.status != "ok"]
    assert not failed, failed
    by_label = {}
    for path in sorted((root / "runs" / "contract").glob("*/card.json")):
        data = json.loads(path.read_text())
        by_label[data["method"]["label"]] = path
    return {name: by_label[name.replace(":", "_")] for name in ALL}


@pytest.mark.parametrize("name", ALL)
def test_method_gives_a_valid_card_that_renders_and_compares(name, cards):
    path = cards[name]
    card = load_card(path)                          # validates against the schema
    assert card.status == "ok" and card.results.quantized is not None and card.cost.macs > 0
    data = card.model_dump(mode="json")
    assert card_from_dict(data) == card
    # the method's sections are on the card, as its protocol gives them for these statistics
    method = resolve_method(name)()
    expected = method.card_sections(data["method_stats"])
    assert card.sections is not None and len(card.sections) == len(expected)
    texts = {fmt: render_card(card, fmt) for fmt in ("md", "html", "tex")}
    for section in card.sections:
        assert section.title in texts["html"]
        if section.kind == "table":
            assert section.title in texts["md"]
        else:
            assert f'<figure id="{section.id}">' in texts["html"]
    r = CliRunner().invoke(main, ["compare", str(path), str(cards["fp32"])])
    assert r.exit_code == 0, r.output


def test_the_registry_is_covered():
    assert set(METHODS.names()) <= set(ALL) and "fp32" in ALL


def test_user_method_needs_no_sibling_method():
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).parent / "user_methods.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    # the method protocol and the per-layer record type: the public interface a method is written against
    assert {m for m in imported if m.startswith("qcard")} <= {"qcard.methods.base", "qcard.records"}
    assert "qcard.methods.base" in imported
