"""One typed row per card: the values as the card stores them (`per_channel`, `folded`, booleans, numbers),
never words. JSON and CSV write them as they are; md/tex/html put them into words (display.py). Also the
cost axes, the cost profile a comparison reads, and the Pareto front."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ...errors import QcardError
from ..schema import Card
from .differences import flat_params, range_images
from .load import LoadedCard, created, point_index
from .words import is_number

X_AXES = {  # --x name -> (cost key, axis label, needs a hardware model)
    "bops": ("bops", "BOPs", False),
    "size": ("size_bits", "model size (bits)", False),
    "energy": ("energy_pj", "energy (pJ)", True),
    "latency": ("latency_cycles", "latency (cycles)", True),
}
REFERENCE_COLUMNS = ["kind", "source", "dataset", "model", "method", "w_bits", "a_bits", "w_granularity", "fp32",
                     "top1", "delta", "citation"]     # the published rows (reference.py), as CSV and DataFrame columns
COST_KEYS = ("bops", "size_bits", "energy_pj", "latency_cycles", "speedup_vs_fp32")


@dataclass
class Row:
    """A card's row. Reads like a dict too (row["label"]), the way tools and templates index it."""
    card: str                                    # the letter naming the card in the text (A, B, ...)
    status: str
    id: str
    model: str
    method: str
    label: str                                   # method.label (or its name)
    method_family: Optional[str]
    experiment: Optional[str]
    w_bits: Optional[float] = None
    a_bits: Optional[float] = None
    granularity: Optional[str] = None            # quantization.weights.granularity, e.g. per_channel
    group_size: Optional[int] = None
    a_granularity: Optional[str] = None
    bn: Optional[str] = None                     # quantization.batch_norm, e.g. folded
    first_w_bits: Optional[float] = None
    first_a_bits: Optional[float] = None
    last_w_bits: Optional[float] = None
    last_a_bits: Optional[float] = None
    residual: Optional[str] = None               # quantization.residual_add, e.g. quant_all
    calibration: Optional[int] = None            # range-setting images (QAT: its initialisation)
    params: Dict[str, Any] = field(default_factory=dict)   # the swept method parameters (dotted names)
    swept: List[str] = field(default_factory=list)         # those of them that vary among rows of its label
    fp32: Optional[float] = None
    quantized: Optional[float] = None
    std: Optional[float] = None
    delta: Optional[float] = None
    n_runs: Optional[int] = None
    bops: Optional[float] = None
    size_bits: Optional[float] = None
    energy_pj: Optional[float] = None
    latency_cycles: Optional[float] = None
    speedup_vs_fp32: Optional[float] = None
    profile: Optional[str] = None
    dataset: Optional[str] = None
    eval_size: Optional[int] = None
    path: Optional[str] = None
    created: Optional[str] = None                # provenance finished_at (or started_at)
    error: Optional[str] = None                  # a failed card's message
    # 95 % intervals where the card has them (schema 2)
    ci95_lo: Optional[float] = None
    ci95_hi: Optional[float] = None
    fp32_ci95_lo: Optional[float] = None
    fp32_ci95_hi: Optional[float] = None
    delta_ci95_lo: Optional[float] = None
    delta_ci95_hi: Optional[float] = None
    # the real runtime (card.deployment), where a deploy check ran
    runtime: Optional[str] = None
    runtime_status: Optional[str] = None
    runtime_top1: Optional[float] = None
    runtime_agreement_informative: Optional[bool] = None
    # significance against the reference row: filled by compare_cards (Δ and its interval at the
    # family's FCR-adjusted level, in points)
    ref: Optional[str] = None
    p_value: Optional[float] = None
    p_adjusted: Optional[float] = None
    significant: Optional[bool] = None
    is_reference: bool = False
    family: Optional[str] = None                 # the test family (--family), not the method's
    family_size: Optional[int] = None
    interval_level: Optional[float] = None
    delta_vs_ref: Optional[float] = None
    delta_vs_ref_lo: Optional[float] = None
    delta_vs_ref_hi: Optional[float] = None
    reproducible: bool = False
    point_index: Optional[int] = None
    pareto: bool = False

    # dict-like reading, for templates, tools and tests
    def __getitem__(self, key: str) -> Any:
        if key not in ROW_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in ROW_KEYS else default

    def keys(self) -> List[str]:
        return list(ROW_KEYS)

    def __iter__(self) -> Iterator[str]:
        return iter(ROW_KEYS)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def flat(self, params: Sequence[str]) -> Dict[str, Any]:
        """Flat columns (CSV, DataFrame): `params` as param.NAME, `swept` as names joined by ';'."""
        d = self.as_dict()
        values = d.pop("params")
        d["swept"] = ";".join(d["swept"])
        for p in params:
            v = values.get(p)
            d[f"param.{p}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        return d

    @property
    def ok(self) -> bool:
        return self.status == "ok"


ROW_KEYS: Tuple[str, ...] = tuple(f.name for f in fields(Row))


def build_row(letter: str, lc: LoadedCard, params: Sequence[str] = (), swept: Sequence[str] = ()) -> Row:
    c = lc.card
    q, r, cost = c.quantization, c.results, c.cost
    ok = c.status == "ok"
    # a cost the method's records could not give (qcard.methods.from_model) is the FP32 model's: not shown
    no_records = (q.model_extra or {}).get("layer_records") == "missing"
    d = c.deployment
    flat = {**flat_params(c, given=True), **flat_params(c)} if params else {}
    return Row(
        card=letter, status=c.status, id=c.id, model=c.model.ref, method=c.method.name,
        label=c.method.label or c.method.name, method_family=c.method.family, experiment=c.experiment,
        w_bits=q.weights.bits if ok else None, a_bits=q.activations.bits if ok else None,
        granularity=q.weights.granularity if ok else None,
        group_size=q.weights.group_size if ok and q.weights.granularity == "per_group" else None,
        a_granularity=q.activations.granularity if ok else None,
        bn=q.batch_norm if ok else None,
        first_w_bits=q.first_layer.weight_bits if ok else None, first_a_bits=q.first_layer.activation_bits if ok else None,
        last_w_bits=q.last_layer.weight_bits if ok else None, last_a_bits=q.last_layer.activation_bits if ok else None,
        residual=q.residual_add if ok else None,
        calibration=range_images(c, "size") if ok else None,
        params={k: flat[k] for k in params if k in flat}, swept=list(swept),
        fp32=r.fp32, quantized=r.quantized, std=r.std, delta=r.delta, n_runs=r.n_runs,
        **{k: None if no_records else getattr(cost, k) for k in COST_KEYS},
        profile=cost.profile, dataset=c.dataset.ref, eval_size=c.dataset.eval_size,
        path=str(lc.path) if lc.path else None, created=created(c) or None,
        error=(c.error or "failed (no message recorded)") if not ok else None,
        **_interval_keys("ci95", r.ci95), **_interval_keys("fp32_ci95", r.fp32_ci95),
        **_interval_keys("delta_ci95", r.delta_ci95),
        runtime=d.runtime if d is not None and ok else None,
        runtime_status=d.status if d is not None else None,
        runtime_top1=d.top1 if d is not None else None,
        runtime_agreement_informative=d.agreement_informative if d is not None and ok else None,
        reproducible=bool(c.provenance.git_commit) and not c.provenance.git_dirty,
        point_index=point_index(c),
    )


def _interval_keys(name: str, iv: Optional[Tuple[float, float]]) -> Dict[str, Optional[float]]:
    return {f"{name}_lo": iv[0] if iv else None, f"{name}_hi": iv[1] if iv else None}


# ---------------------------------------------------------------------------
# the cost profile the cost columns read
# ---------------------------------------------------------------------------

def cost_in(card: Card, profile: str) -> Optional[Any]:
    """The card's cost block under `profile` (its main one or one of cost_profiles), or None."""
    if card.cost.profile == profile:
        return card.cost
    return card.cost_profiles.get(profile)


def choose_profile(cards: Sequence[Card], x: str, profile: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(profile to read the cost from, a note saying why), None meaning each card's main cost block.
    A named profile must be on every card that ran. Otherwise an axis that needs a hardware model
    (energy, latency) is read from the first profile every card has it in, when the main one lacks it."""
    ran = [c for c in cards if c.status == "ok"]
    if profile is not None:
        lacking = [c for c in ran if cost_in(c, profile) is None]
        if lacking:
            have = sorted({n for c in ran for n in [c.cost.profile, *c.cost_profiles] if n})
            raise QcardError(f"cost profile '{profile}' is not on {len(lacking)} of {len(ran)} cards "
                             f"(e.g. {lacking[0].id[:10]}); profiles on these cards: {', '.join(have) or 'none'}")
        return profile, f"cost from profile {profile} (--profile)"
    key, _, needs_hw = X_AXES[x]
    if not needs_hw or not ran or all(is_number(getattr(c.cost, key)) for c in ran):
        return None, ""
    names: List[str] = []
    for c in ran:
        names += [n for n in [c.cost.profile, *c.cost_profiles] if n and n not in names]
    for name in names:
        blocks = [cost_in(c, name) for c in ran]
        if all(b is not None and is_number(getattr(b, key)) for b in blocks):
            main = sorted({str(c.cost.profile) for c in ran})
            return name, (f"cost from profile {name}: the cards' main profile ({', '.join(main)}) "
                          f"gives no {X_AXES[x][1].split(' (')[0]} (choose with --profile NAME)")
    return None, ""


def with_profile(lc: LoadedCard, profile: Optional[str]) -> LoadedCard:
    """The card with its cost block read from `profile` (failed cards keep theirs)."""
    if profile is None or lc.card.status != "ok":
        return lc
    return LoadedCard(lc.path, lc.card.model_copy(update={"cost": cost_in(lc.card, profile)}))


# ---------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------

def pareto_front(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> List[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal accuracy,
    one of them strictly). Points without both values are left out. Sorted by cost."""
    pts = [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys)) if is_number(x) and is_number(y)]
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best, best_x = [], -math.inf, None
    for x, y, i in pts:
        if y > best:
            front.append(i)
            best, best_x = y, x
        elif y == best and x == best_x:      # an exact tie with the last point on the front
            front.append(i)
    return front
