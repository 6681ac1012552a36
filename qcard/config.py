"""Experiment configs: YAML -> validated pydantic models -> a grid of points.

Validation happens once, here. A point is one card: one model × one method with fully resolved
params × the run's seeds. Its id is a hash of its canonical resolved config, so the same point
always lands in the same folder and a rerun can skip it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .data.catalog import DATASETS
from .errors import ConfigError, QcardError, did_you_mean
from .yamlio import KeyPath, format_path, load_yaml
from .zoo.refs import SOURCES

MODEL_SOURCES = SOURCES
DATASET_SOURCES = tuple(DATASETS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_NAME = 100     # experiment names and labels become folder names; file systems allow 255 bytes


def _check_label(label: Optional[str]) -> Optional[str]:
    """Labels name point folders (LABEL__id): not empty, no leading '-' (read as an option by shell
    tools), short enough for a file name."""
    if label is None:
        return label
    if not label.strip():
        raise ValueError("a label must not be empty; leave the key out for the default")
    if label.startswith("-"):
        raise ValueError(f"label '{label}' starts with '-', which command-line tools read as an option "
                         "in its folder name; start it with a letter or digit")
    if len(label) > MAX_NAME:
        raise ValueError(f"label is {len(label)} characters long; at most {MAX_NAME} (it is part of a folder name)")
    return label


class ModelSpec(Strict):
    ref: str = Field(description="qcard:NAME | torchvision:NAME | timm:NAME | python:pkg.module:callable")
    weights: Optional[str] = Field(None, description="local .safetensors/.pth file (loaded with weights_only=True); "
                                                     "'random' for seeded random initialization; 'bundled' "
                                                     "(qcard: models, the default)")
    pretrained: bool = Field(False, description="use the library's own pretrained loader (needs network/cache)")
    input_shape: Optional[Tuple[int, int, int]] = Field(None, description="C,H,W; default from the model or dataset")
    num_classes: Optional[int] = Field(None, ge=1)
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the constructor")
    label: Optional[str] = Field(None, description="short display name on cards")
    # path keys as the config wrote them (before resolving against base_dir): what the point id hashes
    _written: Dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _label(cls, label: Optional[str]) -> Optional[str]:
        return _check_label(label)

    @field_validator("ref")
    @classmethod
    def _check_ref(cls, ref: str) -> str:
        source, sep, name = ref.partition(":")
        if not sep or not name:
            raise ValueError(f"model reference '{ref}' needs a source prefix, one of "
                             f"{', '.join(s + ':' for s in MODEL_SOURCES)} (e.g. 'qcard:resnet8', 'torchvision:{ref}')")
        if source not in MODEL_SOURCES:
            raise ValueError(f"unknown model source '{source}'{did_you_mean(source, MODEL_SOURCES)}; "
                             f"allowed: {', '.join(MODEL_SOURCES)}")
        return ref

    @field_validator("kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        reserved = sorted(set(kwargs) & {"weights", "pretrained", "num_classes", "in_chans"})
        if reserved:
            raise ValueError(f"give {', '.join(reserved)} as the model's own key(s), not inside 'kwargs'")
        return kwargs

    @property
    def short(self) -> str:
        return self.label or self.ref.split(":")[-1]


class CalibrationSpec(Strict):
    size: Union[int, List[int]] = Field(256, description="number of training images (a list sweeps)")
    seed: Union[int, List[int]] = Field(0, description="seed of the random calibration subset (a list sweeps)")
    split: Literal["train"] = "train"

    @field_validator("size")
    @classmethod
    def _positive(cls, v):
        for s in v if isinstance(v, list) else [v]:
            if s < 1:
                raise ValueError("calibration size must be at least 1")
        return v


class DatasetSpec(Strict):
    ref: str = Field(description=" | ".join(DATASET_SOURCES))
    eval_split: str = "test"
    eval_size: Optional[int] = Field(None, ge=1, description="evaluate on N images (default: all)")
    eval_subset: Optional[Literal["first", "stratified"]] = Field(
        None, description="which N images: first, or a seeded class-stratified sample (default: stratified for "
                          "imagefolder, whose files are sorted by class; first for the others)")
    class_map: Optional[Literal["imagenet"]] = Field(
        None, description="imagefolder only: folder names are ImageNet wnids, scored as ImageNet-1k classes")
    batch_size: int = Field(256, ge=1)
    num_workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = Field(
        "auto", description="data-loader worker processes; auto: min(cores - 1, 8) for data decoded per item "
                            "(image folders, CIFAR), 0 for data held in memory (qcard:mnist5k, digits, synthetic)")
    root: Optional[str] = None
    download: bool = False
    input_shape: Optional[Tuple[int, int, int]] = Field(None, description="synthetic only: C,H,W")
    num_classes: Optional[int] = Field(None, ge=1, description="synthetic only")
    size: Optional[int] = Field(None, ge=1, description="synthetic only: images per split")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    _written: Dict[str, Any] = PrivateAttr(default_factory=dict)     # as in ModelSpec

    @field_validator("ref")
    @classmethod
    def _check_ref(cls, ref: str) -> str:
        known = [r for r in DATASETS if r != "imagefolder:PATH"]
        if ref in known or ref.startswith("imagefolder:"):
            return ref
        raise ValueError(f"unknown dataset '{ref}'{did_you_mean(ref, known)}; allowed: {', '.join(DATASET_SOURCES)}")


class DeploySpec(Strict):
    """After the simulation, export the quantized model (ONNX QDQ) and run it on a real integer runtime."""
    runtime: Literal["onnxruntime"] = "onnxruntime"
    threads: int = Field(1, ge=1, description="intra-op threads of the runtime (latency is measured with them)")
    batch_sizes: List[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 32], min_length=1,
                                                           description="latency is measured at each")
    latency_runs: int = Field(20, ge=1, description="timed runs per batch size (the median is reported)")
    opset: Optional[int] = Field(None, ge=13, le=23, description="ONNX opset (default: 13; 21 with int4_weights)")
    int4_weights: bool = Field(False, description="store weights of <= 4 bits as int4 (opset >= 21); onnxruntime "
                               "then runs those layers in float, and the card says so. Default: int8 containers "
                               "holding the 4-bit values, run on integer kernels")
    latency_budget_s: float = Field(5.0, gt=0, description="per batch size: after latency_runs timed runs, runs "
                                    "go on until their spread is small or this many seconds have passed")

    @model_validator(mode="after")
    def _int4_opset(self):
        if self.int4_weights and self.opset is not None and self.opset < 21:
            raise ValueError(f"int4_weights needs opset 21 or later (int4 is an ONNX type from opset 21); "
                             f"opset is {self.opset}")
        return self

    def canonical(self) -> Dict[str, Any]:
        """The block as the point id hashes it: fields added later count only when set, so older ids stay."""
        return {k: v for k, v in self.model_dump(mode="json").items()
                if not (k in _DEPLOY_LATER and v == _DEPLOY_LATER[k])}


# DeploySpec fields added after deploy blocks were in use, with their defaults (left out of the id there)
_DEPLOY_LATER = {"int4_weights": False, "latency_budget_s": 5.0}


class ResourcesSpec(Strict):
    """What one point needs from an executor that places points on machines (--executor ray)."""
    cpus_per_point: float = Field(1.0, gt=0)
    gpus_per_point: float = Field(0.0, ge=0, description="> 0: the point runs with device cuda where it is placed")


class CheckpointSpec(Strict):
    """Checkpoints inside a point (the training methods qat, marvin, fp32_train and the reconstruction steps
    adaround, brecq, qdrop): a rerun of a point that
    was killed resumes from its last checkpoint and ends with the card an uninterrupted run writes. Not
    part of the point ids (it changes no result)."""
    enabled: bool = Field(True, description="false: keep no checkpoints (a killed point restarts from step 0)")
    every_steps: Optional[int] = Field(None, ge=1, description="save after every N optimizer steps")
    every_minutes: Optional[float] = Field(10.0, gt=0, description="save when N minutes have passed since the "
                                           "last save (the last step is always saved)")
    keep: bool = Field(False, description="keep the checkpoints once the point's card is written (default: "
                                          "removed then; a failed point keeps them for its rerun)")


class MethodSpec(Strict):
    name: str = Field(description="a registered method (qcard methods) or a user's 'pkg.module:Class'")
    label: Optional[str] = None
    params: Dict[str, Any] = Field(default_factory=dict, description="the method's Params; a list sweeps a scalar field")
    deploy: Optional[DeploySpec] = Field(None, description="deploy check for this method's points "
                                                           "(overrides the experiment's deploy block)")

    @field_validator("label")
    @classmethod
    def _label(cls, label: Optional[str]) -> Optional[str]:
        return _check_label(label)


class CostSpec(Strict):
    profiles: List[str] = Field(default_factory=lambda: ["bitops", "asic45"])
    input_shape: Optional[Tuple[int, int, int]] = None


class ExperimentConfig(Strict):
    experiment: str = Field(description="name; also the output folder",
                            json_schema_extra={"pattern": NAME_PATTERN, "maxLength": MAX_NAME})
    description: str = ""
    seeds: List[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="each point runs once per seed; cards show mean ± std")
    out: str = Field("runs", description="output root; points go to OUT/EXPERIMENT/. Written in the config, a "
                                         "relative path is relative to the config's folder (base_dir); left out, "
                                         "runs/ in the current folder; `qcard run --out` is relative to the "
                                         "current folder")
    base_dir: Optional[str] = Field(None, description="the folder relative paths (weights, image folders, dataset "
                                                      "root, out) resolve against; default: the config file's "
                                                      "folder. Not part of the point ids")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    deterministic: bool = True
    models: List[ModelSpec] = Field(min_length=1)
    dataset: DatasetSpec
    methods: List[MethodSpec] = Field(min_length=1)
    cost: CostSpec = Field(default_factory=CostSpec)
    deploy: Optional[DeploySpec] = Field(None, description="deploy check for every point (a method may override it)")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)

    @field_validator("experiment")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not re.match(NAME_PATTERN, name):
            bad = sorted(set(c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))))
            why = (f"it contains {', '.join(repr(c) for c in bad)}" if bad else
                   "it must start with a letter or digit" if name else "it is empty")
            raise ValueError(f"experiment name '{name}' is not allowed: {why}. The name is also the output "
                             "folder, so use letters, digits, '_', '.' and '-', starting with a letter or digit "
                             "(e.g. 'resnet8-w4a8')")
        if len(name) > MAX_NAME:
            raise ValueError(f"experiment name is {len(name)} characters long; at most {MAX_NAME} "
                             "(it is also the output folder's name)")
        return name

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data):
        # `seed: 3` for `seeds: [3]`; a bare string for a model or method
        if isinstance(data, dict):
            data = dict(data)
            if "seed" in data:
                if "seeds" in data:
                    raise ValueError("give either 'seed' or 'seeds', not both")
                seed = data.pop("seed")
                data["seeds"] = seed if isinstance(seed, list) else [seed]
            for key, field_name in (("models", "ref"), ("methods", "name")):
                if isinstance(data.get(key), list):
                    data[key] = [{field_name: v} if isinstance(v, str) else v for v in data[key]]
            if isinstance(data.get("dataset"), str):
                data["dataset"] = {"ref": data["dataset"]}
        return data


# ---------------------------------------------------------------- points

@dataclass
class Point:
    experiment: str
    model: ModelSpec
    dataset: DatasetSpec          # calibration size/seed resolved to single values
    method: str
    method_label: str
    params: Any                   # the method's validated Params instance
    seeds: List[int]
    cost: CostSpec
    device: str
    deterministic: bool
    id: str = ""
    index: int = 0                # position in the config's order (models × methods × sweeps)
    given: Tuple[str, ...] = ()   # the param keys the config sets, in its order
    swept: Tuple[str, ...] = ()   # the keys with several values in the config (calibration.size/seed too)
    raw_params: Dict[str, Any] = field(default_factory=dict)   # this point's params as the config gives them
    deploy: Optional[DeploySpec] = None
    description: str = ""
    base_dir: Optional[str] = None    # the absolute folder the config's relative paths resolved against
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)   # not in the id: it changes no result

    def canonical(self) -> Dict[str, Any]:
        """Everything that determines the results, defaults expanded, in a stable form."""
        # the deploy check adds to the card, so it counts, but only when asked (older ids stay)
        deploy = {"deploy": self.deploy.canonical()} if self.deploy is not None else {}
        return {**deploy, **self._canonical()}

    def as_config(self) -> Dict[str, Any]:
        """A config of this point alone: loading it gives one point with this id (what `qcard verify` reruns),
        from any folder. Paths are as the config wrote them, with base_dir the absolute folder they resolve
        against (so the id, which hashes the written paths, stays the same)."""
        method = {"name": self.method, "label": self.method_label, "params": dict(self.raw_params)}
        if self.deploy is not None:
            method["deploy"] = self.deploy.model_dump(mode="json")
        base = {"base_dir": self.base_dir} if self.base_dir and (self.model._written or self.dataset._written) else {}
        ckpt = self.checkpoint.model_dump(mode="json", exclude_defaults=True)
        base.update({"checkpoint": ckpt} if ckpt else {})
        return {
            "experiment": self.experiment, "description": self.description, "seeds": list(self.seeds),
            "device": self.device, "deterministic": self.deterministic, **base,
            "models": [{**self.model.model_dump(mode="json", exclude_none=True), **self.model._written}],
            "dataset": {**self.dataset.model_dump(mode="json", exclude_none=True), **self.dataset._written},
            "methods": [method], "cost": self.cost.model_dump(mode="json", exclude_none=True),
        }

    def _canonical(self) -> Dict[str, Any]:
        return {
            "experiment": self.experiment,
            # paths as the config wrote them: the id does not change with the folder a config is run from
            "model": {**self.model.model_dump(mode="json", exclude={"label"}), **self.model._written},
            # keys added later count only when set, so the points of older configs keep their ids
            "dataset": {**self.dataset.model_dump(mode="json", exclude={"num_workers", "batch_size"}
                                                  | {k for k in ("eval_subset", "class_map")
                                                     if getattr(self.dataset, k) is None}),
                        **self.dataset._written},
            "method": {"name": self.method, "params": self.params.model_dump(mode="json")},
            "seeds": list(self.seeds),
            "cost": self.cost.model_dump(mode="json"),
            "deterministic": self.deterministic,
        }

    @property
    def folder(self) -> str:
        # letters and digits of any script are kept ("émoji" stays "émoji"; NFC, so one spelling is one folder)
        name = unicodedata.normalize("NFC", f"{self.model.short}__{self.method_label}")
        safe = re.sub(r"[^\w.-]+", "-", name)
        return f"{safe}__{self.id[:10]}"

    def values(self, keys) -> str:
        """'k=v, ...' for these keys as this point runs them (a default-valued key is shown too)."""
        params = self.params.model_dump(mode="json")
        cal = self.dataset.calibration
        known = {**params, "calibration.size": cal.size, "calibration.seed": cal.seed}
        return ", ".join(f"{k}={known[k]}" for k in keys if k in known)

    def describe(self) -> str:
        # the keys the config sets, not the values the method derives from them (e.g. a pipeline's steps)
        cal = self.dataset.calibration
        return (f"{self.id[:10]}  {self.model.ref:<28} {self.method_label:<14} {self.values(self.given)}  "
                f"(calibration {cal.size}/seed {cal.seed})")


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Experiment:
    config: ExperimentConfig
    source: str = "<dict>"
    path: Optional[Path] = None
    config_sha256: str = ""
    lines: Dict[KeyPath, int] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)   # found at load time; the CLI and the runner print them
    base_dir: Optional[str] = None      # absolute: what relative paths in the config resolve against
    _points: Optional[List[Point]] = None

    @property
    def name(self) -> str:
        return self.config.experiment

    def out_dir(self, override: Optional[str] = None) -> Path:
        """OUT/EXPERIMENT, absolute. --out (override) is relative to the current folder, as a flag is; an
        `out:` written in the config is relative to base_dir, like every other path in it; without either,
        runs/ in the current folder."""
        if override:
            root = Path(override).expanduser()
        elif "out" in self.config.model_fields_set:
            root = Path(self.config.out).expanduser()
            if not root.is_absolute() and self.base_dir:
                root = Path(self.base_dir) / root
        else:
            root = Path(self.config.out)
        return Path(os.path.abspath(root)) / self.config.experiment

    def points(self) -> List[Point]:
        if self._points is None:
            self._points = expand(self)
        return self._points

    def where(self, path: KeyPath) -> str:
        line = _nearest_line(self.lines, path)
        return f"{self.source}:{line}" if line else self.source

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {format_path(path)}: {message}")


def _nearest_line(lines: Dict[KeyPath, int], path: KeyPath) -> Optional[int]:
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in lines:
            return lines[tuple(path[:n])]
    return None


def _accepts_list(annotation: Any) -> bool:
    """True when a field's declared type itself takes a list (then a list is a value, not a sweep)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset, List, Tuple):
        return True
    if origin is Union or origin is types.UnionType:
        return any(_accepts_list(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _accepts_list(typing.get_args(annotation)[0])
    return annotation in (list, tuple)


def _nested_model(annotation: Any):
    """The pydantic model a field holds (also inside Optional[...]), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _sweep_axes(params_cls, params: Dict[str, Any]) -> List[Tuple[str, List[Any]]]:
    axes = []
    for key, value in params.items():
        info = params_cls.model_fields.get(key)
        nested = _nested_model(info.annotation) if info is not None and isinstance(value, dict) else None
        if nested is not None:
            # a nested block (e.g. train:) sweeps the same way: its grid becomes this key's values
            sub = _sweep_axes(nested, value)
            names = [k for k, _ in sub]
            axes.append((key, [dict(zip(names, c)) for c in itertools.product(*[v for _, v in sub])]))
        elif info is None or not isinstance(value, list):
            axes.append((key, [value]))  # unknown keys are reported by validation below
        elif _accepts_list(info.annotation):
            is_grid = bool(value) and all(isinstance(v, list) for v in value)
            axes.append((key, value if is_grid else [value]))
        else:
            if not value:
                axes.append((key, [value]))  # let validation say an empty list is not a value
            else:
                axes.append((key, value))
    return axes


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def expand(exp: Experiment) -> List[Point]:
    """The grid: models × methods × swept params × calibration sizes/seeds. Validates every point's params."""
    from .methods import resolve_method

    cfg = exp.config
    points: List[Point] = []
    seen: Dict[str, Point] = {}
    cal = cfg.dataset.calibration
    cal_grid = list(itertools.product(_as_list(cal.size), _as_list(cal.seed)))
    for mi, mspec in enumerate(cfg.methods):
        try:
            method_cls = resolve_method(mspec.name)
        except QcardError as exc:
            raise exp.error(("methods", mi, "name"), str(exc)) from None
        axes = _sweep_axes(method_cls.Params, mspec.params)
        keys = [k for k, _ in axes]
        swept = tuple(k for k, vals in axes if len(vals) > 1) + tuple(
            f"calibration.{k}" for k in ("size", "seed") if len(_as_list(getattr(cal, k))) > 1)
        for combo in itertools.product(*[vals for _, vals in axes]):
            raw = dict(zip(keys, combo))
            loose = _loose_scalars(method_cls.Params, raw, ("methods", mi, "params"))
            if loose:
                raise ConfigError("\n".join(f"{exp.where(path)}: {format_path(path)}: {msg}" for path, msg in loose))
            try:
                params = method_cls.Params.model_validate(raw)
            except ValidationError as exc:
                raise _params_error(exp, exc, ("methods", mi, "params"), method_cls) from None
            for model in cfg.models:
                for size, seed in cal_grid:
                    dataset = cfg.dataset.model_copy(update={
                        "calibration": CalibrationSpec(size=size, seed=seed, split=cal.split)})
                    label = mspec.label or (method_cls.name or mspec.name.split(":")[-1])
                    point = Point(experiment=cfg.experiment, model=model, dataset=dataset, method=mspec.name,
                                  method_label=label, params=params, seeds=list(cfg.seeds), cost=cfg.cost,
                                  device=cfg.device, deterministic=cfg.deterministic,
                                  given=tuple(keys), swept=swept, raw_params=raw,
                                  deploy=mspec.deploy if mspec.deploy is not None else cfg.deploy,
                                  description=cfg.description, base_dir=exp.base_dir, checkpoint=cfg.checkpoint)
                    point.id = canonical_hash(point.canonical())
                    if point.id in seen:
                        # the same point listed twice (e.g. a sweep value repeated) runs once
                        first = seen[point.id]
                        if first.method_label != label:
                            exp.warnings.append(
                                f"{exp.where(('methods', mi))}: methods '{first.method_label}' and '{label}' have "
                                f"the same settings, so they are one point ({point.id[:10]}) with one card, "
                                f"labelled '{first.method_label}'; change a param or remove one of them")
                        continue
                    if len(point.folder.encode("utf-8")) > MAX_FOLDER:
                        raise exp.error(("methods", mi, "label"), f"the point folder '{point.folder}' is "
                                        f"{len(point.folder.encode('utf-8'))} bytes long; at most {MAX_FOLDER}: "
                                        f"shorten the model or method label")
                    seen[point.id] = point
                    point.index = len(points)
                    points.append(point)
    return points


MAX_FOLDER = 240    # bytes (UTF-8) of a point folder, MODEL__LABEL__id: below the 255 bytes of a file name

_SCALARS = (bool, int, float)


def _scalar_types(annotation: Any) -> Optional[set]:
    """The scalar types (bool, int, float) a field takes when it takes nothing but those and None;
    None for any other field (strings, literals, lists, models), which pydantic checks as it is."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    found = set()
    for a in args:
        if typing.get_origin(a) is typing.Annotated:
            a = typing.get_args(a)[0]
        if a is type(None):
            continue
        if a not in _SCALARS:
            return None
        found.add(a)
    return found or None


def _loose_scalars(params_cls, raw: Dict[str, Any], base: KeyPath) -> List[Tuple[KeyPath, str]]:
    """(path, message) for values pydantic's lax mode would coerce: 'yes' or 1 for a bool, true or
    '4' for a number. YAML gives real booleans and numbers, so these are mistakes, not spellings."""
    problems = []
    for key, value in raw.items():
        info = params_cls.model_fields.get(key)
        if info is None:
            continue
        nested = _nested_model(info.annotation)
        if nested is not None and isinstance(value, dict):
            problems += _loose_scalars(nested, value, base + (key,))
            continue
        kinds = _scalar_types(info.annotation)
        if kinds is None or value is None:
            continue
        if bool in kinds and not isinstance(value, bool):
            if kinds == {bool}:
                problems.append((base + (key,), f"expects true or false, got {value!r}"))
        elif bool not in kinds and (isinstance(value, bool) or not isinstance(value, (int, float))):
            want = "an integer" if kinds == {int} else "a number"
            hint = " (a YAML true/false is not a number)" if isinstance(value, bool) else \
                " (write it without quotes)" if isinstance(value, str) else ""
            problems.append((base + (key,), f"expects {want}, got {value!r}{hint}"))
    return problems


def _params_error(exp: Experiment, exc: ValidationError, base: KeyPath, method_cls) -> ConfigError:
    messages = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        path = base + loc
        messages.append(_describe_error(exp, err, path, method_cls.Params, loc))
    return ConfigError("\n".join(messages))


def _describe_error(exp: Experiment, err: dict, path: KeyPath, model_cls, loc: tuple) -> str:
    kind = err.get("type", "")
    value = err.get("input")
    line = _nearest_line(exp.lines, path)
    where = f"{exp.source}:{line}" if line else exp.source
    if kind == "extra_forbidden":
        owner = _model_at(model_cls, loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        key = str(loc[-1])
        msg = f"unknown key '{key}'{did_you_mean(key, allowed)}"
        if allowed:
            msg += f"; allowed keys: {', '.join(allowed)}"
    else:
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        ctx = err.get("ctx") or {}
        expected = ctx.get("expected")
        if kind == "literal_error" and expected:
            choices = re.findall(r"'([^']*)'", expected)
            msg = f"'{value}' is not allowed{did_you_mean(value, choices)}; allowed values: {expected}"
        elif kind != "missing" and value is not None and not isinstance(value, (dict, list)):
            msg += f" (got {value!r})"
    return f"{where}: {format_path(path)}: {msg}"


def _model_at(model_cls, loc: tuple):
    cls = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        info = getattr(cls, "model_fields", {}).get(part)
        if info is None:
            return None
        ann = info.annotation
        candidates = [ann] + list(typing.get_args(ann))
        nxt = None
        for c in candidates:
            for cc in [c] + list(typing.get_args(c)):
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        cls = nxt
    return cls


# ---------------------------------------------------------------- loading

def load_config(path: Union[str, os.PathLike], *, check_files: bool = True) -> Experiment:
    """Read, parse and validate a config file. Raises ConfigError naming the file, key path and fix."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a YAML config file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    data, lines = load_yaml(text, str(path))
    exp = config_from_dict(data, source=str(path), lines=lines, base_dir=path.parent.resolve(),
                           check_files=check_files)
    exp.path = path
    exp.config_sha256 = hashlib.sha256(raw).hexdigest()
    return exp


def config_from_dict(data: Any, *, source: str = "<dict>", lines: Optional[Dict[KeyPath, int]] = None,
                     base_dir: Optional[Path] = None, check_files: bool = True) -> Experiment:
    if data is None:
        raise ConfigError(f"{source}: the config is empty; it needs at least 'experiment', 'models', 'dataset', 'methods'")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (experiment, models, dataset, methods, ...), "
                          f"not a {type(data).__name__}")
    exp = Experiment(config=None, source=source, lines=lines or {})  # type: ignore[arg-type]
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        msgs = [_describe_error(exp, e, _shorthand_loc(data, tuple(e.get("loc", ()))), ExperimentConfig,
                                _strip_union_loc(tuple(e.get("loc", ()))))
                for e in exc.errors()]
        raise ConfigError("\n".join(msgs)) from None
    exp.config = cfg
    if cfg.base_dir is not None:           # the config's own base_dir (relative: to the config's folder)
        given = Path(cfg.base_dir).expanduser()
        base_dir = given if given.is_absolute() else Path(base_dir or os.getcwd()) / given
    if base_dir is not None:
        exp.base_dir = os.path.abspath(base_dir)
        _resolve_paths(exp, Path(exp.base_dir))
    if check_files:
        _check_references(exp)
    if exp.config_sha256 == "":
        exp.config_sha256 = canonical_hash(data)
    exp.points()  # validates each method's params now, before anything runs
    return exp


def _strip_union_loc(loc: tuple) -> tuple:
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "list"))))


def _shorthand_loc(data: dict, loc: tuple) -> tuple:
    loc = _strip_union_loc(loc)
    if loc and loc[0] == "seeds" and "seed" in data:
        return ("seed",) + loc[1:]
    return loc


_WEIGHT_WORDS = ("random", "bundled")    # weights: values that are not file paths


def _resolve_paths(exp: Experiment, base_dir: Path) -> None:
    """One rule: a relative path in the config (weights, imagefolder:PATH, dataset root) is relative to
    base_dir, the config file's folder unless the config sets base_dir. Resolved to absolute paths (what
    the run opens and the card records); the written values are kept for the point id."""
    cfg = exp.config

    def absolute(value: str) -> Optional[str]:
        p = Path(os.path.expanduser(value))
        return None if p.is_absolute() else os.path.normpath(base_dir / p)

    for m in cfg.models:
        if m.weights and m.weights not in _WEIGHT_WORDS:
            resolved = absolute(m.weights)
            if resolved is not None:
                m._written["weights"] = m.weights
                m.weights = resolved
    ds = cfg.dataset
    if ds.ref.startswith("imagefolder:"):
        resolved = absolute(ds.ref[len("imagefolder:"):])
        if resolved is not None:
            ds._written["ref"] = ds.ref
            ds.ref = "imagefolder:" + resolved
    if ds.root:
        resolved = absolute(ds.root)
        if resolved is not None:
            ds._written["root"] = ds.root
            ds.root = resolved


def _relative_hint(exp: Experiment, written: Optional[str]) -> str:
    """For a relative path that is not where the rule puts it but is in the current folder: say so."""
    if not written or not exp.base_dir or Path(os.path.expanduser(written)).is_absolute():
        return ""
    hint = f" (relative paths in a config are relative to its folder, {exp.base_dir}"
    if Path(written).exists():
        hint += f"; '{written}' exists in the current folder: write it as {os.path.abspath(written)}"
    return hint + ")"


def _check_references(exp: Experiment) -> None:
    """Cheap checks of names and files, so a typo fails before hours of work."""
    from .zoo.refs import check_model_ref
    cfg = exp.config
    for i, m in enumerate(cfg.models):
        try:
            check_model_ref(m.ref)
        except QcardError as exc:
            raise exp.error(("models", i, "ref"), str(exc)) from None
        if m.weights == "bundled" and not m.ref.startswith("qcard:"):
            raise exp.error(("models", i, "weights"), f"weights: bundled applies to qcard: models only, not '{m.ref}'")
        from .zoo.catalog import ARCHITECTURES
        if m.ref.startswith("qcard:") and m.ref[6:] in ARCHITECTURES and (m.weights == "bundled" or m.pretrained):
            raise exp.error(("models", i), f"{m.ref} ships as an architecture only (no bundled or pretrained "
                                           f"weights): train it from scratch, or give weights: PATH")
        if m.weights and m.weights not in _WEIGHT_WORDS and not Path(os.path.expanduser(m.weights)).is_file():
            raise exp.error(("models", i, "weights"), f"weights file not found: {m.weights} (or say 'random' / "
                                                      f"'bundled'){_relative_hint(exp, m._written.get('weights'))}")
        if m.weights and m.pretrained:
            raise exp.error(("models", i), "give either 'weights' or 'pretrained: true', not both")
        if m.ref.startswith("python:") and m.kwargs:
            _check_constructor_kwargs(exp, i, m)
    ref = cfg.dataset.ref
    if ref.startswith("imagefolder:"):
        folder = Path(os.path.expanduser(ref[len("imagefolder:"):]))
        if not folder.is_dir():
            written = cfg.dataset._written.get("ref", "")[len("imagefolder:"):]
            raise exp.error(("dataset", "ref"), f"image folder not found: {folder}{_relative_hint(exp, written)}")
    from .data.catalog import check_dataset_files
    try:
        check_dataset_files(ref, cfg.dataset.root, cfg.dataset.download)
    except QcardError as exc:
        raise exp.error(("dataset", "root"), str(exc)) from None
    if ref != "synthetic":
        for key in ("input_shape", "num_classes", "size"):
            if getattr(cfg.dataset, key) is not None:
                raise exp.error(("dataset", key), f"'{key}' applies to the synthetic dataset only")
    _check_data_sizes(exp)
    from .cost.profile import load_profile
    for i, name in enumerate(cfg.cost.profiles):
        try:
            load_profile(name)  # validates options and user files now, before anything runs
        except QcardError as exc:
            raise exp.error(("cost", "profiles", i), str(exc)) from None


def _check_constructor_kwargs(exp: Experiment, i: int, m: ModelSpec) -> None:
    """A misspelled keyword of a python: model's constructor fails now, not when the run builds it."""
    import inspect
    from .registry import import_object
    obj = import_object(m.ref[len("python:"):], "model constructor")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):          # builtins and some C callables have no signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in m.kwargs:
        if key not in allowed:
            raise exp.error(("models", i, "kwargs", key),
                            f"{m.ref} takes no argument '{key}'{did_you_mean(key, allowed)}; "
                            f"its arguments: {', '.join(allowed) or 'none'}")


def _check_data_sizes(exp: Experiment) -> None:
    """Cheap data checks before anything runs: eval_size is not larger than the evaluated split (known
    sizes of the fixed datasets; an image folder's files counted), and an image folder holds images in
    each split it serves. Lists files; decodes no image."""
    from .data.catalog import SPLIT_SIZES
    ds = exp.config.dataset
    if ds.ref in SPLIT_SIZES:
        n = SPLIT_SIZES[ds.ref].get(ds.eval_split)
        if ds.eval_size is not None and n is not None and ds.eval_size > n:
            raise exp.error(("dataset", "eval_size"), _too_large(ds, n))
    if not ds.ref.startswith("imagefolder:"):
        return
    from .data import load_dataset
    for split in dict.fromkeys([ds.eval_split, "train"]):
        try:
            data = load_dataset(ds.ref, split)
        except QcardError as exc:
            raise exp.error(("dataset", "ref"), str(exc)) from None
        if len(data) == 0:
            raise exp.error(("dataset", "ref"), f"{ds.ref}: split '{split}' holds no images")
        if split == ds.eval_split and ds.eval_size is not None and ds.eval_size > len(data):
            raise exp.error(("dataset", "eval_size"), _too_large(ds, len(data)))


def _too_large(ds: DatasetSpec, n: int) -> str:
    return (f"eval_size {ds.eval_size} is larger than the '{ds.eval_split}' split of {ds.ref} ({n} images); "
            f"use at most {n}, or leave eval_size out to evaluate on all of them")


def config_json_schema() -> Dict[str, Any]:
    schema = ExperimentConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qcard experiment config"
    return schema
