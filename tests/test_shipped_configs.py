"""Every config shipped in configs/ loads and expands, and the ImageNet SPARQ config runs end to end on a
tiny generated ImageFolder (random weights instead of pretrained ones: nothing is downloaded)."""
import re
from pathlib import Path

import numpy as np
import pytest

import qcard
from qcard.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_found():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"quickstart.yaml", "examples/sparq_ablation.yaml", "imagenet/sparq.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_shipped_config_loads_and_expands(path):
    # data paths of the ImageNet/CIFAR configs are the user's: files are not checked here
    exp = load_config(path, check_files=False)
    points = exp.points()
    assert points, path
    assert len({p.id for p in points}) == len(points)
    assert len({p.folder for p in points}) == len(points)


def _imagefolder(root: Path, classes=("n01440764", "n01443537"), per_class=4):
    from PIL import Image
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.randint(0, 256, (64, 80, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def _tiny_imagenet_config(tmp_path: Path, name: str) -> Path:
    """The shipped ImageNet config `name`, pointed at a generated 2-class ImageFolder, random weights,
    8 calibration images, batches of 4."""
    _imagefolder(tmp_path / "imagenet")
    text = (ROOT / "configs" / "imagenet" / name).read_text()
    text = re.sub(r'"?imagefolder:/path/to/imagenet"?', f"imagefolder:{tmp_path / 'imagenet'}", text)
    text = text.replace("pretrained: true", "weights: random")
    text = re.sub(r"calibration: \{size: \d+", "calibration: {size: 8", text)
    text = re.sub(r"batch_size: \d+", "batch_size: 4", text)
    text = re.sub(r"num_workers: \d+", "num_workers: 0", text)
    text = re.sub(r"epochs: \d+", "epochs: 1", text)
    text = text.replace("device: cuda", "device: auto")      # the user's GPU; CPU here
    cfg = tmp_path / name
    cfg.write_text(text)
    return cfg


def _run_resnet18(cfg: Path, tmp_path: Path, keep=lambda p: True):
    exp = load_config(cfg)
    only = [p.id for p in exp.points() if p.model.ref == "torchvision:resnet18" and keep(p)]
    assert only
    summary = qcard.run(cfg, out=tmp_path / "runs", only=only, progress=False)
    assert summary.ok, [o.error for o in summary.outcomes if o.error]
    assert len(summary.outcomes) == len(only)
    for o in summary.outcomes:
        assert o.card["model"]["input_shape"] == [3, 224, 224]
        cal = o.card["dataset"]["calibration"]                  # none for the fp32 point
        assert cal is None or cal["size"] == 8
    return [o.card for o in summary.outcomes]


@pytest.mark.slow
def test_imagenet_sparq_config_runs_on_resnet18_with_a_tiny_imagefolder(tmp_path):
    cards = _run_resnet18(_tiny_imagenet_config(tmp_path, "sparq.yaml"), tmp_path)
    assert len(cards) >= 5
    for card in cards:
        st = card["method_stats"]["sparq"]
        assert st["base"] == "paper"
        # the paper's base: first conv and last FC stay FP32 on the card
        q = card["quantization"]
        assert (q["first_layer"]["name"], q["first_layer"]["weight_bits"]) == ("conv1", None)
        assert (q["last_layer"]["name"], q["last_layer"]["weight_bits"]) == ("fc", None)


@pytest.mark.slow
def test_imagenet_ptq_config_runs_on_resnet18_with_a_tiny_imagefolder(tmp_path):
    # AdaRound's optimization is left out: thousands of iterations per layer on a CPU
    cards = _run_resnet18(_tiny_imagenet_config(tmp_path, "ptq_whitepaper.yaml"), tmp_path,
                          keep=lambda p: p.method_label != "ptq_adaround")
    grans = {c["quantization"]["weights"]["granularity"] for c in cards if c["method"]["name"] == "ptq"}
    assert grans == {"per_tensor", "per_channel"}
    assert any(c["method"]["name"] == "fp32" for c in cards)


@pytest.mark.slow
def test_imagenet_qat_config_runs_on_resnet18_with_a_tiny_imagefolder(tmp_path):
    cards = _run_resnet18(_tiny_imagenet_config(tmp_path, "qat_whitepaper.yaml"), tmp_path,
                          keep=lambda p: p.method == "qat" and p.params.w_bits == 4 and p.params.a_bits == 4
                          and p.params.w_granularity == "per_channel")
    (card,) = cards
    assert card["quantization"]["batch_norm"] == "qat_keep_then_fold"
    assert card["method_stats"]["training"]["steps"] == 2          # 8 images, batch 4, 1 epoch
