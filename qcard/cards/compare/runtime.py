"""The real runtime beside the simulation (issue 12), and cards that no commit reproduces (issue 13 item 4)."""
from __future__ import annotations

from typing import List, Optional

from ..schema import Card
from .words import group_text

RUNTIME_SHORT = {"onnxruntime": "ORT"}


def runtime_text(status: Optional[str], runtime: Optional[str], top1: Optional[float],
                 informative: Optional[bool]) -> Optional[str]:
    """The runtime column's words from a row's raw deployment values (None where no deploy check ran)."""
    if status is None:
        return None
    if status == "ok":
        short = RUNTIME_SHORT.get(runtime, runtime)
        if top1 is None:
            return "—"
        # agreement on outputs that do not vary (one argmax class, constant logits) says nothing
        return f"{top1:.2f} ({short}" + ("; agreement not informative)" if informative is False else ")")
    return {"not_deployable": "not deployable", "failed": "failed"}.get(status, status)


def runtime_cell(card: Card) -> Optional[str]:
    d = card.deployment
    if d is None or card.status != "ok":
        return None
    return runtime_text(d.status, d.runtime, d.top1, d.agreement_informative)


def runtime_gaps(cards: List[Card], letters: List[str]) -> List[str]:
    """'simulated vs runtime accuracy: B 98.62 vs 98.40 (onnxruntime)' for cards whose top-1 on the real
    runtime is not the simulated top-1 (at the table's two decimals)."""
    gaps, vacuous = [], []
    for c, l in zip(cards, letters):
        d = c.deployment
        if c.status != "ok" or d is None or d.status != "ok" or d.top1 is None:
            continue
        sim = d.top1_simulated if d.top1_simulated is not None else c.results.quantized
        if sim is not None and abs(d.top1 - sim) >= 0.005:
            gaps.append(f"{l} {sim:.2f} vs {d.top1:.2f} ({d.runtime})")
        if d.agreement_informative is False:
            vacuous.append(l)
    out = []
    if gaps:
        out.append("simulated vs runtime accuracy: " + ", ".join(gaps[:8])
                   + (f" and {len(gaps) - 8} more" if len(gaps) > 8 else ""))
    if vacuous:
        out.append("runtime agreement not informative: " + ", ".join(vacuous) + " (the simulated outputs on the "
                   "deploy images are constant or have one argmax class)")
    return out


def not_reproducible(cards: List[Card], letters: List[str]) -> List[str]:
    bad = [l for c, l in zip(cards, letters) if c.provenance.git_dirty or not c.provenance.git_commit]
    if not bad:
        return []
    return [f"not reproducible from a commit: {group_text(bad)} (made from a source tree with uncommitted "
            "changes, or no git commit on the card)"]

