"""A card's figures checked against its own evidence: every top-1, Δ, std and interval recomputed from
`results.outcomes` (which eval images each seed and FP32 got right).

One fact, one place: the runner writes a card's outcome-derived figures with `summary_figures` and
`interval_figures`, and `check_card` recomputes them with the same two functions, so the writer and the
checker cannot drift apart. A figure that differs from its recomputation by more than the card's rounding
(4 decimals) is a mismatch; so are bits that do not decode, a seed list that does not match the bits, and a
figure or interval without the bits it needs. Top-5 figures have no per-sample outcomes: not checked.

Cards whose Δ interval was written before qcard used Newcombe's method 10 as published (their `ci_method`
lacks "continuity-corrected") get a warning, not a mismatch, when their interval lies inside the one the
method gives: the uncorrected φ can only narrow the interval (the correction shrinks φ, which widens it),
so a stored interval outside the recomputed one was not written by either method.

Works on a loaded card (`qcard.cards.schema.Card`) by attribute, without importing the schema: load_card
calls it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import QcardError
from ..stats.intervals import accuracy_interval, method_text, paired_delta_interval
from ..stats.outcomes import ENCODING, pack_outcomes, unpack_outcomes

DECIMALS = 4                          # how many decimals the card keeps of every percentage
TOLERANCE = 0.5 * 10 ** -DECIMALS + 1e-9    # "beyond rounding": more than half the last kept decimal
NO_EVIDENCE = "no per-sample evidence: figures not checked"
# what marks a ci_method written before the Δ interval followed Newcombe's method 10 as published
CORRECTED_MARK = "continuity-corrected"


# ------------------------------------------------------------------ the figures, as the runner writes them


def top1_of(bits: np.ndarray) -> float:
    """Top-1 in percent of one seed's (or FP32's) outcomes, as evaluate() reports it."""
    return round(100.0 * int(np.count_nonzero(bits)) / len(bits), DECIMALS)


def summary_figures(fp32_top1: float, seed_top1s: Sequence[float]) -> Dict[str, Any]:
    """The card's headline figures from the FP32 top-1 and each seed's top-1: the seeds' mean, Δ from FP32,
    and the seed-to-seed standard deviation (None with one seed)."""
    mean1 = round(statistics.fmean(seed_top1s), DECIMALS)
    return {"quantized": mean1, "delta": round(mean1 - fp32_top1, DECIMALS),
            "std": round(statistics.stdev(seed_top1s), DECIMALS) if len(seed_top1s) > 1 else None}


def _rounded(iv: Optional[Tuple[float, float]]) -> Optional[List[float]]:
    return None if iv is None else [round(iv[0], DECIMALS), round(iv[1], DECIMALS)]


def interval_figures(fp32_bits: np.ndarray, seed_bits: Sequence[np.ndarray],
                     is_baseline: bool = False) -> Dict[str, Any]:
    """The card's 95 % intervals and their method, from the outcomes of FP32 and of each seed (in the card's
    seed order). The FP32 point is the baseline itself: its Δ is 0 by construction, with no interval."""
    return {"ci95": _rounded(accuracy_interval(list(seed_bits))),
            "fp32_ci95": _rounded(accuracy_interval([fp32_bits])),
            "delta_ci95": None if is_baseline else _rounded(paired_delta_interval(list(seed_bits), [fp32_bits])),
            "ci_method": method_text(len(fp32_bits), len(seed_bits))}


def results_from_outcomes(fp32_bits: Sequence[bool], seed_bits: Dict[int, Sequence[bool]], *,
                          fingerprint: Optional[str] = None, is_baseline: bool = False) -> Dict[str, Any]:
    """A card's outcome-derived results (everything but top-5) from FP32's and each seed's per-image
    outcomes: what a card written by the runner from these outcomes holds. For tools and tests that build
    cards from chosen outcome tables; the result passes `check_card`."""
    fp = np.asarray(fp32_bits, dtype=bool)
    seeds = list(seed_bits)
    bits = [np.asarray(seed_bits[s], dtype=bool) for s in seeds]
    fp_top1, top1s = top1_of(fp), [top1_of(b) for b in bits]
    return {"metric": "top1", "fp32": fp_top1, **summary_figures(fp_top1, top1s), "n_runs": len(seeds),
            "seeds": seeds, "per_seed": [{"seed": s, "top1": t} for s, t in zip(seeds, top1s)],
            **interval_figures(fp, bits, is_baseline),
            "outcomes": {"encoding": ENCODING, "n": len(fp), "fingerprint": fingerprint,
                         "fp32": pack_outcomes(fp), "seeds": {str(s): pack_outcomes(b) for s, b in zip(seeds, bits)}}}


# ------------------------------------------------------------------ the check


@dataclass
class Mismatch:
    field: str                 # the card's key path, e.g. results.per_seed[0].top1
    stored: Any                # what the card says (None: the key is missing)
    given: Any                 # what the outcomes give
    why: Optional[str] = None  # instead of stored/given: why the outcomes give nothing to compare

    def line(self, source: str) -> str:
        if self.why:
            return f"{source}: {self.field}: {self.why}"
        return f"{source}: {self.field}: stored {_show(self.stored)}, the outcomes give {_show(self.given)}"


@dataclass
class Evidence:
    """What checking a card against its outcomes found."""
    checked: bool = True                   # False: the card has no outcomes (schema 1, failed card)
    mismatches: List[Mismatch] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def lines(self, source: str) -> List[str]:
        return [m.line(source) for m in self.mismatches]

    def notes(self, source: str) -> List[str]:
        """Warnings and the no-evidence note, each one line naming the file."""
        return [f"{source}: {w}" for w in self.warnings] + ([] if self.checked else [f"{source}: {NO_EVIDENCE}"])


class EvidenceError(QcardError):
    """A card whose figures disagree with its own outcomes. str(): one line (the first mismatch, and how many
    more); .lines: every mismatch."""

    def __init__(self, source: str, evidence: Evidence):
        self.lines = evidence.lines(source)
        more = (f" (and {len(self.lines) - 1} more mismatch(es): `qcard card validate {source}` lists them)"
                if len(self.lines) > 1 else "")
        super().__init__(f"{self.lines[0]}{more}: the card disagrees with its own per-sample outcomes")
        self.evidence = evidence


def require_evidence(card: Any, source: str) -> Evidence:
    """check_card, raising EvidenceError on a mismatch."""
    evidence = check_card(card)
    if not evidence.ok:
        raise EvidenceError(source, evidence)
    return evidence


def check_card(card: Any) -> Evidence:
    """Recompute the card's outcome-derived figures and compare them with the stored ones."""
    r = card.results
    out = Evidence()
    o = r.outcomes
    if o is None:
        out.checked = False
        # an interval claims per-sample evidence: a card that states one without its outcomes was cut
        stated = [f"results.{k} {_show(getattr(r, k))}" for k in ("ci95", "fp32_ci95", "delta_ci95")
                  if getattr(r, k) is not None]
        if stated:
            out.mismatches.append(Mismatch("results.outcomes", None, None, why=(
                f"missing, while the card states intervals computed from them ({', '.join(stated)})")))
        return out
    bad = out.mismatches.append
    n = o.n
    if o.fingerprint and card.dataset.fingerprint and o.fingerprint != card.dataset.fingerprint:
        bad(Mismatch("results.outcomes.fingerprint", o.fingerprint,
                     f"bits of another eval set than dataset.fingerprint {card.dataset.fingerprint}"))
    if card.dataset.eval_size is not None and card.dataset.eval_size != n:
        bad(Mismatch("dataset.eval_size", card.dataset.eval_size, f"{n} images (results.outcomes.n)"))
    if n == 0:
        bad(Mismatch("results.outcomes.n", 0, "no images: nothing to compute a top-1 from"))
        return out

    fp_bits = _decode(o.fp32, n, "results.outcomes.fp32", bad)
    # the seeds, four ways: results.seeds, per_seed rows, n_runs and the outcomes' keys must agree
    rows = list(r.per_seed)
    row_seeds = [row.get("seed") for row in rows]
    if [str(s) for s in row_seeds] != list(o.seeds):
        bad(Mismatch("results.per_seed[*].seed", row_seeds, f"bits for seeds {_keys(o.seeds)} "
                                                           "(results.outcomes.seeds, in that order)"))
    if list(r.seeds) != row_seeds:
        bad(Mismatch("results.seeds", list(r.seeds), f"per-seed rows for seeds {row_seeds}"))
    if r.n_runs != len(rows):
        bad(Mismatch("results.n_runs", r.n_runs, f"{len(rows)} per-seed row(s)"))
    bits = {key: _decode(text, n, f"results.outcomes.seeds['{key}']", bad) for key, text in o.seeds.items()}
    if not o.seeds:
        bad(Mismatch("results.outcomes.seeds", {}, "no seed's bits: nothing to compute results.quantized from"))
    if fp_bits is None or any(b is None for b in bits.values()) or not o.seeds:
        return out          # the figures cannot be recomputed from bits that are not there

    # per seed, in the card's row order where the rows name the bits' seeds, else in the bits' order
    order = [str(s) for s in row_seeds] if [str(s) for s in row_seeds] == list(o.seeds) else list(o.seeds)
    seed_bits = [bits[k] for k in order]
    fp_top1 = top1_of(fp_bits)
    top1s = [top1_of(b) for b in seed_bits]
    _compare(out, "results.fp32", r.fp32, fp_top1, f"{int(fp_bits.sum()):,} of {n:,} images")
    for i, row in enumerate(rows):
        key = str(row.get("seed"))
        if key in bits:
            b = bits[key]
            _compare(out, f"results.per_seed[{i}].top1", row.get("top1"), top1_of(b),
                     f"{int(b.sum()):,} of {n:,} images")
            if row.get("ci95") is not None:
                _compare_interval(out, f"results.per_seed[{i}].ci95", row.get("ci95"),
                                  _rounded(accuracy_interval([b])))
    summary = summary_figures(fp_top1, top1s)
    for key in ("quantized", "delta", "std"):
        _compare(out, f"results.{key}", getattr(r, key), summary[key])

    baseline = card.method.family == "none" and all(np.array_equal(b, fp_bits) for b in seed_bits)
    given = interval_figures(fp_bits, seed_bits, is_baseline=False)
    for key in ("ci95", "fp32_ci95"):
        _compare_interval(out, f"results.{key}", getattr(r, key), given[key])
    superseded = bool(r.ci_method) and CORRECTED_MARK not in r.ci_method and "Newcombe" in r.ci_method
    if baseline and r.delta_ci95 is None:
        pass                # the FP32 card is its own baseline: Δ is 0 by construction, with no interval
    elif (superseded and r.delta_ci95 is not None and not _same_interval(r.delta_ci95, given["delta_ci95"])
          and _nested(r.delta_ci95, given["delta_ci95"], r.delta)):
        out.warnings.append(
            f"results.delta_ci95 {_show(r.delta_ci95)} was computed by the superseded Newcombe interval with "
            f"uncorrected φ (ci_method: \"{r.ci_method}\"); method 10 as published gives "
            f"{_show(given['delta_ci95'])}: rerun the point (its `reproduce` line) to update the card")
    else:
        _compare_interval(out, "results.delta_ci95", r.delta_ci95, given["delta_ci95"])
    if not superseded and r.ci_method != given["ci_method"]:
        bad(Mismatch("results.ci_method", r.ci_method, f"intervals by \"{given['ci_method']}\""))
    return out


def _decode(text: Optional[str], n: int, where: str, bad) -> Optional[np.ndarray]:
    if text is None:
        bad(Mismatch(where, None, None, why=f"missing: the figures need the bits of all {n:,} images"))
        return None
    try:
        return unpack_outcomes(text, n)
    except QcardError as exc:
        bad(Mismatch(where, None, None, why=f"{exc} ({_short(text)}): the figures cannot be checked"))
        return None


def _compare(out: Evidence, where: str, stored: Any, given: Optional[float], detail: str = "") -> None:
    if given is None and stored is None:
        return
    if (given is None or not isinstance(stored, (int, float)) or isinstance(stored, bool)
            or not math.isclose(stored, given, rel_tol=0, abs_tol=TOLERANCE)):
        out.mismatches.append(Mismatch(where, stored, _fmt(given) + (f" ({detail})" if detail else "")))


def _compare_interval(out: Evidence, where: str, stored: Any, given: Optional[List[float]]) -> None:
    if not _same_interval(stored, given):
        out.mismatches.append(Mismatch(where, stored, given))


def _same_interval(stored: Any, given: Optional[List[float]]) -> bool:
    if stored is None or given is None:
        return stored is None and given is None
    return len(stored) == 2 and all(math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE) for a, b in zip(stored, given))


def _nested(stored: Sequence[float], given: Optional[Sequence[float]], delta: Optional[float]) -> bool:
    """The stored interval lies inside the recomputed one (to rounding) and holds the stored Δ."""
    if given is None or len(stored) != 2 or delta is None:
        return False
    lo, hi = stored
    return given[0] - TOLERANCE <= lo <= delta + TOLERANCE and delta - TOLERANCE <= hi <= given[1] + TOLERANCE


def _fmt(x: Any) -> str:
    if x is None:
        return "nothing"
    return f"{x:.{DECIMALS}f}" if isinstance(x, float) else str(x)


def _show(x: Any) -> str:
    if x is None:
        return "nothing (missing)"
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x):
        return f"[{_fmt(float(x[0]))}, {_fmt(float(x[1]))}]"
    if isinstance(x, float):
        return _fmt(x)
    return str(x)


def _short(text: str) -> str:
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _keys(seeds: Dict[str, str]) -> str:
    return "[" + ", ".join(seeds) + "]"
