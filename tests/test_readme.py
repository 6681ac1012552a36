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
