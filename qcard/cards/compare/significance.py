"""Significance: each row against its reference row, paired on the same images (issue 13 item 3).

Cards with per-sample outcomes (results.outcomes) on the same eval set (fingerprint) are tested against a
reference row (the FP32 card of the same model, or `baseline=` an id prefix), over all their seeds.
Interval, mark and p tell one story: Newcombe's paired interval of the difference and the p-value of the
same procedure, Benjamini–Hochberg within a family of tests (`family=`: table, model or experiment), the
interval shown at the family's Benjamini–Yekutieli level, so it excludes 0 exactly for the rows not marked
"≈". Cards on different eval sets are never tested against each other; cards without outcomes are not
tested.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from ...errors import QcardError
from ..schema import Card
from .differences import settings_differ
from .words import fmt_level, fmt_p, group_text

FAMILIES = {   # --family name -> (the rows' key that groups tests into one BH family, the legend's words)
    "table": (lambda c: "", "over the whole table"),
    "model": (lambda c: c.model.ref, "within each model"),
    "experiment": (lambda c: c.experiment, "within each experiment"),
}
DEFAULT_FAMILY = "model"


@dataclass
class Significance:
    # row -> {ref, b, c, n, delta, p, p_adjusted, significant, family, family_size, level, lo, hi}
    tests: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    references: List[int] = field(default_factory=list)              # rows that others are tested against
    legend: List[str] = field(default_factory=list)                  # lines under the table
    notes: List[str] = field(default_factory=list)                   # why some rows were not tested
    within_noise: List[str] = field(default_factory=list)
    family: str = DEFAULT_FAMILY


MAX_WITHIN_NOISE_LINES = 12


def _tested_bits(card: Card) -> Optional[Tuple[Optional[str], int, List[str]]]:
    """(eval fingerprint, images, packed bits of every seed) the card is tested on, or None without
    per-sample outcomes. A multi-seed card is tested on all its seeds (each image counts as the fraction
    of seeds that got it right: the seed mean the row shows), in results.seeds order. An FP32 card
    without seed outcomes is tested on its FP32 outcomes."""
    o = card.results.outcomes
    if o is None or card.status != "ok":
        return None
    fingerprint = o.fingerprint or card.dataset.fingerprint
    order = [str(s) for s in card.results.seeds if str(s) in o.seeds]
    seeds = order + [s for s in o.seeds if s not in order]
    if seeds:
        return fingerprint, o.n, [o.seeds[s] for s in seeds]
    if card.method.family == "none" and o.fp32:
        return fingerprint, o.n, [o.fp32]
    return None


def _baseline_row(cards: List[Card], prefix: str) -> int:
    matches = [i for i, c in enumerate(cards) if c.id.startswith(prefix)]
    if not matches:
        ids = ", ".join(sorted({c.id[:10] for c in cards})[:6])
        raise QcardError(f"--baseline {prefix}: no card's id starts with it (ids among these cards: {ids}"
                         f"{', ...' if len(cards) > 6 else ''}); give a prefix of the card's id")
    if len({cards[i].id for i in matches}) > 1:
        raise QcardError(f"--baseline {prefix} matches {len(matches)} cards "
                         f"({', '.join(sorted({cards[i].id[:12] for i in matches})[:4])}); give more of the id")
    if cards[matches[0]].status != "ok":
        raise QcardError(f"--baseline {prefix}: that card is a failed point, with no result to test against")
    return matches[0]


def _references(cards: List[Card], ok: List[int], baseline: Optional[str]) -> Dict[int, int]:
    """row -> its reference row: the --baseline card for every other row, or else the FP32 card (method
    family none) of the same model, preferring one on the same eval set."""
    if baseline:
        ref = _baseline_row(cards, baseline)
        return {i: ref for i in ok if i != ref}
    fp32 = [i for i in ok if cards[i].method.family == "none"]
    out: Dict[int, int] = {}
    for i in ok:
        same_model = [j for j in fp32 if cards[j].model.ref == cards[i].model.ref and j != i]
        if cards[i].method.family == "none" or not same_model:
            continue
        same_data = [j for j in same_model if cards[j].dataset.fingerprint == cards[i].dataset.fingerprint]
        out[i] = (same_data or same_model)[0]
    return out


def significance(cards: List[Card], letters: List[str], ok: List[int], baseline: Optional[str] = None,
                 family: str = DEFAULT_FAMILY) -> Significance:
    """Each row against its reference row on the paired per-sample outcomes (all seeds), as one procedure:
    Newcombe's paired interval of the difference and its p-value (the level at which the interval reaches
    0), Benjamini–Hochberg within each family of tests (`family`: table, model or experiment), and the
    interval shown at the Benjamini–Yekutieli level 1 - R*q/m of its family, so that it excludes 0 exactly
    when the row is marked significant. Rows on a different eval set than their reference, or without
    outcomes, are not tested (the notes say so)."""
    if family not in FAMILIES:
        raise QcardError(f"unknown test family '{family}'; allowed: {', '.join(FAMILIES)}")
    refs = _references(cards, ok, baseline)
    bits = {i: _tested_bits(cards[i]) for i in ok}
    no_outcomes = [k for k in ok if bits[k] is None] if len(ok) > 1 else []
    other_data = [(i, j) for i, j in refs.items() if bits[i] and bits[j] and
                  (bits[i][0] is None or bits[i][0] != bits[j][0] or bits[i][1] != bits[j][1])]
    pairs = [(i, j) for i, j in refs.items() if bits[i] and bits[j] and (i, j) not in other_data]
    sig = Significance(references=sorted({j for _, j in pairs}), family=family)
    if no_outcomes:
        whose = "the cards" if len(no_outcomes) == len(ok) else group_text([letters[k] for k in no_outcomes])
        sig.notes.append(f"no per-sample outcomes on {whose} (written before card schema 2, or without them): "
                         "their differences are not tested for significance")
    if other_data:
        sig.notes.append("not tested: " + ", ".join(f"{letters[i]} vs {letters[j]}" for i, j in other_data[:8])
                         + (f" and {len(other_data) - 8} more" if len(other_data) > 8 else "")
                         + " are on different eval sets (fingerprints differ): a paired test needs the same images")
    unreferenced = [i for i in ok if bits[i] and i not in refs and i not in sig.references and not baseline
                    and cards[i].method.family != "none"]
    if unreferenced:
        sig.notes.append(f"not tested: no FP32 card of the same model for {group_text([letters[i] for i in unreferenced])}"
                         " (name a reference with --baseline CARD_ID)")
    if not pairs:
        return sig
    from ...stats.intervals import paired_delta_interval, paired_delta_pvalue, per_image
    from ...stats.outcomes import unpack_outcomes
    from ...stats.significance import FDR_Q, benjamini_hochberg, fcr_level
    unpacked: Dict[int, Any] = {}

    def outcome(k: int):
        """The card's per-image outcome: 0/1 for one seed, the fraction of seeds right for several."""
        if k not in unpacked:
            try:
                unpacked[k] = per_image([unpack_outcomes(text, bits[k][1]) for text in bits[k][2]])
            except QcardError as exc:
                raise QcardError(f"card {letters[k]} ({cards[k].id[:10]}): results.outcomes: {exc}") from None
        return unpacked[k]

    key_of, family_words = FAMILIES[family]
    groups: Dict[str, List[int]] = {}
    for i, j in pairs:
        x, y = outcome(i), outcome(j)
        sig.tests[i] = {"ref": j, "b": _count(x * (1 - y)), "c": _count((1 - x) * y),
                        "n": bits[i][1], "delta": 100.0 * float(x.mean() - y.mean()),
                        "p": paired_delta_pvalue(x, y), "family": key_of(cards[i]),
                        "seeds": max(len(bits[i][2]), len(bits[j][2]))}
        groups.setdefault(key_of(cards[i]), []).append(i)
    sizes = []
    for key, members in groups.items():
        adjusted, rejected = benjamini_hochberg([sig.tests[i]["p"] for i in members], FDR_Q)
        level = fcr_level(sum(rejected), len(members), FDR_Q)
        sizes.append((key, len(members), sum(rejected), level))
        for i, a, r in zip(members, adjusted, rejected):
            t = sig.tests[i]
            lo, hi = paired_delta_interval(outcome(i), outcome(t["ref"]), level)
            t.update(p_adjusted=a, significant=r, family_size=len(members), level=level, lo=lo, hi=hi)
    sig.legend = _significance_legend(sig, letters, baseline, family_words, sizes, FDR_Q)
    sig.within_noise = _within_noise(cards, letters, sig.tests)
    return sig


def _count(v: Any) -> Union[int, float]:
    """Discordant images: a whole number for one seed, fractional (seed means) for several."""
    total = float(v.sum())
    return int(total) if total.is_integer() else total


def _significance_legend(sig: Significance, letters: List[str], baseline: Optional[str], family_words: str,
                         sizes: List[Tuple[str, int, int, float]], q: float) -> List[str]:
    """What ≈, the p column and the tested rows' Δ interval mean, family by family."""
    named = len(sizes) > 1 or sizes[0][0]
    per = "; ".join((f"{key}: " if named else "") + f"{m} test{'s' if m != 1 else ''}, {r} significant, "
                    f"Δ interval at {fmt_level(level)}" for key, m, r, level in sizes)
    lines = [f"≈: not significantly different from {_reference_words(sig.references, letters, baseline)} at a "
             f"false discovery rate of {q:g} (Benjamini–Hochberg {family_words}, --family {sig.family}: {per})",
             "vs ref: the reference row, the BH-adjusted p-value (Newcombe's paired test: the level at which the "
             "Δ interval reaches 0) and the number of tests in the row's family",
             "Δ [lo, hi] of a tested row: its difference from the reference row with Newcombe's paired interval "
             "(1998, method 10) at the FCR-adjusted level 1 − R·q/m of its family (Benjamini & Yekutieli 2005; "
             "R of m tests significant), so it excludes 0 exactly when the row is not marked ≈"]
    if any(t["seeds"] > 1 for t in sig.tests.values()):
        lines.append("several seeds: each image counts as the fraction of the card's seeds that got it right "
                     "(the seed mean the row shows)")
    return lines


def _reference_words(refs: List[int], letters: List[str], baseline: Optional[str]) -> str:
    if baseline:
        return f"card {letters[refs[0]]} (--baseline)"
    return f"the FP32 card of the same model ({group_text([letters[j] for j in refs])})"


def _within_noise(cards: List[Card], letters: List[str], tests: Dict[int, Dict[str, Any]]) -> List[str]:
    """'within noise: B vs A (p = 0.41, BH-adjusted)' for each tested pair whose settings differ but
    whose accuracies do not, significantly."""
    quiet = [(i, t) for i, t in tests.items() if not t["significant"]]
    lines: List[str] = []
    for k, (i, t) in enumerate(quiet):
        if len(lines) == MAX_WITHIN_NOISE_LINES:    # the table's ≈ marks say the rest (no settings check: fast)
            lines.append(f"within noise: {len(quiet) - k} more rows against their reference (marked ≈ in the table)")
            break
        if settings_differ(cards[i], cards[t["ref"]]):
            lines.append(f"within noise: {letters[i]} vs {letters[t['ref']]} (p = {fmt_p(t['p_adjusted'])}, "
                         f"BH-adjusted over {t['family_size']} test{'s' if t['family_size'] != 1 else ''})")
    return lines
