"""Hardware profiles: YAML data files validated with pydantic (unknown keys are errors).

A profile says which quantities it models: `energy` (a MAC energy law plus memory levels),
`latency` (a closed-form systolic array, a roofline, or a measured lookup table) and `speedup`
(from latency, or bit-weighted MACs when there is no hardware). A quantity it does not model is
reported as null. Every block names its `source`, a key of the profile's `sources` table, so every
number can be traced to a publication or datasheet.

Users add a profile by writing a YAML file and passing its path. Options can be changed on the fly:
"systolic-ws:pe_mode=sparq,rows=64" (keys of the latency block, the energy block, or the top level;
dotted paths such as "latency.sram_kb.ifmap=512" work too).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import QcardError, UnknownNameError

PROFILE_DIR = Path(__file__).with_name("profiles")
Traffic = Literal["operands", "partial_sums", "compulsory", "dram"]
Source = Union[str, List[str]]        # key(s) of the profile's `sources`


class ProfileError(QcardError):
    """A hardware profile file is malformed; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatMac(_Strict):
    mult: float = Field(ge=0)
    add: float = Field(ge=0)


class MacEnergy(_Strict):
    """E_mac(b_w, b_a) = mult·b_w·b_a/anchor_bits² + add·b_acc/anchor_bits (integer layers);
    float layers (bits None) use float_macs[32] when given, else the integer law at 32 bits."""
    anchor_bits: int = Field(gt=0)
    mult: float = Field(ge=0)
    add: float = Field(ge=0)
    accumulator_bits: int = Field(32, gt=0)
    float_macs: Dict[int, FloatMac] = {}
    source: Source


class MemLevel(_Strict):
    name: str
    energy: float = Field(ge=0)          # per access of access_bits
    access_bits: int = Field(gt=0)
    traffic: List[Traffic] = Field(min_length=1)
    source: Source


class Energy(_Strict):
    unit: str                           # "pJ", or a relative unit such as "MAC16"
    unit_description: str = ""
    mac: MacEnergy
    levels: List[MemLevel] = []


class SramKB(_Strict):
    ifmap: float = Field(256, gt=0)
    filter: float = Field(256, gt=0)
    ofmap: float = Field(128, gt=0)


class SystolicWS(_Strict):
    model: Literal["systolic_ws"]
    rows: int = Field(32, gt=0)
    cols: int = Field(32, gt=0)
    sram_kb: SramKB = SramKB()
    pe_mode: Literal["fixed8", "bit_scalable", "sparq"] = "fixed8"
    native_bits: int = Field(8, gt=0)
    scalable_bits: List[int] = [2, 4, 8]
    sparq_rate: float = Field(2.0, gt=0)
    clock_hz: Optional[float] = Field(None, gt=0)
    source: Source


class Peak(_Strict):
    name: str
    max_bits: int = Field(gt=0)        # used when max(b_w, b_a) <= max_bits
    tera_ops_per_s: float = Field(gt=0)


class Roofline(_Strict):
    model: Literal["roofline"]
    peaks: List[Peak] = Field(min_length=1)
    ops_per_mac: int = Field(2, gt=0)
    bandwidth_gb_s: float = Field(gt=0)
    clock_hz: float = Field(gt=0)
    caution: Optional[str] = None
    source: Source


class Lookup(_Strict):
    model: Literal["lookup"]
    macs_per_cycle: Dict[int, Dict[int, float]]     # [activation bits][weight bits]
    clock_hz: Optional[float] = Field(None, gt=0)
    source: Source

    @model_validator(mode="after")
    def _rectangular(self):
        wset = None
        for a, row in self.macs_per_cycle.items():
            if wset is None:
                wset = set(row)
            elif set(row) != wset:
                raise ValueError(f"macs_per_cycle row a{a} has weight bits {sorted(row)}, expected {sorted(wset)}")
            if any(v <= 0 for v in row.values()):
                raise ValueError(f"macs_per_cycle row a{a} has a non-positive entry")
        if not wset:
            raise ValueError("macs_per_cycle is empty")
        return self


Latency = Annotated[Union[SystolicWS, Roofline, Lookup], Field(discriminator="model")]


class Speedup(_Strict):
    definition: Literal["latency", "weight_bit_weighted_macs"]
    source: Source


class Profile(_Strict):
    name: str
    description: str
    sources: Dict[str, str] = Field(min_length=1)
    skips_zero_weights: bool = False
    energy: Optional[Energy] = None
    latency: Optional[Latency] = None
    speedup: Optional[Speedup] = None
    notes: List[str] = []
    path: Optional[str] = None           # where it was loaded from (set by load_profile)

    @model_validator(mode="after")
    def _check(self):
        blocks: List[tuple] = []
        if self.energy:
            blocks.append(("energy.mac.source", self.energy.mac.source))
            blocks += [(f"energy.levels[{i}].source", lv.source) for i, lv in enumerate(self.energy.levels)]
        if self.latency:
            blocks.append(("latency.source", self.latency.source))
        if self.speedup:
            blocks.append(("speedup.source", self.speedup.source))
            if self.speedup.definition == "latency" and self.latency is None:
                raise ValueError("speedup.definition 'latency' needs a latency block")
        for key, src in blocks:
            for one in ([src] if isinstance(src, str) else src):
                if one not in self.sources:
                    raise ValueError(f"{key} '{one}' is not a key of sources ({', '.join(sorted(self.sources))})")
        return self


def list_profiles() -> List[str]:
    """Names of the profiles shipped with qcard."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_summary(name: str) -> str:
    """One line saying what a shipped profile models: the first sentence of its description and what
    its speedup means (qcard profiles)."""
    import re
    prof = load_profile(name)
    first = re.split(r"(?<!\bal)\.\s+", " ".join(prof.description.split()))[0].rstrip(".")
    models = [w for w, on in (("energy", prof.energy), ("latency", prof.latency)) if on is not None]
    counts = "BOPs, size, traffic" + "".join(f", {m}" for m in models)
    short = {"weight_bit_weighted_macs": "weight-bit-weighted MACs", "latency": "latency ratio"}
    speed = f"; speedup = {short[prof.speedup.definition]}" if prof.speedup else "; no speedup"
    return f"{first} [{counts}{speed}]"


# what speedup_vs_fp32 means, by the profile's speedup.definition (qcard.cost.model computes it): said on
# the card and in compare's legend, so that equal speedups with different activation bits read right
SPEEDUP_WORDS = {
    "weight_bit_weighted_macs": "weight-bit-weighted MACs, Σ 32·MACs / Σ b_w·MACs (MARViN); activation bits do "
                                "not enter it, so W4A4 and W4A8 get the same speedup (BOPs = MACs·b_w·b_a count both)",
    "latency": "latency of the same layers at FP32 on the same profile ÷ this model's latency (cycles)",
}


def speedup_definition(cost: Dict[str, Any]) -> Optional[str]:
    """What a card's cost block means by speedup_vs_fp32, in words, read from the block itself (its
    speedup_baselines, written by the cost model from the profile); None where it has no speedup."""
    if not cost or cost.get("speedup_vs_fp32") is None:
        return None
    base = ((cost.get("speedup_baselines") or {}).get("fp32")) or {}
    said = str(base.get("definition") or "")
    if "b_w·MACs" in said:
        return SPEEDUP_WORDS["weight_bit_weighted_macs"]
    if "latency" in said:
        return f"latency ratio, cycles of {base['baseline']} ÷ this model's" if base.get("baseline") \
            else SPEEDUP_WORDS["latency"]
    if said:
        return said
    # a card written before the definition was recorded: its shipped profile's, by name
    return _profile_speedup_words(str(cost.get("profile")))


@functools.lru_cache(maxsize=64)
def _profile_speedup_words(name: str) -> str:
    """Read once per profile name: compare asks for every card of a thousand-card table."""
    try:
        prof = load_profile(name)
    except QcardError:
        return "not recorded on this card"
    return SPEEDUP_WORDS[prof.speedup.definition] if prof.speedup else "not recorded on this card"


def _format_error(path: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "tagged-union")))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        lines.append(f"{loc or '<top>'}: {msg}")
    return f"invalid hardware profile {path}: " + "; ".join(lines)


def _set_override(data: dict, key: str, value: Any, spec: str) -> None:
    if "." in key:
        parts = key.split(".")
    elif key in data or key in Profile.model_fields:
        parts = [key]
    elif isinstance(data.get("latency"), dict) and key in _latency_fields(data["latency"]):
        parts = ["latency", key]
    elif isinstance(data.get("energy"), dict) and key in Energy.model_fields:
        parts = ["energy", key]
    else:
        raise ProfileError(f"profile option '{key}' in '{spec}' is not a key of the profile, its latency "
                           f"block or its energy block")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ProfileError(f"profile option '{key}' in '{spec}': '{p}' is not a block of the profile")
        node = node[p]
    node[parts[-1]] = value


def _latency_fields(block: dict) -> Dict[str, Any]:
    cls = {"systolic_ws": SystolicWS, "roofline": Roofline, "lookup": Lookup}.get(block.get("model"))
    return cls.model_fields if cls else {}


def load_profile(name_or_path: Union[str, os.PathLike, Profile]) -> Profile:
    """Load a shipped profile by name ("asic45") or a user's YAML file by path, optionally with
    options after a colon ("systolic-ws:pe_mode=bit_scalable,rows=64"). Raises ProfileError
    (a QcardError) naming the file and key when the profile is malformed."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    spec = os.fspath(name_or_path)
    ref, options = spec, ""
    head, sep, tail = spec.rpartition(":")
    if sep and "=" in tail and head:
        ref, options = head, tail
    if ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ProfileError(f"hardware profile file not found: {path}")
    else:
        path = PROFILE_DIR / f"{ref}.yaml"
        if not path.is_file():
            raise UnknownNameError("hardware profile", ref, list_profiles(),
                                   hint="a profile of your own is given as the path of a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ProfileError(f"invalid hardware profile {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"invalid hardware profile {path}: the file must hold a mapping of keys")
    if "path" in data:
        raise ProfileError(f"invalid hardware profile {path}: path: unknown key (not allowed here)")
    for item in filter(None, options.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ProfileError(f"profile option '{item}' in '{spec}' is not of the form key=value")
        _set_override(data, key.strip(), yaml.safe_load(raw.strip()), spec)
    if options and isinstance(data.get("name"), str):
        data["name"] = f"{data['name']}:{options}"      # the variant is part of the profile's name
    data["path"] = str(path)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_error(str(path), exc)) from None
