"""Issue 22 item 5: one rule for relative paths in a config (relative to the config's folder), absolute
paths where a run opens them and on the card, point ids that do not change with the current folder."""
from pathlib import Path

import pytest

from qcard.config import config_from_dict, load_config
from qcard.errors import ConfigError

CONFIG = """\
experiment: rel
out: myruns
models:
  - {ref: qcard:lenet5, weights: weights/w.pt}
dataset: {ref: qcard:mnist5k, eval_size: 32, root: data}
methods: [fp32]
"""


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "project"
    (proj / "weights").mkdir(parents=True)
    (proj / "weights" / "w.pt").write_bytes(b"")       # checked for existence only at load time
    (proj / "exp.yaml").write_text(CONFIG)
    (tmp_path / "elsewhere").mkdir()
    return proj


def test_relative_paths_resolve_against_the_config_folder_from_any_folder(project, monkeypatch):
    monkeypatch.chdir(project)
    here = load_config("exp.yaml")
    monkeypatch.chdir(project.parent / "elsewhere")
    there = load_config(project / "exp.yaml")
    relative = load_config("../project/exp.yaml")
    for exp in (here, there, relative):
        assert exp.out_dir() == project / "myruns" / "rel"                  # out: like every other path
        point = exp.points()[0]
        assert point.model.weights == str(project / "weights" / "w.pt")     # absolute: the run opens it
        assert point.dataset.root == str(project / "data")
    assert here.points()[0].id == there.points()[0].id == relative.points()[0].id
    # --out is a flag: relative to the current folder
    assert there.out_dir("flagged") == project.parent / "elsewhere" / "flagged" / "rel"


def test_point_ids_hash_the_paths_as_written(project, tmp_path):
    before = load_config(project / "exp.yaml").points()[0]
    moved = tmp_path / "moved"
    project.rename(moved)                     # the project moved (another machine, another home folder)
    after = load_config(moved / "exp.yaml").points()[0]
    assert after.model.weights == str(moved / "weights" / "w.pt") != before.model.weights
    assert after.id == before.id


def test_a_points_config_reloads_from_anywhere_with_the_same_id(project, monkeypatch):
    point = load_config(project / "exp.yaml").points()[0]
    cfg = point.as_config()
    assert cfg["base_dir"] == str(project) and cfg["models"][0]["weights"] == "weights/w.pt"
    monkeypatch.chdir(project.parent / "elsewhere")
    again = config_from_dict(cfg, source="card").points()[0]
    assert again.id == point.id and again.model.weights == str(project / "weights" / "w.pt")


def test_a_relative_path_found_only_in_the_current_folder_is_an_error_that_says_why(project, monkeypatch):
    (project / "exp.yaml").write_text(CONFIG.replace("weights/w.pt", "w2.pt"))
    monkeypatch.chdir(project.parent / "elsewhere")
    Path("w2.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_config(project / "exp.yaml")
    msg = str(err.value)
    assert "weights file not found" in msg and "relative to its folder" in msg and str(project) in msg
    assert "exists in the current folder" in msg


def test_point_folders_keep_non_ascii_letters(tmp_path):
    exp = config_from_dict({"experiment": "u", "models": [{"ref": "qcard:lenet5", "label": "émoji-net"}],
                            "dataset": "qcard:mnist5k", "methods": [{"name": "fp32", "label": "Größe 8/8"}]})
    folder = exp.points()[0].folder
    assert folder.startswith("émoji-net__Größe-8-8__"), folder


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    import re
    import tomllib
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"       # a table is deprecated (warnings on install)
    floor = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert floor and tuple(map(int, re.findall(r">=(\d+)", floor[0]))) >= (77,)
