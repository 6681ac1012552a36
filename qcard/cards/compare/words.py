"""Plain words for the values a comparison holds: bits, grids, BN and residual handling, intervals, p-values,
the cards' letters. Only the differences and the md/tex/html exports use them; rows, JSON and CSV keep the
card's own values (`per_channel`, booleans, numbers)."""
from __future__ import annotations

import math
from typing import Any, List, Optional

from ...quant.qspec import value_text

BN_WORDS = {"folded": "folded", "kept": "kept", "qat_static_fold": "statically folded (QAT)",
            "qat_keep_then_fold": "kept in QAT, then folded", "none": "absent"}
RESIDUAL_WORDS = {"quant_all": "quantized", "gemm_inputs_only": "unquantized",
                  "relu_only": "quantized only after ReLU", "not_present": "absent"}


def card_letter(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short names for the cards in the text."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def bits(v: Optional[float]) -> str:
    return "FP32" if v is None else f"{v:g}"


def bits_word(v: Optional[float]) -> str:
    return "FP32" if v is None else f"{v:g}-bit"


def edge(w: Optional[float], a: Optional[float]) -> str:
    """A first or last layer's bits: 'FP32', '8-bit', 'W4/A8'."""
    if w is None and a is None:
        return "FP32"
    if w == a:
        return bits_word(w)
    return f"W{bits(w)}/A{bits(a)}"


def words(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return value_text(v) if isinstance(v, str) else str(v)


def granularity_text(granularity: Any, group_size: Any = None) -> str:
    if granularity == "per_group":
        return f"per-group ({group_size})" if group_size else "per-group"
    return words(granularity)


def compact(v: Any) -> str:
    """A parameter value in few characters: lists and dicts without quotes."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(compact(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {compact(x)}" for k, x in v.items()) + "}"
    return str(v)


def show_groups(letters: List[str]) -> bool:
    """Name the cards behind each value unless there are just A and B (then 'x vs y' reads as A vs B)."""
    return letters != ["A", "B"]


def group_text(letters: List[str]) -> str:
    return ", ".join(letters) if len(letters) <= 5 else f"{len(letters)} cards"


def vs(vals: List[str], groups: List[str], show: bool) -> str:
    if show:
        return " vs ".join(f"{v} ({g})" for v, g in zip(vals, groups))
    return " vs ".join(vals)


def missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return type(v).__name__ == "NAType"      # pandas.NA in nullable integer columns


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def limit(v: float, sign: str) -> str:
    """One decimal, but a limit that would round to 0 keeps two significant digits (-0.046, not -0.0):
    whether an interval excludes 0 must still be readable."""
    text = f"{v:{sign}.1f}"
    if v != 0 and float(text) == 0:
        text = f"{v:{sign}.2g}"
    return text


def interval_text(lo: Any, hi: Any, sign: str) -> str:
    """' [97.9, 99.3]' (sign '+': ' [-0.3, +0.7]'), or '' without an interval."""
    if missing(lo) or missing(hi):
        return ""
    return f" [{limit(lo, sign)}, {limit(hi, sign)}]"


def fmt_p(p: float) -> str:
    """A p-value to two significant digits: 0.054, 0.0012, 1.0; below 0.0001, '< 0.0001'."""
    return "< 0.0001" if p < 1e-4 else f"{p:#.2g}"


def fmt_level(level: float) -> str:
    """99.29 % -> '99.3 %': enough digits to tell the level from 100 % and from its neighbours."""
    for digits in range(1, 6):
        text = f"{100 * level:.{digits}f}"
        if float(text) < 100:
            return text.rstrip("0").rstrip(".") + " %"
    return f"{100 * level:g} %"


def truncate(text: str, n: int) -> str:
    """The first line of `text`, at most n characters (an ellipsis says there was more)."""
    lines = str(text).strip().splitlines() or [""]
    first = lines[0]
    if len(first) > n or len(lines) > 1:
        return first[: n - 1].rstrip() + "…"
    return first
