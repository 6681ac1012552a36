"""Metadata that travels with the exported model (issue 25, item 5): `qcard export` writes the card's id,
versions, recipe, preprocessing and class names into the ONNX metadata_props, read back here with
onnxruntime; `--format hf` writes a Hugging Face model card whose front matter huggingface_hub parses
(model-index with the card's top-1, its interval, dataset and metric)."""
import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from qcard.cli import main
from qcard.deploy.metadata import (PREFIX, card_metadata, class_names_of, hf_front_matter, recipe_summary,
                                   write_metadata)
from qcard.provenance import git_state
from qcard.runner import run

ort = pytest.importorskip("onnxruntime")

CONFIG = """
experiment: release
seeds: [0]
models: [qcard:mlp]
dataset: {ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {size: 64, seed: 0}}
methods:
  - {name: ptq, label: W8A8, params: {w_bits: 8, a_bits: 8, pipeline: minmax}}
cost: {profiles: [bitops]}
"""


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    cfg = root / "c.yaml"
    cfg.write_text(CONFIG)
    summary = run(str(cfg), out=str(root / "runs"), progress=False, log=lambda m: None)
    assert summary.ok
    folder = summary.outcomes[0].folder
    return folder, json.loads((folder / "card.json").read_text())


@pytest.fixture(scope="module")
def exported(point, tmp_path_factory):
    folder, card = point
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    r = CliRunner().invoke(main, ["export", str(folder), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"metadata: card {card['id'][:10]}" in r.output
    return out


def test_onnxruntime_reads_the_cards_metadata(point, exported):
    _, card = point
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[PREFIX + "card_id"] == card["id"]
    assert meta[PREFIX + "card_qcard_version"] == card["provenance"]["qcard_version"]
    assert meta[PREFIX + "card_git_commit"] == card["provenance"]["git_commit"]
    commit, _ = git_state()
    if commit:
        assert meta[PREFIX + "export_git_commit"] == commit
    assert meta[PREFIX + "model"] == "qcard:mlp" and meta[PREFIX + "dataset"] == "qcard:mnist5k"
    pre = json.loads(meta[PREFIX + "preprocessing"])
    card_pre = card["dataset"]["preprocessing"]
    assert pre["mean"] == card_pre["mean"] and pre["std"] == card_pre["std"]
    assert pre["input_shape"] == card_pre["input_shape"] == [1, 28, 28] and meta[PREFIX + "input_shape"] == "1,28,28"
    assert pre["source_scale"] == card_pre["source_scale"]
    recipe = meta[PREFIX + "recipe"]
    w = card["quantization"]["weights"]
    assert recipe.startswith("ptq W8A8: weights per-channel symmetric (minmax ranges") and "calibration 64 images" in recipe
    assert json.loads(meta[PREFIX + "recipe_json"])["weights"] == w
    assert f"{card['results']['quantized']:.2f} % top-1 [{card['results']['ci95'][0]:.1f}, " in meta[PREFIX + "top1"]
    assert "class_names" not in "".join(meta)       # mnist5k names no classes: nothing is made up
    assert session.get_modelmeta().description.startswith(f"qcard card {card['id']}")
    # the metadata changes nothing the runtime computes: the model still runs, one row of 10 logits
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 10)


def test_class_names_go_in_when_the_dataset_names_them(point, exported, tmp_path):
    _, card = point

    class Folder:          # an image folder's dataset: one name per class folder
        classes, num_classes = [f"digit {i}" for i in range(10)], 10

    class Mapped:          # ImageNet wnid folders mapped onto a 1000-class model: names for 2 of 1000 outputs
        classes, num_classes = ["n01440764", "n01443537"], 1000

    assert class_names_of(Folder()) == Folder.classes and class_names_of(Mapped()) is None
    assert class_names_of(object()) is None
    copy = tmp_path / "named.onnx"
    shutil.copyfile(exported, copy)
    write_metadata(copy, card_metadata(card, class_names_of(Folder())))
    meta = ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta[PREFIX + "class_names"]) == Folder.classes
    assert meta[PREFIX + "card_id"] == card["id"]      # keys replaced, not duplicated
    import onnx
    keys = [p.key for p in onnx.load(str(copy)).metadata_props]
    assert len(keys) == len(set(keys))


def test_hf_model_card_passes_huggingface_hub(point, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index
    folder, card = point
    out = tmp_path / "release"
    r = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "card.json", "model.onnx"]
    assert (out / "card.json").read_bytes() == (folder / "card.json").read_bytes()
    meta = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map[PREFIX + "card_id"] == card["id"]

    mc = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    results = mc.data.eval_results
    assert len(results) == 1
    res, r_ = results[0], card["results"]
    assert res.task_type == "image-classification" and res.metric_type == "accuracy"
    assert res.dataset_type == "qcard:mnist5k" and res.dataset_split == "test"
    assert res.metric_value == pytest.approx(r_["quantized"])
    assert res.metric_name == f"top-1 accuracy (%), 95 % interval [{r_['ci95'][0]:.1f}, {r_['ci95'][1]:.1f}]"
    assert res.verified is False and res.dataset_args == {"fingerprint": card["dataset"]["fingerprint"]}
    front = yaml.safe_load(mc.content.split("---")[1])
    assert eval_results_to_model_index(mc.data.model_name, results) == front["model-index"]
    q = mc.data.to_dict()["qcard"]
    assert q["card_id"] == card["id"] and q["weights"]["granularity"] == "per_channel"
    assert q["preprocessing"]["mean"] == card["dataset"]["preprocessing"]["mean"]
    assert "## Quantization card — qcard:mlp · W8A8" in mc.text and "# qcard:mlp W8A8, quantized with qcard" in mc.text


def test_the_hub_parser_refuses_a_broken_model_index(point):
    """Negative control: the same parse fails when the model-index lacks its metrics."""
    from huggingface_hub import ModelCard
    front = hf_front_matter(point[1])
    del front["model-index"][0]["results"][0]["metrics"]
    with pytest.raises(Exception):
        ModelCard("---\n" + yaml.safe_dump(front) + "---\nbody\n", ignore_metadata_errors=False)


def test_front_matter_keeps_hostile_strings_as_strings(point):
    card = json.loads(json.dumps(point[1]))
    card["method"]["label"] = "x: y\n---\n<script>alert(1)</script> {{ }}"
    front = hf_front_matter(card)
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"
    again = yaml.safe_load(text.split("\n---\n")[0].removeprefix("---\n"))
    assert again == front and again["model-index"][0]["name"].endswith(card["method"]["label"])
    assert "label x: y" in recipe_summary(card)


def test_export_refuses_folders_it_would_overwrite(point, tmp_path):
    folder, _ = point
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", str(busy)])
    assert r.exit_code == 2 and "give a new or empty folder" in r.output
    r = CliRunner().invoke(main, ["export", str(folder), "-o", str(busy)])
    assert r.exit_code == 2 and "is a folder" in r.output
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
