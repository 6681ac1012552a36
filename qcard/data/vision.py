"""Image datasets on disk: imagefolder:PATH (ImageNet validation layout) and torchvision CIFAR."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import DatasetError
from .base import QDataset, make_fingerprint
from .catalog import CIFAR_FOLDERS, DEFAULT_ROOT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875   # 224 / 256, the classic ImageNet evaluation recipe

# --------------------------------------------------------------------------- imagefolder

def _model_attr(model_info: Any, name: str) -> Any:
    if model_info is None:
        return None
    if isinstance(model_info, dict):
        return model_info.get(name)
    return getattr(model_info, name, None)


def resolve_image_preprocessing(model_info: Any = None, input_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Any]:
    """The eval transform, as data: the model's own data config (timm, torchvision, the bundled models'
    recorded preprocessing), else ImageNet defaults at the model's or the config's input shape.

    A config input_shape changes the image size only; its channel count must be the model's."""
    cfg = _model_attr(model_info, "data_config")
    ref = _model_attr(model_info, "ref") or "the model"
    if cfg:
        c, h, w = (int(s) for s in cfg.get("input_size", (3, 224, 224)))
        crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
        mean = [float(m) for m in cfg.get("mean", IMAGENET_MEAN)]
        std = [float(s) for s in cfg.get("std", IMAGENET_STD)]
        interpolation = str(cfg.get("interpolation") or "bilinear")
        origin = f"data config of {ref}"
        if input_shape is not None:
            if int(input_shape[0]) != c:
                raise DatasetError(f"input_shape {list(input_shape)} has {input_shape[0]} channel(s) but {ref} takes "
                                   f"{c} (its data config: {c}x{h}x{w}); drop input_shape or give [{c}, H, W]")
            if (int(input_shape[1]), int(input_shape[2])) != (h, w):
                h, w = int(input_shape[1]), int(input_shape[2])
                origin += f", size {h}x{w} from the config's input_shape"
    else:
        shape = input_shape or _model_attr(model_info, "input_shape") or (3, 224, 224)
        c, h, w = (int(s) for s in shape)
        crop_pct, interpolation = DEFAULT_CROP_PCT, "bilinear"
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        origin = "imagenet defaults (the model records no data config)"
    if c not in (1, 3):
        raise DatasetError(f"imagefolder images can be loaded with 1 or 3 channels, not {c}")
    if len(mean) != c:   # e.g. a grayscale model with RGB statistics: use their average
        mean, std = [sum(mean) / len(mean)] * c, [sum(std) / len(std)] * c
    # Same rule as timm: resize the shorter side to floor(crop / crop_pct), then center-crop.
    resize = int(math.floor(min(h, w) / crop_pct))
    return {"origin": origin, "resize": resize, "crop": [h, w], "crop_pct": crop_pct,
            "interpolation": interpolation, "mean": mean, "std": std, "channels": c}


CLASS_MAPS = ("imagenet",)


def imagenet_class_targets(classes, ref: str) -> list:
    """ImageNet-1k class index of each folder class: the folder names must be ImageNet wnids (n01440764...)."""
    from timm.data import ImageNetInfo
    wnids = list(ImageNetInfo().label_names())     # sorted wnids, in the 1000-class index order
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise DatasetError(f"{ref}: class_map: imagenet needs ImageNet wnid folder names (e.g. n01440764), but "
                           f"{len(unknown)} of {len(classes)} are not, e.g. {', '.join(unknown[:3])}; drop class_map "
                           f"and give the model num_classes: {len(classes)}")
    return [index[c] for c in classes]


def _build_transform(pre: Dict[str, Any]):
    from torchvision import transforms as T
    modes = {m.value: m for m in T.InterpolationMode}
    if pre["interpolation"] not in modes:
        raise DatasetError(f"unknown interpolation '{pre['interpolation']}'; choices: {', '.join(sorted(modes))}")
    steps = [T.Resize(pre["resize"], interpolation=modes[pre["interpolation"]]), T.CenterCrop(pre["crop"])]
    if pre["channels"] == 1:
        steps.append(T.Grayscale(1))
    steps += [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
    return T.Compose(steps)


class ImageFolderQDataset(QDataset):
    decodes_per_item = True       # each item is a file read, JPEG decode and resize: loader workers help
    def __init__(self, ref: str, split: str, folder: Path, split_info: Dict[str, Any], pre: Dict[str, Any],
                 class_map: Optional[str] = None):
        from torchvision.datasets import ImageFolder
        try:
            self.folder = ImageFolder(str(folder), transform=_build_transform(pre))
        except (FileNotFoundError, OSError) as exc:
            raise DatasetError(f"cannot read image folder '{folder}' for {ref}: {exc}") from exc
        self.ref, self.split = ref, split
        self.classes = list(self.folder.classes)
        self.num_classes = len(self.classes)
        self.input_shape = (pre["channels"], *pre["crop"])
        self.preprocessing = pre
        # The files (relative path, class, byte size) identify the data; the absolute path does not,
        # so the same images on two machines get the same fingerprint.
        files = [(str(Path(p).relative_to(folder).as_posix()), int(t), Path(p).stat().st_size)
                 for p, t in self.folder.samples]
        files_sha = hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()
        self.split_info = {**split_info, "size": len(files), "num_classes": self.num_classes, "files_sha256": files_sha}
        items = {"files_sha256": files_sha, "classes": self.classes}
        self.target_map = None
        if class_map is not None:
            if class_map not in CLASS_MAPS:
                raise DatasetError(f"unknown class_map '{class_map}'; allowed: {', '.join(CLASS_MAPS)}")
            self.target_map = imagenet_class_targets(self.classes, ref)
            self.num_classes = 1000
            self.split_info["class_map"] = {"kind": class_map, "folder_classes": len(self.classes),
                                            "model_classes": 1000,
                                            "rule": "folder name (ImageNet wnid) -> ImageNet-1k class index"}
            items["class_map"] = class_map
        self.fingerprint = make_fingerprint("imagefolder", split_info["folder_role"], items, pre)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        return image, self._target(label)

    def _target(self, label: int) -> int:
        return int(label) if self.target_map is None else self.target_map[label]

    def targets(self):
        return [self._target(t) for t in self.folder.targets]


def load_imagefolder(ref: str, path: str, split: str, model_info: Any = None,
                     input_shape: Optional[Tuple[int, ...]] = None, class_map: Optional[str] = None) -> ImageFolderQDataset:
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise DatasetError(f"image folder '{path}' (from {ref}) does not exist or is not a directory")
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if subdirs & {"train", "val", "test"}:
        wanted = ["train"] if split == "train" else ["val", "test"]
        found = [name for name in wanted if name in subdirs]
        if not found:
            raise DatasetError(f"{ref}: split '{split}' needs a subfolder {' or '.join(repr(w) for w in wanted)} "
                               f"under '{root}'; found: {', '.join(sorted(subdirs))}")
        folder = root / found[0]
        info = {"method": "folder layout", "folder": found[0], "folder_role": found[0],
                "shared_with_other_splits": False}
    else:
        folder = root
        # One folder of class subfolders is all the data there is: every split reads it.
        info = {"method": "single folder", "folder": ".", "folder_role": "single",
                "shared_with_other_splits": True}
    pre = resolve_image_preprocessing(model_info, input_shape)
    return ImageFolderQDataset(ref, split, folder, info, pre, class_map)


# --------------------------------------------------------------------------- CIFAR

CIFAR = {
    "CIFAR10": {"num_classes": 10, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
                "folder": CIFAR_FOLDERS["CIFAR10"]},
    "CIFAR100": {"num_classes": 100, "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762),
                 "folder": CIFAR_FOLDERS["CIFAR100"]},
}


class CifarQDataset(QDataset):
    """CIFAR held as uint8 (N,32,32,3) and normalized per item with tensor ops (no PIL round trip)."""
    decodes_per_item = True       # per-item conversion and normalization: loader workers overlap it

    def __init__(self, name: str, split: str, data: np.ndarray, targets, files: list, root: str):
        spec = CIFAR[name]
        self.ref, self.split = f"torchvision:{name}", split
        self.data = data
        self.labels = np.asarray(targets, dtype=np.int64)
        self.num_classes = spec["num_classes"]
        self.input_shape = (3, 32, 32)
        self.preprocessing = {"to_tensor": "x / 255", "mean": list(spec["mean"]), "std": list(spec["std"]),
                              "resize": None, "crop": None, "augmentation": None}
        self.split_info = {"method": "official split", "size": int(len(self.labels)), "root": root,
                           "files_md5": files}
        self._mean = torch.tensor(spec["mean"]).view(3, 1, 1)
        self._std = torch.tensor(spec["std"]).view(3, 1, 1)
        self.fingerprint = make_fingerprint(self.ref, split, {"files_md5": files, "size": int(len(self.labels))},
                                            self.preprocessing)

    def __len__(self) -> int:
        return int(len(self.labels))

    def targets(self):
        return self.labels.tolist()

    def __getitem__(self, index: int):
        x = torch.from_numpy(np.ascontiguousarray(self.data[index])).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std, int(self.labels[index])


def load_cifar(name: str, split: str, root: Optional[str], download: bool) -> CifarQDataset:
    import torchvision.datasets as tvd
    root_path = str(Path(root or DEFAULT_ROOT).expanduser())
    cls = getattr(tvd, name)
    try:
        ds = cls(root_path, train=(split == "train"), download=bool(download))
    except RuntimeError as exc:
        if download:
            raise DatasetError(f"torchvision:{name}: download into '{root_path}' failed: {exc}") from exc
        raise DatasetError(f"torchvision:{name}: files not found under '{root_path}' (expected folder "
                           f"'{CIFAR[name]['folder']}'). Set `download: true` to fetch them (needs internet), "
                           f"or `root:` to the folder that holds them") from exc
    except OSError as exc:   # no network, disk full, ...
        raise DatasetError(f"torchvision:{name}: cannot load from '{root_path}': {exc}") from exc
    file_list = ds.train_list if split == "train" else ds.test_list
    files = [[fname, md5] for fname, md5 in file_list]
    return CifarQDataset(name, split, ds.data, ds.targets, files, root_path)
