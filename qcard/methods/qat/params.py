"""The qat method's Params: the shared scheme (quant.scheme.SchemeParams) plus the training switches.

The ranges are initialized by the ptq method's engine: `ptq_params()` is the PTQParams of that
initialization, a new validated object built from these Params (the scheme's fields as given).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from ...quant.scheme import BiasCorrection, SchemeParams, apply_preset, field_default
from ...training import TrainRecipe
from ..base import MethodParams

__all__ = ["QATParams", "QAT_RECIPE"]

# a short fine-tuning recipe (white paper: Adam, no weight decay on ranges; fewer epochs here)
QAT_RECIPE = dict(epochs=2, batch_size=64, optimizer="adam", lr=1e-4, momentum=0.9, weight_decay=0.0,
                  schedule="cosine")
# what the deployed model has for each BN handling (BN kept during training is internal)
_DEPLOYED_BN = {"static_fold": "folded", "keep_then_fold": "folded", "kept": "kept"}


class QATParams(SchemeParams, MethodParams):
    w_bits: int = Field(8, ge=2, le=16, description="weight bits")
    # QAT
    estimator: Literal["lsq", "ste"] = "lsq"
    lsq_grad_scale: bool = False
    # off by default: the input's range is fixed by the data's normalization, and learning it makes the
    # first layer compute a gradient for the whole input batch (on ResNet-18 ~20 % of a training step)
    learn_input_grid: bool = False
    pact: bool = False
    bn: Literal["auto", "static_fold", "keep_then_fold", "kept"] = "auto"
    init_range: Literal["auto", "mse", "minmax"] = "auto"
    cle: bool = False
    bias_absorption: bool = True
    bias_correction: Literal["none", BiasCorrection] = "none"
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(**QAT_RECIPE))

    _init: Any = PrivateAttr(default=None)

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_qat_recipe(cls, value):
        # a partial train: block changes only what it names; the rest stays QAT's recipe, not the
        # generic training defaults (train: {lr: 1e-3} keeps Adam, 2 epochs, no weight decay)
        if isinstance(value, dict):
            return {**QAT_RECIPE, **value}
        return value

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        """On the raw dict: the preset's scheme, and bn: auto resolved (white paper: static_fold for
        per-tensor, keep_then_fold for per-channel weights; kept where the preset does not fold)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        bn = data.get("bn", "auto")
        view = {"bn": _DEPLOYED_BN[bn]} if bn in _DEPLOYED_BN else {}
        updates = apply_preset(cls, {k: v for k, v in data.items() if k != "bn"}, view=view)
        preset_bn = updates.pop("bn", None)
        data.update(updates)
        if bn == "auto":
            per_channel = data.get("w_granularity", field_default(cls, "w_granularity")) == "per_channel"
            data["bn"] = "kept" if preset_bn == "kept" else ("keep_then_fold" if per_channel else "static_fold")
        return data

    @model_validator(mode="after")
    def _check(self) -> "QATParams":
        errors: List[str] = []
        if self.pact and self.estimator == "lsq":
            errors.append("pact: true learns activation clips with estimator: ste; estimator: lsq already learns "
                          "every scale (use one or the other)")
        if self.pact and self.a_bits is None:
            errors.append("pact: true needs quantized activations (a_bits)")
        if self.estimator == "lsq" and self.scale_format == "power_of_two":
            errors.append(f"preset '{self.preset}' wants power-of-two scales, which LSQ does not learn; use "
                          "estimator: ste" if self.preset else
                          "estimator: lsq learns float scales; scale_format: power_of_two needs estimator: ste")
        if self.bn == "keep_then_fold" and self.w_granularity != "per_channel":
            errors.append(f"bn: keep_then_fold folds the batch norm scale into per-channel weight scales; "
                          f"w_granularity is {self.w_granularity}: use bn: static_fold (or auto)")
        if self.cle and self.bn != "static_fold":
            errors.append(f"cle needs the batch norms folded before training (bn: static_fold), not bn: {self.bn}")
        if not errors:
            try:
                self._init = self._build_init()
            except ValidationError as exc:
                errors.append(_messages(exc))
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def _build_init(self):
        from ..ptq.params import PTQParams
        kw: Dict[str, Any] = {k: getattr(self, k) for k in SchemeParams.model_fields if k in self.model_fields_set}
        kw.update(w_bits=self.w_bits, a_bits=self.a_bits, bn=_DEPLOYED_BN[self.bn])
        if "overrides" in kw:
            kw["overrides"] = [o.model_dump() for o in self.overrides]
        init = self.init_range
        steps = (["cle"] + (["bias_absorption"] if self.bias_absorption else []) if self.cle else []) + \
            ["weight_ranges"] + (["bias_correction"] if self.bias_correction != "none" else []) + \
            (["activation_ranges"] if self.a_bits is not None else [])
        if init == "auto":     # white paper: MSE ranges, min-max for per-channel weights
            init = "minmax" if self.w_granularity == "per_channel" else "mse"
        kw.update(pipeline="custom", steps=steps, weight_range=init,
                  activation_range="minmax" if self.init_range == "minmax" else "mse", logits_range="same",
                  bias_correction="analytic" if self.bias_correction == "analytic" else "empirical")
        if self.a_bits is None:
            kw["weight_only"] = True
        return PTQParams(**kw)

    def ptq_params(self):
        """The PTQParams this QAT run initializes its ranges with (and builds its simulated model from)."""
        if self._init is None:          # e.g. after model_copy: validate again
            self._init = type(self).model_validate(self.model_dump())._init
        return self._init


def _messages(exc: ValidationError) -> str:
    msgs = []
    for e in exc.errors():
        m = str(e.get("msg", ""))
        msgs.append(m[len("Value error, "):] if m.startswith("Value error, ") else m)
    return "; ".join(msgs)
