"""Issue 15, item 17 (text): Markdown escapes are not printed to a terminal (files and pipes keep the
Markdown), and the `reproduce` line of a card names the PYTHONPATH a user's model or method needs."""
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import qcard.commands
from qcard.cli import main
from qcard.config import load_config
from qcard.runner import reproduce_command

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LABEL = "w4_a8 | x*y [v1] <b> C:\\dir"


def _cards(tmp_path):
    card = json.loads((TESTS / "fixtures" / "cards" / "ptq_w4a8_resnet18.json").read_text())
    paths = []
    for i in range(2):
        card["id"] = f"{i:064x}"
        card["method"]["label"] = f"{LABEL} #{i}"
        card["warnings"].append("see a|b")
        (tmp_path / f"c{i}").mkdir()
        paths.append(tmp_path / f"c{i}" / "card.json")
        paths[-1].write_text(json.dumps(card))
    return paths


def test_terminal_gets_plain_text_and_a_pipe_or_file_keeps_markdown(tmp_path, monkeypatch):
    a, b = _cards(tmp_path)
    piped = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert piped.exit_code == 0 and "w4_a8 \\| x\\*y \\[v1\\] \\<b\\> C:\\\\dir #0" in piped.output
    assert CliRunner().invoke(main, ["compare", str(a), str(b), "-o", str(tmp_path / "t.md")]).exit_code == 0
    assert "x\\*y \\[v1\\]" in (tmp_path / "t.md").read_text()
    monkeypatch.setattr(qcard.commands, "stdout_is_terminal", lambda: True)
    for args in (["compare", str(a), str(b)], ["render", str(a)]):
        shown = CliRunner().invoke(main, args)
        assert shown.exit_code == 0, shown.output
        assert f"{LABEL} #0" in shown.output and ("see a|b" in shown.output or args[0] == "compare")
        assert not any(e in shown.output for e in ("\\|", "\\*", "\\[", "\\<", "\\\\")), shown.output
    csv = CliRunner().invoke(main, ["compare", str(a), str(b), "--format", "csv"])
    assert csv.exit_code == 0 and LABEL in csv.output      # other formats are printed as they are


def test_compare_on_a_real_terminal_prints_no_escapes(tmp_path):
    """The same through a pseudo-terminal, as a user sees it."""
    a, b = _cards(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="400")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qcard.cli", "compare", str(a), str(b)], stdout=follower,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:        # the terminal closed: the command is done
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(60) == 0
    text = out.decode("utf-8")
    assert f"{LABEL} #0" in text and "\\|" not in text and "\\*" not in text


def _point(write_config, tmp_path, model: str, method: str = "fp32"):
    cfg = write_config(f"experiment: t\nout: {tmp_path / 'runs'}\nmodels: ['{model}']\n"
                       "dataset: {ref: qcard:mnist5k, eval_size: 20}\n"
                       f"methods:\n  - {method}\n")
    exp = load_config(cfg)
    return exp, exp.points()[0]


def test_reproduce_line_of_a_python_model_names_its_pythonpath(write_config, tmp_path):
    exp, point = _point(write_config, tmp_path, "python:user_models:tiny_net")
    line = reproduce_command(exp, point)
    assert line.startswith(f"PYTHONPATH={TESTS} qcard run {exp.path} --only {point.id[:10]} --force"), line
    # the named folder is what makes the model importable in a fresh shell
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = line.split()[0].split("=", 1)[1]
    r = subprocess.run([sys.executable, "-c", "import user_models; print(user_models.__file__)"], env=env,
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == str(TESTS / "user_models.py")


def test_reproduce_line_names_a_user_methods_folder_and_nothing_for_bundled_code(write_config, tmp_path):
    exp, point = _point(write_config, tmp_path, "qcard:lenet5", "{name: user_methods:ScaleWeights}")
    assert reproduce_command(exp, point).startswith(f"PYTHONPATH={TESTS} qcard run ")
    exp, point = _point(write_config, tmp_path, "qcard:lenet5")
    assert reproduce_command(exp, point).startswith("qcard run ")
    exp, point = _point(write_config, tmp_path, "python:torch.nn:Identity")     # installed: no PYTHONPATH
    assert reproduce_command(exp, point).startswith("qcard run ")
