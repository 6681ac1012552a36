"""The sparq method's parameters (plain scalars, so a config can sweep any of them) and its error."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from ...errors import QcardError
from ..base import MethodParams
from .kernels import DEFAULT_OPTIONS, resolve_setting

Variant = Literal["sparq", "bsparq", "vsparq", "a2", "a3", "a4", "a8"]
PLAIN_BITS = {"a2": 2, "a3": 3, "a4": 4, "a8": 8}
WINDOW_VARIANTS = ("sparq", "bsparq", "vsparq")
PAPER_CAL_BATCH = 128          # the reference code: 17 batches of 128 (~2,048 images)


class SparqError(QcardError):
    """A model SPARQ cannot handle as asked (e.g. negative activations where SPARQ is applied)."""


class SparqParams(MethodParams):
    """Parameters of the sparq method (plain scalars, so a config can sweep any of them)."""
    variant: Variant = Field(
        "sparq", description="sparq: vSPARQ pairs + bSPARQ windows (the paper); bsparq: windows only; "
                             "vsparq: the vSPARQ-only ablation (fixed 7:4 window); a4 (a3, a2): plain "
                             "4-bit (3-, 2-bit) activations on the grid 2^(8-n)*dx, the baseline with the "
                             "same calibration; a8: the 8-bit base model itself")
    bits: Literal[4, 3, 2] = Field(4, description="window bits n (sparq/bsparq); set by the variant for "
                                                   "a2/a3/a4; ignored for a8")
    options: Optional[Literal[5, 3, 2, 6, 7]] = Field(
        None, description="window placements: 5/3/2 for bits=4 (5opt default); 6 for bits=3; 7 for bits=2")
    rounding: Literal["round", "raw"] = Field("round", description="window rounding: half to even "
                                              "(saturating) or truncation")
    base: Literal["paper", "qcard"] = Field("paper", description="paper: the reference 8-bit model; "
                                            "qcard: BN folded, 127-divisor weights, min-max ranges")
    negatives: Literal["error", "exclude"] = Field(
        "error", description="negative inputs of a SPARQ layer: error (the reference raises) or exclude "
                             "(that layer runs at plain signed 8-bit, recorded on the card)")
    bn_recalibration: bool = Field(True, description="paper base: repeat the BN pass with SPARQ on")
    bn_stats: Literal["cumulative", "ema"] = Field(
        "cumulative", description="BN running statistics in the calibration passes: cumulative = reset "
                                  "and average over the calibration batches (momentum=None); ema = the "
                                  "reference's train-mode update (each BN's own momentum, from the trained stats)")
    activation_range: Optional[Literal["max_mean", "minmax", "percentile"]] = Field(
        None, description="activation range; default max_mean (paper) or minmax (qcard)")
    percentile: float = Field(99.99, gt=50, le=100, description="for activation_range=percentile")
    hidden_linear: Literal["sparq", "fp32"] = Field("sparq", description="Linear layers other than the last")
    first_last: Optional[Literal["fp32", "int8"]] = Field(
        None, description="first and last MAC layer: fp32 (paper default) or plain 8-bit (qcard default)")
    calibration_batch_size: int = Field(PAPER_CAL_BATCH, ge=1, description="images per calibration batch")
    stats_size: int = Field(512, ge=1, description="calibration images in the statistics pass")

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other fields, resolved before validation so the card shows them."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        variant, base = data.get("variant", "sparq"), data.get("base", "paper")
        if variant in ("a2", "a3", "a4") and "bits" not in data:
            data["bits"] = PLAIN_BITS[variant]
        bits = data.get("bits", 4)
        if variant in ("sparq", "bsparq") and data.get("options") is None and bits in DEFAULT_OPTIONS:
            data["options"] = DEFAULT_OPTIONS[bits]
        if data.get("activation_range") is None:
            data["activation_range"] = "max_mean" if base == "paper" else "minmax"
        if data.get("first_last") is None:
            data["first_last"] = "fp32" if base == "paper" else "int8"
        return data

    @model_validator(mode="after")
    def _check(self) -> "SparqParams":
        v = self.variant
        if v == "vsparq" or v in PLAIN_BITS:
            if self.options is not None:
                raise ValueError(f"options choose window placements of sparq/bsparq; variant '{v}' has none "
                                 f"(leave options out)")
            if v == "vsparq" and self.bits != 4:
                raise ValueError(f"variant 'vsparq' uses a fixed 4-bit window (7:4); bits must be 4 (got {self.bits})")
            if v in ("a2", "a3", "a4") and self.bits != PLAIN_BITS[v]:
                raise ValueError(f"variant '{v}' is {PLAIN_BITS[v]}-bit by definition; leave bits out "
                                 f"(got bits={self.bits})")
            if v in PLAIN_BITS and self.rounding != "round":
                raise ValueError(f"rounding chooses how SPARQ windows round; variant '{v}' uses plain "
                                 f"round-to-nearest (leave rounding out)")
        else:
            try:
                resolve_setting(v, self.bits, self.options, self.rounding)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return self
