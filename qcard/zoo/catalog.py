"""The bundled models as data (no torch import): architecture, description, what makes them hard to quantize.

Weights and their training record live next to this file in weights/NAME.safetensors and NAME.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.catalog import MNIST_MEAN, MNIST_STD

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

BUNDLED: Dict[str, Dict[str, Any]] = {
    "resnet8": {
        "factory": "qcard.zoo.models:ResNet8",
        "description": "ResNet-8: conv-bn-relu stem, 3 basic blocks (16/32/64 ch), avgpool, fc",
        "difficulty": "batch norm to fold; residual adds whose two inputs have different ranges",
    },
    "mobilenet_tiny": {
        "factory": "qcard.zoo.models:MobileNetTiny",
        "description": "MobileNet-style: depthwise-separable and inverted-residual blocks, BN, ReLU6",
        "difficulty": "depthwise convs: after BN folding, per-channel weight ranges differ widely, "
                      "so per-tensor weight quantization suffers at low bits",
    },
    "lenet5": {
        "factory": "qcard.zoo.models:LeNet5",
        "description": "LeNet-5 style: two conv5-relu-maxpool stages and three fc layers, no batch norm",
        "difficulty": "easy baseline: no BN, no residuals; first/last layer sensitivity shows at low bits",
    },
    "mlp": {
        "factory": "qcard.zoo.models:MLP",
        "description": "MLP 784-256-128-10 with ReLU",
        "difficulty": "all-linear; large fan-in first layer, weight-dominated memory",
    },
    "vit_tiny": {
        "factory": "qcard.zoo.models:ViTTiny",
        "description": "tiny ViT: 7x7 patches (16 tokens + cls), 4 pre-norm blocks, dim 64, 4 heads",
        "difficulty": "LayerNorm, softmax, GELU and activation-activation matmuls; outlier activations",
    },
}

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
# The preprocessing the bundled weights were trained with (qcard:mnist5k: x / 255, MNIST mean/std, 28x28, no
# resize), in timm's data-config form: an image folder is read this way for a bundled model, as it is read
# with timm's or torchvision's own config for theirs. crop_pct 1.0: resize to 28, crop 28 (nothing cut off).
DATA_CONFIG: Dict[str, Any] = {"input_size": INPUT_SHAPE, "mean": (MNIST_MEAN,), "std": (MNIST_STD,),
                               "crop_pct": 1.0, "interpolation": "bilinear", "trained_on": "qcard:mnist5k"}

# qcard models shipped as architectures only (no bundled weights): they need data that cannot ship in
# the package. They build with seeded random weights; train them from scratch or give weights: PATH.
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "resnet20_cifar": {
        "factory": "qcard.zoo.models:ResNetCIFAR",
        "description": "ResNet-20 for CIFAR (3x16/32/64-channel stages of 3 basic blocks), the MARViN reference's",
        "input_shape": (3, 32, 32), "num_classes": 10,
    },
    "alexnet_cifar": {
        "factory": "qcard.zoo.models:AlexNetCIFAR",
        "description": "small CIFAR AlexNet (5 convs, 3 max pools, one fc, no BN), the MARViN reference's",
        "input_shape": (3, 32, 32), "num_classes": 10,
    },
}


def bundled_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def bundled_record(name: str) -> Optional[Dict[str, Any]]:
    """The training record (NAME.json) of a bundled model, or None when it has not been trained."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def list_models() -> List[Dict[str, Any]]:
    """One row per bundled model, for `qcard zoo list` (reads the JSON records only; no torch)."""
    rows = []
    for name, entry in BUNDLED.items():
        rec = bundled_record(name) or {}
        rows.append({"name": name, "ref": f"qcard:{name}", "description": entry["description"],
                     "difficulty": entry["difficulty"], "params": rec.get("params"),
                     "test_accuracy": rec.get("test_accuracy"), "weights_bytes": rec.get("weights_bytes"),
                     "input_shape": list(INPUT_SHAPE), "num_classes": NUM_CLASSES, "architecture_only": False})
    for name, entry in ARCHITECTURES.items():
        rows.append({"name": name, "ref": f"qcard:{name}", "description": entry["description"],
                     "difficulty": None, "params": None, "test_accuracy": None, "weights_bytes": None,
                     "input_shape": list(entry["input_shape"]), "num_classes": entry["num_classes"],
                     "architecture_only": True})
    return rows
