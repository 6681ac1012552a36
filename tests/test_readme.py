"""Every config block the README shows validates (issue 15 item 10): a reader copies them as they are.

Files and modules a block names (./my_weights.safetensors, my_pkg.models:build, my_pkg.methods:MyMethod)
are stand-ins written into a temporary folder, as a reader would have their own."""
import re
import textwrap
from pathlib import Path

import pytest

from qcard.config import load_config

README = Path(__file__).resolve().parent.parent / "README.md"


def yaml_blocks():
    """(first line number, text) of each ```yaml block of the README."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for n, line in enumerate(lines, 1):
        if start is None and re.fullmatch(r"```ya?ml\s*", line):
            start = n + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start - 1:n - 1]) + "\n"))
            start = None
    return blocks


MY_PKG = {
    "__init__.py": "",
    "models.py": """
        from torch import nn

        def build(width: int = 1, num_classes: int = 10) -> nn.Module:
            return nn.Sequential(nn.Flatten(1), nn.Linear(28 * 28, 8 * width), nn.ReLU(),
                                 nn.Linear(8 * width, num_classes))
        """,
    "methods.py": """
        from qcard.methods.base import Method, MethodParams

        class MyMethod(Method):
            name = "my_method"
            family = "other"

            class Params(MethodParams):
                alpha: float = 0.0

            def apply(self, model, data, params, ctx):
                raise NotImplementedError
        """,
}


@pytest.fixture
def readers_files(tmp_path, monkeypatch):
    """The reader's own package and weights file, importable and found from the config's folder."""
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    for name, text in MY_PKG.items():
        (pkg / name).write_text(textwrap.dedent(text))
    from safetensors.torch import save_file
    import torch
    save_file({"fc.weight": torch.zeros(1)}, str(tmp_path / "my_weights.safetensors"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_config_blocks():
    assert yaml_blocks(), "README.md shows no ```yaml block"


@pytest.mark.parametrize("line,text", yaml_blocks(), ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "")
def test_readme_config_block_validates(line, text, readers_files):
    path = readers_files / f"readme_{line}.yaml"
    path.write_text(text)
    try:
        exp = load_config(path)
    except Exception as exc:     # name the README lines, not the temporary file
        pytest.fail(f"the ```yaml block at README.md line {line} does not validate: {exc}")
    assert exp.points()


QUICKSTART = README.parent / "cards" / "quickstart"


def _published(model, label, granularity):
    """The one published quickstart card of that model, method label and weight granularity."""
    import json
    found = []
    for path in sorted(QUICKSTART.glob("*/card.json")):
        card = json.loads(path.read_text(encoding="utf-8"))
        if (card["model"]["ref"], card["method"]["label"], card["quantization"]["weights"].get("granularity")) == \
                (model, label, granularity):
            found.append(card)
    assert len(found) == 1, f"{len(found)} quickstart cards for {model} {label} {granularity}"
    return found[0]


def test_readme_uncertainty_numbers_come_from_the_published_cards():
    """'Reading the uncertainty' quotes real cards: each figure is formatted here from the card (or from
    `qcard compare` over cards/quickstart) and must appear in the README as printed, so regenerating the
    cards without updating the README fails this test."""
    from qcard.cards.compare import compare_cards, load_cards
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Reading the uncertainty"):text.index("## Verifying a card")]
    section = " ".join(section.split())          # line breaks inside a quoted figure read as spaces
    interval = lambda iv, sign="": f"[{iv[0]:{sign}.1f}, {iv[1]:{sign}.1f}]"
    w8 = _published("qcard:resnet8", "W8A8", "per_channel")["results"]
    assert f"`{w8['quantized']:.2f} {interval(w8['ci95'])}`" in section
    assert f"`{w8['delta']:+.2f} {interval(w8['delta_ci95'], '+')}`" in section
    g_card = _published("qcard:resnet8", "W4A8-minmax", "per_channel")["results"]
    assert f"`{g_card['delta']:+.2f} {interval(g_card['delta_ci95'], '+')}`" in section
    # the compare row, as `qcard compare cards/quickstart` prints it (default --family model)
    cmp = compare_cards(load_cards([QUICKSTART]))
    lines = cmp.to_markdown().replace("\\[", "[").replace("\\]", "]").replace("\\<", "<").splitlines()
    header = next(l for l in lines if l.startswith("| card |")).strip("|").split(" | ")
    row = next(r for r in cmp.rows if r["model"] == "qcard:resnet8" and r["label"] == "W4A8-minmax"
               and r["granularity"] == "per_channel")
    cells = dict(zip([h.strip() for h in header],
                     [c.strip() for c in next(l for l in lines if l.startswith(f"| {row['card']} |")).strip("|").split(" | ")]))
    shown = f"{cells['quantized']} | {cells['Δ']} | {cells['vs ref (BH p)']}"
    assert f"`{shown}`" in section, f"README should quote the row as compare prints it: `{shown}`"
    assert f"`{cells['vs ref (BH p)']}`" in section and f"`{cells['Δ']}`" in section
    legend = cmp.significance.legend[0]
    family = legend[legend.index("qcard:resnet8: "):].split(";")[0].rstrip(")")
    assert f"`{family}`" in section, family
    # and the within-noise line quoted in "Comparing cards"
    quoted = f"within noise: {row['card']} vs {row['ref']} (p = "
    line = next(l for l in cmp.significance.within_noise if l.startswith(quoted))
    assert line in " ".join(text.split()), line
