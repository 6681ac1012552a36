"""Model references -> nn.Module (eval mode) plus a ModelInfo that a card records.

    qcard:NAME                   bundled tiny model, bundled weights by default
    torchvision:NAME             torchvision.models.get_model (pretrained=True: torchvision's own loader)
    timm:NAME                    timm.create_model
    python:pkg.module:callable   a user's function or class returning an nn.Module

`weights=PATH` loads a local .safetensors or .pth/.pt (torch.load with weights_only=True) on top of
any of them; `weights="random"` asks for random initialisation explicitly. Random initialisation is
seeded (init_seed) inside a forked RNG, so it is reproducible and leaves the caller's RNG alone.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import ModelLoadError, QcardError, UnknownNameError
from ..registry import import_object
from .catalog import ARCHITECTURES, BUNDLED, DATA_CONFIG, INPUT_SHAPE, NUM_CLASSES, bundled_weights_path
from .refs import is_timm_model, parse_ref, timm_names, torchvision_names, unknown_model

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class ModelInfo:
    ref: str
    source: str                       # qcard | torchvision | timm | python
    name: str
    weights: Optional[str]            # local path, "bundled:<file>", "torchvision:<TAG>", "timm:pretrained[:tag]", None = random
    weights_sha256: Optional[str]
    params: int
    input_shape: Optional[Tuple[int, int, int]]
    num_classes: Optional[int]
    data_config: Optional[Dict[str, Any]]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        if self.data_config is not None:
            d["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return d


# --------------------------------------------------------------------------- weights files

def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, names sorted: the one weights hash of
    qcard (cards, FP32 cache keys, the bundled models' `tensors_sha256`), whatever file or library the
    weights came from, random initialisations included."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """A state_dict from a local .safetensors or .pth/.pt file (never unpickling arbitrary objects)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"weights file '{path}' not found")
    suffix = p.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"weights file '{path}': unknown format '{suffix}'; allowed: {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not safetensors, ...
        raise ModelLoadError(f"cannot load weights file '{path}' (torch.load weights_only=True / safetensors): "
                             f"{type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelLoadError(f"weights file '{path}' does not hold a state_dict (a mapping of names to tensors, "
                             f"possibly under 'state_dict' or 'model')")
    if obj and all(k.startswith("module.") for k in obj):   # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def apply_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], where: str, ref: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted((k for k in state if k not in own), key=lambda k: (k.endswith("num_batches_tracked"), k))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        raise ModelLoadError(f"weights {where} do not fit {ref}: {'; '.join(parts)}")
    model.load_state_dict(_with_versions(state, own), strict=False)


def _with_versions(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` with the model's own per-module state-dict versions when it carries none. A safetensors file
    (or a plain dict) drops torch's `_metadata`, and some modules' loaders then refuse or misread it
    (torchvision's MNASNet raises "version should be set to 1 or 2"; BatchNorm takes it for a pre-1.0
    state). Its keys and shapes matched the model above, so it is read as the current format."""
    if getattr(state, "_metadata", None) is not None or getattr(own, "_metadata", None) is None:
        return state
    out = OrderedDict(state)
    out._metadata = own._metadata  # type: ignore[attr-defined]
    return out


# --------------------------------------------------------------------------- helpers

def _infer_num_classes(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return int(last.out_features) if last is not None else None


def _adapt_in_chans(model: nn.Module, in_chans: int, ref: str) -> None:
    """Replace the first Conv2d so the model takes in_chans channels (pretrained filters are averaged)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_chans:
                    return
                if child.groups != 1:
                    raise ModelLoadError(f"{ref}: cannot change in_chans, its first conv is grouped")
                new = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, 1, child.bias is not None, child.padding_mode)
                with torch.no_grad():
                    mean_filter = child.weight.mean(dim=1, keepdim=True)
                    new.weight.copy_(mean_filter.repeat(1, in_chans, 1, 1) * (child.in_channels / in_chans))
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise ModelLoadError(f"{ref}: in_chans given but the model has no Conv2d to adapt")


def _torchvision_data_config(name: str, weights_enum: Any = None) -> Optional[Dict[str, Any]]:
    """The eval preprocessing of torchvision's (default) weights for this architecture, as timm-style data."""
    import torchvision
    try:
        enum = weights_enum or torchvision.models.get_model_weights(name).DEFAULT
        tr = enum.transforms()
        crop, resize = int(tr.crop_size[0]), int(tr.resize_size[0])
        return {"input_size": (3, crop, crop), "interpolation": tr.interpolation.value,
                "mean": tuple(float(m) for m in tr.mean), "std": tuple(float(s) for s in tr.std),
                "crop_pct": round(crop / resize, 4)}
    except Exception:  # architectures without classification weights: ImageNet defaults
        return {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}


def _with_channels(cfg: Optional[Dict[str, Any]], in_chans: Optional[int]) -> Optional[Dict[str, Any]]:
    if cfg is None or in_chans is None or in_chans == cfg["input_size"][0]:
        return cfg
    c = int(in_chans)
    mean, std = cfg["mean"], cfg["std"]
    return {**cfg, "input_size": (c, *cfg["input_size"][1:]),
            "mean": (sum(mean) / len(mean),) * c, "std": (sum(std) / len(std),) * c}


# --------------------------------------------------------------------------- offline: fail fast

HUB_PROBE_TIMEOUT = 5.0   # seconds to open one connection to the weights' host before any download starts


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` (DNS included: run in a thread,
    because name lookup has no timeout of its own)."""
    import socket
    import threading
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return False
    result: Dict[str, bool] = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError:
            result["ok"] = False
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return result.get("ok", False)


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "QCARD_OFFLINE"))


def require_download(ref: str, url: str, cached: bool, where: str) -> None:
    """Before a library downloads pretrained weights: nothing to do when they are cached; otherwise check once,
    quickly, that their host answers, instead of letting the hub client retry for a minute and fail anyway."""
    if cached:
        return
    if _offline_env() or not _reachable(url, HUB_PROBE_TIMEOUT):
        why = "offline mode is set (HF_HUB_OFFLINE)" if _offline_env() else f"{url} cannot be reached (no network?)"
        raise ModelLoadError(f"{ref}: pretrained weights are not in the local cache ({where}) and {why}. Give "
                             f"`weights: PATH` to a local .safetensors/.pth file instead of `pretrained: true`, or "
                             f"run once where the network is available to fill the cache")


def _timm_weights_cached(name: str) -> Tuple[str, bool, str]:
    """(URL of the weights' host, whether they are in the local cache, the cache folder) for a timm model."""
    import timm.models
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else \
            ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        hit = any(isinstance(try_to_load_from_cache(hub_id.split("@")[0], f, cache_dir=cache), str) for f in files)
        return endpoint, hit, cache
    url = getattr(cfg, "url", None) if cfg is not None else None
    if not url:
        return "", True, ""       # nothing to download that we know of: leave it to timm
    return url, _torch_hub_cached(url), str(Path(torch.hub.get_dir()) / "checkpoints")


def _torch_hub_cached(url: str) -> bool:
    from urllib.parse import urlsplit
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name).is_file()


def code_sha256(ref: str, model: nn.Module) -> str:
    """sha256 of the source files that define what the model computes: the module of a python: constructor
    and the module of every layer class in it, except torch's own (its version is keyed apart). A user who
    edits a forward (or the constructor) gets another fingerprint, so no stale FP32 baseline is reused."""
    import inspect
    import sys
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    modules = {type(m).__module__ for m in model.modules()}
    if ref.startswith("python:"):
        modules.add(ref[len("python:"):].partition(":")[0])
    files = set()
    for name in modules:
        mod = sys.modules.get(name)
        try:
            path = inspect.getsourcefile(mod) if mod is not None else None
        except TypeError:            # built-in or compiled module: no source to hash
            path = None
        if path and not os.path.realpath(path).startswith(torch_dir):
            files.add(os.path.realpath(path))
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.basename(path).encode())
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()


# --------------------------------------------------------------------------- sources

def _build_qcard_architecture(name, pretrained, num_classes, in_chans, kwargs, weights):
    """A qcard architecture without bundled weights: seeded random initialization."""
    entry = ARCHITECTURES[name]
    if weights == "bundled" or pretrained:
        raise ModelLoadError(f"qcard:{name} ships as an architecture only (no bundled or pretrained weights): "
                             f"train it from scratch, or give weights: PATH to a checkpoint of your own")
    nc = entry["num_classes"] if num_classes is None else int(num_classes)
    ic = entry["input_shape"][0] if in_chans is None else int(in_chans)
    factory = import_object(entry["factory"], "qcard architecture")
    try:
        model = factory(num_classes=nc, in_chans=ic, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"qcard:{name}: bad arguments {sorted(kwargs)}: {exc}") from exc
    return model, None, (ic, *entry["input_shape"][1:]), nc, None


def _build_qcard(name, pretrained, num_classes, in_chans, kwargs, use_bundled):
    if name not in BUNDLED:
        raise UnknownNameError("qcard model", name, list(BUNDLED) + list(ARCHITECTURES))
    nc = NUM_CLASSES if num_classes is None else int(num_classes)
    ic = INPUT_SHAPE[0] if in_chans is None else int(in_chans)
    if use_bundled and (nc != NUM_CLASSES or ic != INPUT_SHAPE[0] or kwargs):
        raise ModelLoadError(f"the bundled weights of qcard:{name} are for {INPUT_SHAPE[0]} input channel(s), "
                             f"{NUM_CLASSES} classes and the default architecture; with num_classes/in_chans/"
                             f"other arguments pass weights='random' or weights=PATH")
    factory = import_object(BUNDLED[name]["factory"], "bundled model")
    try:
        model = factory(num_classes=nc, in_chans=ic, **kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"qcard:{name}: bad arguments {sorted(kwargs)}: {exc}") from exc
    weights = None
    if use_bundled:
        path = bundled_weights_path(name)
        if not path.is_file():
            raise ModelLoadError(f"bundled weights of qcard:{name} are missing ({path}); "
                                 f"recreate them with `qcard zoo train {name}`")
        apply_state_dict(model, load_state_file(str(path)), f"'{path}'", f"qcard:{name}")
        weights = f"bundled:{path.name}"
    return model, weights, (ic, *INPUT_SHAPE[1:]), nc, _with_channels(DATA_CONFIG, ic)


def _build_torchvision(name, pretrained, num_classes, in_chans, kwargs):
    import torchvision
    names = torchvision_names()
    if name not in names:
        raise unknown_model("torchvision", name, names, "torchvision.models.list_models()")
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    enum = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    if enum is not None:
        require_download(f"torchvision:{name}", enum.url, _torch_hub_cached(enum.url),
                         str(Path(torch.hub.get_dir()) / "checkpoints"))
    try:
        model = torchvision.models.get_model(name, weights=enum, **kw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"torchvision:{name}: cannot build with {kw or 'defaults'}"
                             f"{' and pretrained weights' if pretrained else ''}: {exc}") from exc
    except Exception as exc:  # download failures: no network, no cache
        raise ModelLoadError(f"torchvision:{name}: pretrained weights {enum} could not be loaded (torchvision "
                             f"downloads them to ~/.cache/torch on first use): {type(exc).__name__}: {exc}") from exc
    if in_chans is not None:
        _adapt_in_chans(model, int(in_chans), f"torchvision:{name}")
    cfg = _with_channels(_torchvision_data_config(name, enum), in_chans)
    weights = f"torchvision:{enum.name}" if enum is not None else None
    return model, weights, tuple(cfg["input_size"]), _infer_num_classes(model), cfg


def _build_timm(name, pretrained, num_classes, in_chans, kwargs):
    import timm
    from timm.data import resolve_data_config
    if not is_timm_model(name):
        raise unknown_model("timm", name, timm_names(), "timm.list_models()")
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if in_chans is not None:
        kw["in_chans"] = int(in_chans)
    if pretrained:
        url, cached, cache = _timm_weights_cached(name)
        require_download(f"timm:{name}", url, cached, cache)
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), **kw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"timm:{name}: cannot build with {kw or 'defaults'}: {exc}") from exc
    except Exception as exc:
        if not pretrained:
            raise
        raise ModelLoadError(f"timm:{name}: pretrained weights could not be loaded (timm downloads them from the "
                             f"Hugging Face hub on first use): {type(exc).__name__}: {exc}") from exc
    cfg = _with_channels(dict(resolve_data_config(model=model)), in_chans)
    weights = None
    if pretrained:
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
        weights = f"timm:pretrained:{tag}" if tag else "timm:pretrained"
    return model, weights, tuple(int(s) for s in cfg["input_size"]), _infer_num_classes(model), cfg


def _build_python(name, pretrained, num_classes, in_chans, kwargs):
    if pretrained:
        raise ModelLoadError(f"python:{name}: pretrained applies to torchvision: and timm: models; "
                             f"give weights=PATH to load a file")
    if ":" not in name:
        raise ModelLoadError(f"python model reference must be 'python:pkg.module:callable', got 'python:{name}'")
    try:
        obj = import_object(name, "model")
    except QcardError as exc:
        raise ModelLoadError(f"python:{name}: {exc}") from exc
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if in_chans is not None:
        kw["in_chans"] = int(in_chans)
    if isinstance(obj, nn.Module):
        if kw:
            raise ModelLoadError(f"python:{name} is a module instance; it takes no arguments ({sorted(kw)})")
        model = obj
    elif callable(obj):
        try:
            model = obj(**kw)
        except Exception as exc:
            raise ModelLoadError(f"python:{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())}) raised "
                                 f"{type(exc).__name__}: {exc}") from exc
    else:
        raise ModelLoadError(f"python:{name} is a {type(obj).__name__}, not a callable returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"python:{name} returned {type(model).__name__}, not a torch.nn.Module")
    shape = getattr(model, "input_shape", None)
    shape = tuple(int(s) for s in shape) if shape is not None else None
    cfg = getattr(model, "data_config", None)
    return model, None, shape, _infer_num_classes(model), dict(cfg) if cfg else None


# --------------------------------------------------------------------------- entry points

def load_model_with_info(ref: str, *, weights: Optional[str] = None, pretrained: bool = False,
                         num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                         init_seed: int = 0, **kwargs) -> Tuple[nn.Module, ModelInfo]:
    """Build the model named by `ref` in eval mode and describe it (see module docstring)."""
    source, name = parse_ref(ref)
    weights_path = None
    if weights is not None:
        if not isinstance(weights, (str, Path)) or not str(weights):
            raise ModelLoadError(f"weights must be a file path, 'random' or null, got {weights!r}")
        weights = str(weights)
        if weights not in ("random", "bundled"):
            weights_path = weights
        if weights == "bundled" and source != "qcard":
            raise ModelLoadError(f"weights='bundled' applies to qcard: models only, not '{ref}'")
        if weights_path and pretrained:
            raise ModelLoadError(f"{ref}: give either pretrained=true or weights=PATH, not both")
        if weights == "random" and pretrained:
            raise ModelLoadError(f"{ref}: pretrained=true contradicts weights='random'")
    use_bundled = source == "qcard" and weights in (None, "bundled")

    # Construction (random init) is seeded in a forked RNG: reproducible, caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        if source == "qcard" and name in ARCHITECTURES:
            built = _build_qcard_architecture(name, pretrained, num_classes, in_chans, kwargs, weights)
        elif source == "qcard":
            built = _build_qcard(name, pretrained, num_classes, in_chans, kwargs, use_bundled)
        elif source == "torchvision":
            built = _build_torchvision(name, pretrained, num_classes, in_chans, kwargs)
        elif source == "timm":
            built = _build_timm(name, pretrained, num_classes, in_chans, kwargs)
        else:
            built = _build_python(name, pretrained, num_classes, in_chans, kwargs)
    model, w_tag, input_shape, n_classes, data_config = built

    if weights_path is not None:
        state = load_state_file(weights_path)
        apply_state_dict(model, state, f"'{weights_path}'", ref)
        p = Path(weights_path).expanduser()
        w_tag = str(p)

    model.eval()
    info = ModelInfo(ref=f"{source}:{name}", source=source, name=name, weights=w_tag,
                     weights_sha256=state_dict_sha256(model.state_dict()),
                     params=sum(p.numel() for p in model.parameters()), input_shape=input_shape,
                     num_classes=n_classes, data_config=data_config)
    return model, info


def load_model(ref: str, *, weights: Optional[str] = None, pretrained: bool = False,
               num_classes: Optional[int] = None, in_chans: Optional[int] = None, **kwargs) -> nn.Module:
    """The model named by `ref`, in eval mode. See load_model_with_info."""
    return load_model_with_info(ref, weights=weights, pretrained=pretrained, num_classes=num_classes,
                                in_chans=in_chans, **kwargs)[0]
