"""compare_cards and the Comparison it returns: rows, differences, Pareto front, significance; exports
through the one list of exporters (exporters.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ...errors import QcardError
from .differences import CONFOUNDERS, METHOD_FIELDS, differences, first_last, param_differences, swept_params
from .load import LoadedCard, as_loaded, config_order, superseded
from .rows import REFERENCE_COLUMNS, X_AXES, Row, build_row, choose_profile, cost_in, pareto_front, with_profile
from .runtime import not_reproducible, runtime_gaps
from .significance import DEFAULT_FAMILY, Significance, significance
from .words import card_letter, group_text, show_groups

INT_COLUMNS = ("calibration", "eval_size", "n_runs")


@dataclass
class Comparison:
    """The result of compare_cards. `table` (a pandas DataFrame, one row per card shown) is built on first
    use from `rows`, so exports that don't need pandas (Markdown, LaTeX, JSON) don't import it."""
    rows: List[Row]                              # one per card shown, raw values
    differences: List[str]                       # confounding differences, plain words
    pareto: List[int]                            # row positions on the accuracy/cost front (x axis below)
    x: str = "bops"
    method_differences: List[str] = field(default_factory=list)
    difference_details: List[Dict[str, Any]] = field(default_factory=list)
    failed: List[Dict[str, Any]] = field(default_factory=list)     # {card, path, model, label, error}
    superseded: List[Dict[str, Any]] = field(default_factory=list)  # {id, path, status, by} left out
    params: List[str] = field(default_factory=list)                 # swept method parameters (columns)
    reference_rows: Optional[List[Dict[str, Any]]] = None    # published rows ("reported"), None when not asked
    reference_note: str = ""
    # published real-engine figures (kind "runtime"): only beside cards with a deploy result, never in the
    # simulated rows above; None when not asked
    runtime_reference_rows: Optional[List[Dict[str, Any]]] = None
    runtime_reference_note: str = ""
    cards: List[LoadedCard] = field(default_factory=list)    # the cards shown, in row order
    profile: Optional[str] = None                # cost profile the cost columns come from (None: each card's main)
    profile_note: str = ""                       # why that profile, when not the main one
    significance: Significance = field(default_factory=Significance)   # tests against reference rows
    notes: List[str] = field(default_factory=list)                      # e.g. cards not reproducible from a commit
    _table: Any = field(default=None, repr=False)
    _reference: Any = field(default=None, repr=False)

    @property
    def table(self):
        """pandas DataFrame, one row per card (integer columns with gaps are nullable Int64)."""
        if self._table is None:
            import pandas as pd
            flat = [r.flat(self.params) for r in self.rows]
            df = pd.DataFrame(flat, columns=list(flat[0]) if flat else None)
            for col in INT_COLUMNS:   # so CSV says 1024, not 1024.0
                if col in df:
                    df[col] = df[col].astype("Int64")
            self._table = df
        return self._table

    @property
    def reference(self):
        """pandas DataFrame of the published rows (kind "reported"), or None when not asked for."""
        if self.reference_rows is None:
            return None
        if self._reference is None:
            import pandas as pd
            self._reference = pd.DataFrame(self.reference_rows, columns=REFERENCE_COLUMNS)
        return self._reference

    @property
    def runtime_reference(self):
        """pandas DataFrame of the published real-engine rows (kind "runtime"), or None when not asked for."""
        if self.runtime_reference_rows is None:
            return None
        import pandas as pd
        return pd.DataFrame(self.runtime_reference_rows, columns=REFERENCE_COLUMNS)

    # exports ---------------------------------------------------------------
    def export(self, fmt: str, **options: Any) -> str:
        """The comparison as FMT (exporters.EXPORTERS: md, csv, tex, json, html); options go to the
        exporter (tex: columns=[...], width="\\textwidth")."""
        from .exporters import exporter
        return exporter(fmt)(self, **options)

    def to_markdown(self) -> str:
        return self.export("md")

    def to_latex(self, **options: Any) -> str:
        return self.export("tex", **options)

    def to_csv(self) -> str:
        return self.export("csv")

    def to_json(self) -> str:
        return self.export("json")

    def to_html(self) -> str:
        return self.export("html")

    def plot(self, path: Union[str, Path]) -> List[Path]:
        """Accuracy against the x axis with the Pareto front: writes PATH.png and PATH.pdf."""
        from .plot import plot
        return plot(self, path)

    def read_first(self) -> List[str]:
        """What a reader must see before the table: cards whose FP32 baseline or eval set makes their
        accuracies meaningless (cards.render.chance_notes), each said once with the cards it holds for."""
        from ..render import chance_notes
        said: Dict[str, List[str]] = {}
        for r, lc in zip(self.rows, self.cards):
            if lc.card.status == "ok":
                for line in chance_notes(lc.card.results.model_dump(mode="json"), lc.card.dataset.eval_size):
                    said.setdefault(line, []).append(r.card)
        return [f"{group_text(letters)}: {line}" for line, letters in said.items()]

    def legend(self) -> List[str]:
        """Lines below the table that say what its marks mean."""
        out = list(self.significance.legend)
        if any(r.ci95_lo is not None or r.fp32_ci95_lo is not None or
               (r.delta_ci95_lo is not None and r.delta_vs_ref is None) for r in self.rows):
            untested = " and on the Δ of untested rows" if self.significance.tests else ""
            out.append(f"[lo, hi] on FP32 and quantized{untested}: the card's own 95 % interval (results.ci_method)")
        from ...cost.profile import speedup_definition
        defined = {}
        for lc in self.cards:     # what "speedup vs FP32" means, per profile the column reads (issue 22)
            cost = cost_in(lc.card, self.profile) if self.profile and lc.card.status == "ok" else lc.card.cost
            words = speedup_definition(cost.model_dump(mode="json")) if cost is not None else None
            if words:
                defined.setdefault(f"speedup vs FP32 ({cost.profile}): {words}", None)
        out += list(defined)
        if any(r.runtime_status == "ok" for r in self.rows):
            out.append("runtime: top-1 of the same quantized model on a real integer runtime (ORT: onnxruntime), "
                       "same images")
        return out


def compare_cards(cards: Sequence[Any], x: str = "bops", reference: Union[bool, str] = False,
                  profile: Optional[str] = None, baseline: Optional[str] = None,
                  family: str = DEFAULT_FAMILY, show_all: bool = False) -> Comparison:
    """Compare cards (Card, dict, LoadedCard or paths). x: the Pareto cost axis (bops|size|energy|latency).
    reference: False, "matching" (or True: published rows for the models among the cards) or "all".
    profile: the cost profile to read cost from (default: each card's main one, or for energy and
    latency the first profile that has them; `Comparison.profile_note` says which).
    baseline: an id prefix of the card every other row is tested against (default: the FP32 card of the
    same model). family: the Benjamini–Hochberg family, "table", "model" (default) or "experiment".
    show_all: also the cards superseded by a later card of the same point id, and failed cards as rows
    (by default failed cards are only listed in `failed`, and superseded ones in `superseded`).
    Rows follow the config's order when the cards carry point.index (config_order)."""
    if x not in X_AXES:
        raise QcardError(f"unknown cost axis '{x}'; allowed: {', '.join(X_AXES)}")
    everything = config_order(as_loaded(cards))
    if not everything:
        raise QcardError("no cards to compare")
    old = [] if show_all else superseded(everything)
    gone = {k for k, _ in old}
    kept = [lc for k, lc in enumerate(everything) if k not in gone]
    originals = kept if show_all else [lc for lc in kept if lc.card.status == "ok"]
    failed_only = [] if show_all else [lc for lc in kept if lc.card.status != "ok"]
    if not originals and not failed_only:
        raise QcardError("no cards to compare")
    profile, profile_note = choose_profile([lc.card for lc in originals], x, profile)
    loaded = [with_profile(lc, profile) for lc in originals]
    letters = [card_letter(i) for i in range(len(loaded))]
    ok_idx = [i for i, lc in enumerate(loaded) if lc.card.status == "ok"]
    ok_cards = [loaded[i].card for i in ok_idx]
    ok_letters = [letters[i] for i in ok_idx]
    params, own = swept_params(ok_cards)
    swept_of = dict(zip(ok_idx, own))
    rows = [build_row(l, lc, params, swept_of.get(i, [])) for i, (l, lc) in enumerate(zip(letters, loaded))]
    key = X_AXES[x][0]
    diffs, details = differences(ok_cards, ok_letters, CONFOUNDERS)
    fl = first_last(ok_cards, ok_letters, show_groups(ok_letters)) if len(ok_cards) > 1 else []
    # keep the order of the spec: first/last right after the grid settings
    at = next((i for i, d in enumerate(details) if d["field"] in ("quantization.batch_norm", "quantization.residual_add")),
              len(diffs))
    diffs[at:at] = fl
    details[at:at] = [{"field": "quantization.first_layer/last_layer", "text": t, "values": []} for t in fl]
    mdiffs, _ = differences(ok_cards, ok_letters, METHOD_FIELDS)
    mdiffs += param_differences(ok_cards, ok_letters)
    ran = set(ok_idx)
    xs = [rows[i][key] if i in ran else None for i in range(len(rows))]
    front = pareto_front(xs, [r.quantized for r in rows])
    for i in front:
        rows[i].pareto = True
    sig = significance([lc.card for lc in loaded], letters, ok_idx, baseline, family)
    for i, t in sig.tests.items():
        r = rows[i]
        r.ref, r.p_value, r.p_adjusted, r.significant = letters[t["ref"]], t["p"], t["p_adjusted"], t["significant"]
        r.family, r.family_size, r.interval_level = t["family"], t["family_size"], t["level"]
        r.delta_vs_ref, r.delta_vs_ref_lo, r.delta_vs_ref_hi = t["delta"], t["lo"], t["hi"]
    for j in sig.references:
        rows[j].is_reference = True
    runtime = runtime_gaps(ok_cards, ok_letters)
    diffs += runtime
    details += [{"field": "deployment.top1", "text": t, "values": []} for t in runtime]
    # failed cards: rows with --all, else letters after the rows' and one short section
    failed_letters = [card_letter(len(loaded) + k) for k in range(len(failed_only))]
    failed = ([{"card": r.card, "path": r.path, "model": r.model, "label": r.label, "error": r.error}
               for r in rows if r.status != "ok"]
              + [{"card": l, "path": str(lc.path) if lc.path else None, "model": lc.card.model.ref,
                  "label": lc.card.method.label or lc.card.method.name,
                  "error": lc.card.error or "failed (no message recorded)"}
                 for l, lc in zip(failed_letters, failed_only)])
    later = [{"id": everything[k].card.id, "path": str(everything[k].path) if everything[k].path else None,
              "status": everything[k].card.status,
              "by": str(everything[b].path) if everything[b].path else everything[b].card.id} for k, b in old]
    ref, note = _reference(reference, loaded)
    runtime_ref, runtime_note = _runtime_reference(reference, loaded)
    return Comparison(rows=rows, differences=diffs, pareto=front, x=x, method_differences=mdiffs,
                      difference_details=details, failed=failed, superseded=later, params=params,
                      reference_rows=ref, reference_note=note,
                      runtime_reference_rows=runtime_ref, runtime_reference_note=runtime_note,
                      cards=originals, profile=profile, profile_note=profile_note, significance=sig,
                      notes=not_reproducible(ok_cards, ok_letters))


def _datasets(loaded: List[LoadedCard]) -> List[str]:
    """The cards' datasets in reference-row terms (card_dataset)."""
    from ..reference import card_dataset
    return sorted({card_dataset(lc.card.dataset.model_dump(mode="json"),
                                (lc.card.results.chance.num_classes if lc.card.results.chance else None))
                   for lc in loaded})


def _reference(reference: Union[bool, str], loaded: List[LoadedCard]):
    """(published rows, a note) for `reference` (False, "matching"/True or "all")."""
    if not reference:
        return None, ""
    from ..reference import model_key, reference_rows
    note = ""
    models = None if reference == "all" else sorted({lc.card.model.ref for lc in loaded})
    # published rows only on the cards' own dataset (all of them with --reference-all, dataset shown)
    ours = _datasets(loaded)
    ref = reference_rows(models, datasets=None if reference == "all" else ours)
    elsewhere = sorted({r["dataset"] for r in ref} - set(ours))
    if models is not None and not ref:
        others = sorted({r["dataset"] for r in reference_rows(models)} - set(ours))
        note = ("no published rows for " + ", ".join(sorted({model_key(m) for m in models}))
                + f" on {', '.join(ours)}"
                + (f" (the published rows for these models are on {', '.join(others)})" if others else "")
                + "; `--reference-all` shows every published row")
    elif elsewhere:
        note = (f"published rows on {', '.join(elsewhere)}, not on these cards' {', '.join(ours)}: "
                "shown for reference only, not comparable")
    return ref, note


def _runtime_reference(reference: Union[bool, str], loaded: List[LoadedCard]):
    """(published real-engine rows, a note): only where a card shown has a deploy result (the runtime
    column), for those cards' models and dataset (every one with "all"); a note where such rows exist for
    the cards but none of them ran the deploy check."""
    if not reference:
        return None, ""
    from ..reference import model_key, runtime_reference_rows
    deployed = [lc for lc in loaded if lc.card.status == "ok" and lc.card.deployment is not None
                and lc.card.deployment.status == "ok"]
    if deployed:
        if reference == "all":
            return runtime_reference_rows(), ""
        return runtime_reference_rows(sorted({lc.card.model.ref for lc in deployed}),
                                      datasets=_datasets(deployed)), ""
    models = None if reference == "all" else sorted({lc.card.model.ref for lc in loaded})
    unseen = runtime_reference_rows(models, datasets=None if reference == "all" else _datasets(loaded))
    if not unseen:
        return [], ""
    return [], ("published real-engine figures (" + ", ".join(sorted({r["method"] for r in unseen})) + ") for "
                + ", ".join(sorted({model_key(r["model"]) for r in unseen}))
                + " are shown only beside deploy results: no card here has one (a `deploy:` block runs the check)")
