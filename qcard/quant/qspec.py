"""QSpec: what one quantizer does, as plain data (no torch import).

A QSpec describes a uniform affine grid x̂ = s·(clamp(⌊x/s⌉ + z, q_min, q_max) − z):
how many bits, whether the integer grid is signed, whether z is forced to 0 (symmetric),
which elements share a scale (granularity), how the scale may be stored and how values round.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["per_tensor", "per_channel", "per_group"]
ActGranularity = Literal["per_tensor", "per_channel"]
ScaleFormat = Literal["float", "power_of_two"]
Rounding = Literal["nearest", "stochastic"]


# how the enum values read in prose and tables (cards, compare, messages); JSON keeps the values themselves
_TEXT = {"per_tensor": "per-tensor", "per_channel": "per-channel", "per_group": "per-group",
         "power_of_two": "power-of-two"}


def value_text(value: str) -> str:
    """The one human spelling of a scheme value: 'per_channel' -> 'per-channel', other underscores -> spaces."""
    return _TEXT.get(value, value.replace("_", " "))


def granularity_text(value: Optional[str]) -> str:
    """The one human spelling of a granularity ('per-channel'); JSON keeps the enum value."""
    return value_text(value) if value is not None else "none"


def group_size_problem(granularity: str, group_size: Optional[int], granularity_key: str = "granularity",
                       size_key: str = "group_size") -> Optional[str]:
    """The one rule on group sizes: per_group needs one, every other granularity takes none. Returns
    what is wrong (in the caller's key names), or None."""
    if granularity == "per_group" and group_size is None:
        return f"{granularity_key}: per_group needs {size_key} (elements per group, e.g. 32)"
    if granularity != "per_group" and group_size is not None:
        return f"{size_key} is only used with {granularity_key}: per_group, not {granularity}"
    return None


class QSpec(BaseModel):
    """One quantizer's scheme. Immutable; make a changed copy with `spec.model_copy(update={...})`.

    granularity:
      per_tensor  one (scale, zero point) for the whole tensor;
      per_channel one per index of `axis` (output channels of a weight: axis 0, or 1 for
                  transposed convolutions);
      per_group   each channel (index of `axis`) is split into consecutive groups of `group_size`
                  elements of its flattened remaining dims (the input-channel/kernel elements of a
                  weight row), one (scale, zero point) per group; a short last group is allowed.
    """
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=2, le=16)
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "per_tensor"
    axis: int = 0
    group_size: Optional[int] = Field(None, ge=1)
    scale_format: ScaleFormat = "float"
    rounding: Rounding = "nearest"

    @model_validator(mode="after")
    def _check(self) -> "QSpec":
        problem = group_size_problem(self.granularity, self.group_size)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def qrange(self) -> Tuple[int, int]:
        return self.qmin, self.qmax

    def describe(self) -> str:
        """Short human string, e.g. 'int8 per_channel sym' or 'uint4 per_tensor asym pow2'."""
        kind = ("int" if self.signed else "uint") + str(self.bits)
        gran = self.granularity + (f"({self.group_size})" if self.group_size else "")
        parts = [kind, gran, "sym" if self.symmetric else "asym"]
        if self.scale_format == "power_of_two":
            parts.append("pow2")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return " ".join(parts)
