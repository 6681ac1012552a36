"""Train the bundled models on qcard:mnist5k, deterministically, and record how.

`train_model(name)` with the default recipe and seed reproduces weights/NAME.safetensors bit for bit
on the same software stack and CPU type (fixed thread count, deterministic algorithms, seeded
shuffles and augmentation). Float results may differ on other CPU instruction sets or library
versions; the JSON record keeps what is needed to tell.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QcardError, UnknownNameError
from ..provenance import cpu_name
from ..registry import import_object
from .catalog import ARCHITECTURES, BUNDLED, bundled_record
from .loader import state_dict_sha256

THREADS = 2     # fixed: CPU reductions may depend on how work is split between threads

_AUG = {"rotate_deg": 10.0, "scale": 0.10, "translate_px": 2.0}
_BASE = {"batch_size": 64, "optimizer": "adamw", "betas": [0.9, 0.999], "schedule": "linear warmup 1 epoch, cosine to 0",
         "warmup_epochs": 1, "label_smoothing": 0.05, "augmentation": _AUG}

RECIPES: Dict[str, Dict[str, Any]] = {
    "resnet8": {**_BASE, "epochs": 12, "lr": 3e-3, "weight_decay": 5e-4},
    "mobilenet_tiny": {**_BASE, "epochs": 15, "lr": 4e-3, "weight_decay": 5e-4},
    "lenet5": {**_BASE, "epochs": 20, "lr": 3e-3, "weight_decay": 5e-4},
    "mlp": {**_BASE, "epochs": 25, "lr": 2e-3, "weight_decay": 1e-4},
    "vit_tiny": {**_BASE, "epochs": 40, "lr": 2e-3, "weight_decay": 0.05},
}


def augment(x: torch.Tensor, gen: torch.Generator, cfg: Dict[str, float]) -> torch.Tensor:
    """Random small affine per image (rotation, scale, shift) with tensor ops; border padding = background."""
    if not cfg:
        return x
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(cfg["rotate_deg"])
    scale = 1 + u[:, 1] * cfg["scale"]
    tx, ty = u[:, 2] * 2 * cfg["translate_px"] / w, u[:, 3] * 2 * cfg["translate_px"] / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def serialize_weights(state: Dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state_dict. One metadata entry only: safetensors writes a metadata dict
    in hash-map order, so several entries would make the bytes (and the file's sha256) vary by run."""
    from safetensors.torch import save
    return save(state, metadata={"format": "pt"})


class _ShuffledAugmented:
    """The zoo recipe's mini-batches for the shared training loop: one generator draws each epoch's
    permutation and every batch's augmentation, in that order (the shipped weights depend on it)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, augmentation: Dict[str, float], seed: int):
        self.X, self.y, self.bs, self.aug = X, y, batch_size, augmentation
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.bs)

    def epoch(self, n: int):
        perm = torch.randperm(len(self.X), generator=self.gen)
        for i in range(0, len(self.X), self.bs):
            idx = perm[i:i + self.bs]
            yield augment(self.X[idx], self.gen, self.aug), self.y[idx]


def _train(model, recipe: Dict[str, Any], X, y, seed: int, name: str, progress: bool):
    """The zoo recipe through the shared loop (qcard.training.train): AdamW without decay on biases,
    norms and position embeddings, linear warmup then cosine per step, label smoothing."""
    from ..training import TrainRecipe, train
    if recipe["betas"][1] != 0.999:      # the shared optimizer fixes beta2 (momentum is beta1)
        raise ValueError(f"zoo recipe for {name}: beta2 must be 0.999, got {recipe['betas'][1]}")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    batches = _ShuffledAugmented(X, y, recipe["batch_size"], recipe["augmentation"], seed)
    shared = TrainRecipe(epochs=recipe["epochs"], batch_size=recipe["batch_size"], optimizer="adamw",
                         lr=recipe["lr"], momentum=recipe["betas"][0], weight_decay=recipe["weight_decay"],
                         schedule="none", label_smoothing=recipe["label_smoothing"])
    warmup = len(batches) * recipe["warmup_epochs"]
    ctx = SimpleNamespace(seed=seed, device="cpu", progress=progress and sys.stderr.isatty(),
                          log=lambda msg: print(f"qcard zoo train {name}: {msg}", file=sys.stderr), evaluate=None)
    return train(model, None, shared, ctx, params=groups, batches=batches,
                 lr_factor=lambda step, total: _lr_factor(step, warmup, total))


def train_model(name: str, *, epochs: Optional[int] = None, seed: int = 0, out_dir: Optional[str] = None,
                progress: bool = True) -> Dict[str, Any]:
    """Train bundled model `name` on qcard:mnist5k train and evaluate on its test split.

    Writes NAME.safetensors and NAME.json into out_dir when given (nothing is written otherwise).
    Returns the JSON record, plus "files" (when written) and "reproduces_bundled" (whether every
    tensor is bit-identical to the shipped weights).
    """
    if name in ARCHITECTURES:
        raise QcardError(f"qcard:{name} is an architecture without bundled weights: it needs "
                         f"{'x'.join(map(str, ARCHITECTURES[name]['input_shape']))} data (CIFAR) that cannot ship "
                         f"with qcard; train it in a config with the fp32_train method (see "
                         f"configs/imagenet/marvin_cifar.yaml)")
    if name not in BUNDLED:
        raise UnknownNameError("qcard model", name, BUNDLED)
    from ..data import load_dataset

    recipe = dict(RECIPES[name])
    if epochs is not None:
        if int(epochs) <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        recipe["epochs"] = int(epochs)
    train = load_dataset("qcard:mnist5k", "train")
    test = load_dataset("qcard:mnist5k", "test")
    X, y = train.tensors()
    Xt, yt = test.tensors()

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = import_object(BUNDLED[name]["factory"], "bundled model")()
            log = _train(model, recipe, X, y, seed, name, progress)
            test_acc = accuracy(model, Xt, yt)
            train_acc = accuracy(model, X, y)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    seconds = time.perf_counter() - start

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    blob = serialize_weights(state)
    sha = hashlib.sha256(blob).hexdigest()
    tensors_sha = state_dict_sha256(state)
    record: Dict[str, Any] = {
        "name": name, "ref": f"qcard:{name}", "architecture": BUNDLED[name]["factory"],
        "description": BUNDLED[name]["description"], "difficulty": BUNDLED[name]["difficulty"],
        "params": sum(p.numel() for p in model.parameters()),
        "weights_file": f"{name}.safetensors", "weights_bytes": len(blob), "sha256": sha,
        "tensors_sha256": tensors_sha,
        "test_accuracy": round(test_acc, 4), "train_accuracy": round(train_acc, 4),
        "final_train_loss": round(log.curve[-1]["loss"], 4),
        "seed": seed, "epochs": recipe["epochs"], "recipe": recipe,
        "dataset": {"train": train.ref + ":train", "train_fingerprint": train.fingerprint,
                    "test": test.ref + ":test", "test_fingerprint": test.fingerprint,
                    "train_size": len(train), "test_size": len(test)},
        "determinism": {"threads": THREADS, "deterministic_algorithms": True, "torch": torch.__version__,
                        "numpy": np.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu": cpu_name()},
        "train_seconds": round(seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"qcard zoo train {name}" + (f" --epochs {epochs}" if epochs else "") + (f" --seed {seed}" if seed else ""),
    }
    result = dict(record)
    shipped = bundled_record(name)
    result["reproduces_bundled"] = bool(shipped and shipped.get("tensors_sha256") == tensors_sha)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.safetensors").write_bytes(blob)
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        result["files"] = [str(out / f"{name}.safetensors"), str(out / f"{name}.json")]
    return result


