"""One index row per card: the card's own values (qcard.cards.schema.Card) beside the significance its
experiment's comparison gives it. Plain values and display text only; escaping is the templates' job.

The comparison is read in one place, `read_comparison`, from `Comparison.export("json")`: when the json
keys of qcard.cards.compare change, only that function changes (and `format_p`, compare's p-value words).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..cards.render import DASH, MINUS, fmt_delta, fmt_interval, fmt_pct, fmt_si
from ..cards.schema import Card


@dataclass
class Tested:
    """A row's test against its reference row, as compare reports it."""
    significant: Optional[bool] = None         # None: not tested
    p_adjusted: Optional[float] = None
    family_size: Optional[int] = None
    ref_id: Optional[str] = None               # the reference card's id
    delta: Optional[float] = None              # Δ against the reference, at the family's adjusted level
    delta_interval: Optional[List[float]] = None
    is_reference: bool = False
    letter: str = ""                           # the card's letter in its experiment's comparison (A, B, ...)
    order: int = 0                             # its row in that comparison (the config's order)


@dataclass
class ComparisonView:
    """What the site shows of one experiment's comparison, beside the comparison's own attributes."""
    tested: Dict[str, Tested]                   # card file (or id, for a card from no file) -> its row's test
    legend: List[str]                           # what the marks mean (family sizes, interval levels)
    x: str                                      # the Pareto plot's cost axis
    reference: List[Dict[str, Any]]             # published rows ("reported"), as compare gives them
    reference_note: str                         # why those rows (or none) are shown
    reference_runtime: List[Dict[str, Any]]     # published real-engine rows, beside deploy results only
    method_differences: List[str]               # the methods' own choices that differ between the cards


def read_comparison(comparison: Any) -> ComparisonView:
    """The one reader of compare's JSON export (`Comparison.export("json")`): its `cards` rows name cards by
    their letter in that comparison and carry the test against the reference row; `significance.legend`,
    `x` and `reference` as they are."""
    data = json.loads(comparison.export("json"))
    letter_to_id = {r["card"]: r["id"] for r in data.get("cards", [])}
    tested: Dict[str, Tested] = {}
    for order, r in enumerate(data.get("cards", [])):
        t = Tested(is_reference=bool(r.get("is_reference")), letter=str(r["card"]), order=order)
        if r.get("p_adjusted") is not None:
            lo, hi = r.get("delta_vs_ref_lo"), r.get("delta_vs_ref_hi")
            t = Tested(significant=r.get("significant"), p_adjusted=r.get("p_adjusted"),
                       family_size=r.get("family_size"), ref_id=letter_to_id.get(r.get("ref")),
                       delta=r.get("delta_vs_ref"),
                       delta_interval=[lo, hi] if lo is not None and hi is not None else None,
                       is_reference=t.is_reference, letter=t.letter, order=order)
        tested[r.get("path") or r["id"]] = t
    sig = data.get("significance") or {}
    return ComparisonView(tested=tested, legend=list(sig.get("legend") or []), x=str(data.get("x") or "bops"),
                          reference=list(data.get("reference") or []),
                          reference_runtime=list(data.get("reference_runtime") or []),
                          reference_note=str(getattr(comparison, "reference_note", "") or ""),
                          method_differences=list(data.get("method_differences") or []))


def format_p(p: float) -> str:
    """The adjusted p-value as compare prints it."""
    from ..cards.compare import fmt_p
    return fmt_p(p)


def bits_text(card: Card) -> str:
    """W8A8, W4A8, FP32; a dash for a failed card (it has no quantization)."""
    if card.status != "ok":
        return DASH
    w, a = card.quantization.weights.bits, card.quantization.activations.bits
    if w is None and a is None:
        return "FP32"
    one = lambda b: "FP32" if b is None else f"{b:g}"
    return f"W{one(w)}A{one(a)}"


def _tested_interval(iv: Optional[List[float]]) -> str:
    """' [−1.6, +0.9]'; a limit that would round to 0 keeps two significant digits (−0.046, not −0.0), so
    whether the interval excludes 0 (the row is marked significant) stays readable, as in compare."""
    if not iv:
        return ""
    def one(v: float) -> str:
        text = f"{v:+.1f}"
        if v != 0 and float(text) == 0:
            text = f"{v:+.2g}"
        return text.replace("-", MINUS)
    return f" [{one(iv[0])}, {one(iv[1])}]"


@dataclass
class Row:
    """One card on the index (and on its experiment's page)."""
    card: Card
    page: str                       # the card's page, relative to the site root
    anchor: str                     # the row's element id, unique on the site (one card file may sit in two runs)
    experiment_page: str            # its experiment's page, relative to the site root
    tested: Tested
    cells: Dict[str, str] = field(default_factory=dict)
    data: Dict[str, str] = field(default_factory=dict)    # data-* attributes: raw values for sorting/filtering


def short_id(card_id: str) -> str:
    return card_id[:10]


def card_name(card: Card) -> str:
    """The card's display name: label (or method) on its model."""
    return f"{card.model.label or card.model.ref} · {card.method.label or card.method.name}"


def make_row(card: Card, page: str, anchor: str, experiment_page: str, tested: Tested, names: Dict[str, str]) -> Row:
    """The row's display cells (card's own formatting, compare's marks) and its sort/filter values.
    names: card id -> short display name, for the reference of a tested row."""
    r = card.results
    ok = card.status == "ok"
    if not ok:
        top1 = "FAILED"
    elif r.quantized is None:
        top1 = DASH
    else:
        spread = fmt_interval(r.ci95) or (f" ± {r.std:.2f}" if r.std is not None else "")
        top1 = ("≈ " if tested.significant is False else "") + fmt_pct(r.quantized) + spread
    if tested.delta is not None:     # tested: Δ against the reference at the family's adjusted level, as compare
        delta = fmt_delta(tested.delta) + _tested_interval(tested.delta_interval)
    else:
        delta = fmt_delta(r.delta) + fmt_interval(r.delta_ci95, signed=True) if ok else DASH
    if tested.p_adjusted is not None:
        m = tested.family_size or 0
        ref = names.get(tested.ref_id or "", short_id(tested.ref_id or "?"))
        vs_ref = f"{ref}: {format_p(tested.p_adjusted)} ({m} test{'s' if m != 1 else ''})"
    else:
        vs_ref = "ref" if tested.is_reference else DASH
    dep = card.deployment
    runtime = DASH
    if dep is not None:
        runtime = f"{dep.top1:.2f}" if dep.status == "ok" and dep.top1 is not None else str(dep.status)
    gran = card.quantization.weights.granularity if ok else None
    cells = {
        "experiment": card.experiment, "model": card.model.label or card.model.ref,
        "method": card.method.name, "label": card.method.label or card.method.name, "bits": bits_text(card),
        "granularity": str(gran).replace("_", "-") if gran else DASH,
        "fp32": (fmt_pct(r.fp32) + fmt_interval(r.fp32_ci95)) if r.fp32 is not None else DASH,
        "top1": top1, "delta": delta, "vs_ref": vs_ref, "runtime": runtime,
        "bops": fmt_si(card.cost.bops) if ok and card.cost.bops is not None else DASH,
        "status": card.status, "id": short_id(card.id),
    }
    num = lambda v: "" if v is None else repr(float(v))
    cells["letter"] = tested.letter
    data = {"experiment": card.experiment, "model": cells["model"], "method": card.method.name,
            "bits": cells["bits"], "status": card.status,
            "top1": num(r.quantized if ok else None), "delta": num(tested.delta if tested.delta is not None
                                                                   else (r.delta if ok else None)),
            "fp32": num(r.fp32), "bops": num(card.cost.bops if ok else None), "label": cells["label"], "letter": tested.letter,
            "id": card.id}
    return Row(card=card, page=page, anchor=anchor, experiment_page=experiment_page, tested=tested, cells=cells, data=data)
