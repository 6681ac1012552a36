"""Put cards side by side: one table row per card, the confounding differences named in plain words
above it, the accuracy/cost Pareto front, exports (Markdown, CSV, LaTeX, JSON).

    from qcard.cards.compare import load_cards, compare_cards
    cmp = compare_cards(load_cards(["runs/exp"]))
    cmp.differences      # ["per-channel vs per-tensor weights", "calibration 1024 vs 256 images", ...]
    cmp.table            # pandas DataFrame, one row per card (failed cards included, status "failed")
    cmp.pareto           # row indices on the accuracy/cost front
    cmp.significance     # each row against its reference row (paired outcomes of all seeds, BH per family)

Significance: cards with per-sample outcomes (results.outcomes) on the same eval set (fingerprint) are
tested against a reference row (the FP32 card of the same model, or `baseline=` an id prefix), over all
their seeds. Interval, mark and p tell one story: Newcombe's paired interval of the difference and the
p-value of the same procedure, Benjamini–Hochberg within a family of tests (`family=`: table, model or
experiment), the interval shown at the family's Benjamini–Yekutieli level, so it excludes 0 exactly for
the rows not marked "≈". Cards on different eval sets are never tested against each other; cards
without outcomes are not tested.

What counts as a confounder (Garg et al., Confounding Tradeoffs for Neural Network Quantization, 2021): every setting on the card other than the method's own
choice. The method's own choices are its name, family, label, params and pipeline, and what those
decide inside the quantizer: rounding (nearest/AdaRound/...), weight and activation range setting,
cross-layer equalization, bias correction and the mixed-precision policy (allowed bits). Those are
reported separately as `method_differences`. Everything else that differs — bit widths, granularity,
symmetry, first/last layers, BN, residuals, calibration data, FP32 baseline, weights, evaluation data,
preprocessing, cost profile, software versions, and the environment (CPU, GPU, torch threads, qcard
commit, uncommitted changes) ... — is a confounding difference.

pandas is imported on first use of Comparison.table (or CSV export), once per process: Markdown,
LaTeX and JSON exports of 1,000 cards don't need it.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from pydantic import ValidationError

from ..errors import QcardError
from ..quant.qspec import value_text
from .render import environment, fmt_bits_size, fmt_energy, fmt_si
from .schema import Card, card_from_dict

X_AXES = {  # --x name -> (cost key, axis label, needs a hardware model)
    "bops": ("bops", "BOPs", False),
    "size": ("size_bits", "model size (bits)", False),
    "energy": ("energy_pj", "energy (pJ)", True),
    "latency": ("latency_cycles", "latency (cycles)", True),
}
CARD_FILE = "card.json"


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------

@dataclass
class LoadedCard:
    path: Optional[Path]
    card: Card


def find_card_files(paths: Iterable[Union[str, Path]]) -> List[Path]:
    """Card files named directly, plus every card.json under each folder (recursively, sorted).
    The same file reached twice is listed once."""
    out: List[Path] = []
    seen = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                if CARD_FILE in files:
                    found.append(Path(root) / CARD_FILE)
            if not found:
                raise QcardError(f"no {CARD_FILE} found under folder {p}")
            files_here = sorted(found)
        elif p.is_file():
            files_here = [p]
        else:
            raise QcardError(f"no such card file or run folder: {p}")
        for f in files_here:
            key = os.path.normcase(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _load_one(path: Path) -> Card:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QcardError(f"cannot read card {path}: {exc}") from None
    from .evidence import require_evidence
    try:
        # fast path: pydantic parses and validates the JSON bytes in one go
        card = Card.model_validate_json(raw)
    except ValidationError:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise QcardError(f"{path}: not valid JSON ({exc})") from None
        card = card_from_dict(data, str(path))   # older schema versions upgrade here, else a clear error
    require_evidence(card, str(path))    # figures that disagree with the card's own outcomes: refused
    return card


def load_cards(paths: Iterable[Union[str, Path]]) -> List[LoadedCard]:
    """Load card files and run folders (searched recursively for card.json). An unreadable or invalid
    card is an error naming the file; a card whose run failed loads fine (status "failed")."""
    return [LoadedCard(f, _load_one(f)) for f in find_card_files(paths)]


def _as_loaded(items: Sequence[Any]) -> List[LoadedCard]:
    out = []
    for it in items:
        if isinstance(it, LoadedCard):
            out.append(it)
        elif isinstance(it, Card):
            out.append(LoadedCard(None, it))
        elif isinstance(it, dict):
            out.append(LoadedCard(None, card_from_dict(it)))
        elif isinstance(it, (str, Path)):
            out.extend(load_cards([it]))
        else:
            raise TypeError(f"compare_cards takes cards, dicts, LoadedCard or paths, not {type(it).__name__}")
    return out


# ---------------------------------------------------------------------------
# small formatting helpers (plain text)
# ---------------------------------------------------------------------------

def card_letter(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short names for the cards in the text."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _bits(v: Optional[float]) -> str:
    return "FP32" if v is None else f"{v:g}"


def _bits_word(v: Optional[float]) -> str:
    return "FP32" if v is None else f"{v:g}-bit"


def _edge(layer) -> str:
    w, a = layer.weight_bits, layer.activation_bits
    if w is None and a is None:
        return "FP32"
    if w == a:
        return _bits_word(w)
    return f"W{_bits(w)}/A{_bits(a)}"


def _words(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return value_text(v) if isinstance(v, str) else str(v)


# ---------------------------------------------------------------------------
# the fields compared, and how each difference is said
# ---------------------------------------------------------------------------

@dataclass
class Field:
    name: str                                   # dotted card key(s), for JSON and docs
    get: Callable[[Card], Any]                   # hashable value
    text: Callable[[Any], str]                   # value -> words
    say: Union[str, Callable[[List[str], List[str]], str]]   # "{vs} weights" or a function(values, groups)
    skip_if: Tuple[str, ...] = ()               # don't say it when one of these fields differs (it follows)
    texts: Optional[Callable[[List[Any]], List[str]]] = None   # all distinct values -> words at once
    quantized_only: bool = False                # a quantizer detail: FP32 baseline cards (family none) don't have it


def _gran(q) -> Any:
    g = q.weights.granularity
    return (g, q.weights.group_size) if g == "per_group" else g


def _gran_text(v: Any) -> str:
    if isinstance(v, tuple):
        return f"per-group ({v[1]})" if v[1] else "per-group"
    return _words(v)


_BN = {"folded": "folded", "kept": "kept", "qat_static_fold": "statically folded (QAT)",
       "qat_keep_then_fold": "kept in QAT, then folded", "none": "absent"}
_RES = {"quant_all": "quantized", "gemm_inputs_only": "unquantized", "relu_only": "quantized only after ReLU",
        "not_present": "absent"}


def _residual_say(vals: List[str], groups: List[str]) -> str:
    if len(vals) == 2 and "quantized" in vals:
        other = 1 - vals.index("quantized")
        return f"residual adds {vals[other]} in {groups[other]}"
    return "residual adds " + _vs(vals, groups, True)


def _pipeline_say(vals: List[str], groups: List[str]) -> str:
    # a pipeline is a paragraph: more than two of them side by side is unreadable
    if len(vals) <= 2:
        return "pipeline " + _vs(vals, groups, True)
    return f"{len(vals)} different pipelines (each card lists its own under method.pipeline)"


def _range_images(c: Card, key: str) -> Any:
    """A key of the images the card's quantization ranges were set from (cards.render.calibration_roles:
    for QAT its range initialisation, never the training set it also names)."""
    from .render import calibration_roles
    cal = c.dataset.calibration
    ranges, training = calibration_roles(cal.model_dump() if cal else None, c.method.model_dump(), c.method_stats)
    if training is not None and key == "labels_used":
        return (ranges or {}).get("labels_used") or False    # a range initialisation reads images, not labels
    return (ranges or {}).get(key)


def _fp32_text(v: Any) -> str:
    return "none" if v is None else f"{v:.2f}"


def _weights(c: Card) -> Any:
    return (c.model.weights, c.model.weights_sha256)


def _weights_text(v: Any) -> str:
    name, sha = v
    text = name or "random init"
    return text + (f" [{sha[:8]}]" if sha else "")


def _shape(v: Any) -> str:
    return "none" if v is None else "x".join(str(x) for x in v)


def _names(v: Tuple[str, ...]) -> str:
    if not v:
        return "none"
    return ", ".join(v) if len(v) <= 3 else f"{len(v)} layers"


def _prep(c: Card) -> Any:
    p = c.dataset.preprocessing
    return None if not p else json.dumps(p, sort_keys=True, default=str)


def _prep_texts(values: List[Any]) -> List[str]:
    """Name only the preprocessing keys that differ: 'resize 256' vs 'resize 232'."""
    dicts = [json.loads(v) if v else {} for v in values]
    keys = sorted({k for d in dicts for k in d})
    differing = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1]
    out = []
    for d in dicts:
        if not d:
            out.append("none")
            continue
        if len(differing) > 3:   # very different set-ups: name their keys only
            out.append(", ".join(sorted(d)))
            continue
        parts = [f"{k} {_compact(d[k])}" if k in d else f"no {k}" for k in differing]
        out.append(", ".join(parts) if parts else "same keys")
    return out


def _compact(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_compact(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_compact(x)}" for k, x in v.items()) + "}"
    return str(v)


def _unquantized(c: Card) -> Tuple[str, ...]:
    """Names of layers left unquantized, less the first and last layer (said by their own line)."""
    edges = {c.quantization.first_layer.name, c.quantization.last_layer.name} - {None}
    return tuple(sorted(str(u.get("name")) for u in c.quantization.unquantized_layers if u.get("name") not in edges))


def _soft(c: Card) -> Any:
    p = c.provenance
    return tuple((k, getattr(p, k)) for k in ("torch", "torchvision", "timm") if getattr(p, k))


def _soft_text(v: Any) -> str:
    return ", ".join(f"{k} {ver}" for k, ver in v) if v else "unknown"


CONFOUNDERS: List[Field] = [
    Field("model.ref", lambda c: c.model.ref, str, "different models ({vs})"),
    Field("model.weights", _weights, _weights_text, "different weights source ({vs})", skip_if=("model.ref",)),
    Field("model.input_shape", lambda c: tuple(c.model.input_shape) if c.model.input_shape else None, _shape,
          "different input shapes ({vs})"),
    Field("dataset.ref", lambda c: c.dataset.ref, str, "different datasets ({vs})"),
    Field("dataset.eval_split", lambda c: c.dataset.eval_split, str, "different eval splits ({vs})"),
    Field("dataset.eval_size", lambda c: c.dataset.eval_size, lambda v: "unknown" if v is None else f"{v}",
          "different eval size ({vs} images)"),
    Field("dataset.fingerprint", lambda c: c.dataset.fingerprint, lambda v: str(v)[:16] if v else "none",
          "different evaluation data (fingerprints {vs})", skip_if=("dataset.ref", "dataset.eval_size", "dataset.eval_split")),
    Field("dataset.preprocessing", _prep, str, "different preprocessing ({vs})", texts=_prep_texts),
    # the images the ranges were set from: a training method's range initialisation, not its training set
    Field("dataset.calibration.size", lambda c: _range_images(c, "size"),
          lambda v: "no" if v is None else str(v), "calibration {vs} images", quantized_only=True),
    Field("dataset.calibration.split", lambda c: _range_images(c, "split"),
          _words, "range calibration from {vs} split", skip_if=("dataset.calibration.size",), quantized_only=True),
    Field("dataset.calibration.labels_used", lambda c: _range_images(c, "labels_used"),
          lambda v: {True: "with", False: "without", None: "no data, so without"}.get(v, str(v)),
          "calibration {vs} labels", skip_if=("dataset.calibration.size",), quantized_only=True),
    Field("results.metric", lambda c: c.results.metric, str, "different metrics ({vs})"),
    Field("results.fp32", lambda c: None if c.results.fp32 is None else round(c.results.fp32, 4), _fp32_text,
          "different FP32 baselines ({vs})"),
    Field("results.n_runs", lambda c: c.results.n_runs, str, "mean over {vs} runs"),
    Field("quantization.preset", lambda c: c.quantization.preset, _words, "backend preset {vs}", quantized_only=True),
    Field("quantization.graph_mode", lambda c: c.quantization.graph_mode, _words, "{vs} graph mode", quantized_only=True),
    Field("quantization.weights.bits", lambda c: c.quantization.weights.bits, _bits_word, "{vs} weights"),
    Field("quantization.activations.bits", lambda c: c.quantization.activations.bits, _bits_word, "{vs} activations"),
    Field("quantization.weights.granularity", lambda c: _gran(c.quantization), _gran_text, "{vs} weights", quantized_only=True),
    Field("quantization.activations.granularity", lambda c: c.quantization.activations.granularity, _words,
          "{vs} activations", quantized_only=True),
    Field("quantization.weights.symmetric", lambda c: c.quantization.weights.symmetric,
          lambda v: "unknown-grid" if v is None else ("symmetric" if v else "asymmetric"), "{vs} weights", quantized_only=True),
    Field("quantization.activations.symmetric", lambda c: c.quantization.activations.symmetric,
          lambda v: "unknown-grid" if v is None else ("symmetric" if v else "asymmetric"), "{vs} activations", quantized_only=True),
    Field("quantization.weights.signed", lambda c: c.quantization.weights.signed,
          lambda v: "unknown-sign" if v is None else ("signed" if v else "unsigned"), "{vs} weights", quantized_only=True),
    Field("quantization.activations.signed", lambda c: c.quantization.activations.signed,
          lambda v: "unknown-sign" if v is None else ("signed" if v else "unsigned"), "{vs} activations", quantized_only=True),
    Field("quantization.weights.scale_format", lambda c: c.quantization.weights.scale_format, _words,
          "{vs} weight scales", quantized_only=True),
    Field("quantization.activations.dynamic", lambda c: c.quantization.activations.dynamic,
          lambda v: "unknown" if v is None else ("dynamic" if v else "static"), "{vs} activation ranges", quantized_only=True),
    Field("quantization.activations.quant_point", lambda c: c.quantization.activations.quant_point,
          lambda v: {"after_activation": "after", "before_activation": "before"}.get(v, "unknown"),
          "activations quantized {vs} the non-linearity", quantized_only=True),
    # first/last layers: said once as "first/last layers" when they move together (see _first_last)
    Field("quantization.batch_norm", lambda c: c.quantization.batch_norm, lambda v: _BN.get(v, _words(v)), "BN {vs}", quantized_only=True),
    Field("quantization.residual_add", lambda c: c.quantization.residual_add, lambda v: _RES.get(v, _words(v)),
          _residual_say, quantized_only=True),
    Field("quantization.concat", lambda c: c.quantization.concat, _words, "concat {vs}", quantized_only=True),
    Field("quantization.avg_pool", lambda c: c.quantization.avg_pool, _words, "average pool {vs}", quantized_only=True),
    Field("quantization.bias_bits", lambda c: c.quantization.bias_bits, _bits_word, "{vs} bias", quantized_only=True),
    Field("quantization.accumulator_bits", lambda c: c.quantization.accumulator_bits, _bits_word, "{vs} accumulators", quantized_only=True),
    Field("quantization.mixed_precision.enabled", lambda c: bool((c.quantization.mixed_precision or {}).get("enabled")),
          lambda v: "mixed" if v else "uniform", "{vs} precision"),
    Field("quantization.unquantized_layers", _unquantized, _names, "other layers left unquantized: {vs}", quantized_only=True),
    Field("quantization.overrides", lambda c: len(c.quantization.overrides), str, "per-layer overrides {vs}", quantized_only=True),
    Field("cost.profile", lambda c: c.cost.profile, _words, "different cost profile ({vs})"),
    Field("provenance.libraries", _soft, _soft_text, "different software ({vs})"),
    Field("provenance.qcard_version", lambda c: c.provenance.qcard_version, str, "different qcard versions ({vs})"),
    # the environment: the same config gives other last digits on another CPU, thread count or source tree
    Field("provenance.git_commit", lambda c: c.provenance.git_commit, lambda v: v[:10] if v else "unknown",
          "different qcard commits ({vs})"),
    Field("provenance.git_dirty", lambda c: c.provenance.git_dirty,
          lambda v: {True: "with uncommitted changes", False: "clean"}.get(v, "unknown"), "qcard source tree {vs}"),
    Field("provenance.cpu", lambda c: c.provenance.cpu, lambda v: v or "unknown", "different CPUs ({vs})"),
    Field("provenance.gpu", lambda c: c.provenance.gpu, lambda v: v or "none", "different GPUs ({vs})"),
    Field("provenance.torch_threads", lambda c: c.provenance.torch_threads,
          lambda v: "unknown" if v is None else str(v), "torch threads {vs}"),
]


METHOD_FIELDS: List[Field] = [
    Field("method.name", lambda c: c.method.name, str, "method {vs}"),
    Field("method.label", lambda c: c.method.label or c.method.name, str, "label {vs}", skip_if=("method.name",)),
    Field("method.pipeline", lambda c: tuple(c.method.pipeline), lambda v: " → ".join(v) or "none", _pipeline_say,
          skip_if=("method.name",)),
    Field("quantization.weights.rounding", lambda c: c.quantization.weights.rounding, _words, "{vs} rounding", quantized_only=True),
    Field("quantization.weights.range_setting", lambda c: c.quantization.weights.range_setting, _words,
          "weight ranges {vs}", quantized_only=True),
    Field("quantization.activations.range_setting", lambda c: c.quantization.activations.range_setting, _words,
          "activation ranges {vs}", quantized_only=True),
    Field("quantization.cross_layer_equalization", lambda c: bool((c.quantization.cross_layer_equalization or {}).get("applied")),
          lambda v: "with" if v else "without", "{vs} cross-layer equalization", quantized_only=True),
    Field("quantization.bias_correction", lambda c: c.quantization.bias_correction, _words, "bias correction {vs}", quantized_only=True),
    Field("quantization.mixed_precision.allowed_bits",
          lambda c: json.dumps((c.quantization.mixed_precision or {}).get("allowed_bits")), lambda v: _words(json.loads(v)),
          "allowed bits {vs}", quantized_only=True),
]


def _show_groups(letters: List[str]) -> bool:
    """Name the cards behind each value unless there are just A and B (then 'x vs y' reads as A vs B)."""
    return letters != ["A", "B"]


def _group_text(letters: List[str]) -> str:
    return ", ".join(letters) if len(letters) <= 5 else f"{len(letters)} cards"


def _vs(vals: List[str], groups: List[str], show_groups: bool) -> str:
    if show_groups:
        return " vs ".join(f"{v} ({g})" for v, g in zip(vals, groups))
    return " vs ".join(vals)


def _first_last(cards: List[Card], letters: List[str], show: bool) -> List[str]:
    first = [_edge(c.quantization.first_layer) for c in cards]
    last = [_edge(c.quantization.last_layer) for c in cards]
    if first == last:
        pairs = [("first/last layers", first)]
    else:
        pairs = [("first layer", first), ("last layer", last)]
    out = []
    for name, values in pairs:
        vals, groups = _distinct(values, letters)
        if len(vals) > 1:
            out.append(f"{name} {_vs(vals, [_group_text(g) for g in groups], show)}")
    return out


def _distinct(values: List[Any], letters: List[str]) -> Tuple[List[Any], List[List[str]]]:
    order: Dict[Any, List[str]] = {}
    for v, l in zip(values, letters):
        order.setdefault(v, []).append(l)
    return list(order), list(order.values())


def _differences(cards: List[Card], letters: List[str], fields: List[Field]) -> Tuple[List[str], List[Dict[str, Any]]]:
    if len(cards) < 2:
        return [], []
    quantized = [(c, l) for c, l in zip(cards, letters) if c.method.family != "none"]
    differing = {}
    for f in fields:
        these = quantized if f.quantized_only else list(zip(cards, letters))
        if len(these) < 2:
            continue
        try:
            values = [f.get(c) for c, _ in these]
        except Exception:   # a malformed optional block never hides the other differences
            continue
        vals, groups = _distinct(values, [l for _, l in these])
        if len(vals) > 1:
            differing[f.name] = (f, vals, groups)
    show = _show_groups(letters)
    out, detail = [], []
    for name, (f, vals, groups) in differing.items():
        if any(s in differing for s in f.skip_if):
            continue
        words = f.texts(vals) if f.texts else [f.text(v) for v in vals]
        gtext = [_group_text(g) for g in groups]
        if len(set(words)) < len(words):         # two values that read the same: say them apart
            words = [f"{w} #{i + 1}" for i, w in enumerate(words)]
        if callable(f.say):
            sentence = f.say(words, gtext)
        else:
            sentence = f.say.format(vs=_vs(words, gtext, show))
        out.append(sentence)
        detail.append({"field": name, "text": sentence,
                       "values": [{"value": _jsonable(v), "cards": g} for v, g in zip(vals, groups)]})
    return out, detail


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _param_differences(cards: List[Card], letters: List[str]) -> List[str]:
    """Method params that differ, among cards of the same method (different methods differ anyway)."""
    if len(cards) < 2 or len({c.method.name for c in cards}) > 1:
        return []
    show = _show_groups(letters)
    keys: List[str] = []
    for c in cards:
        for k in c.method.params:
            if k not in keys:
                keys.append(k)
    out = []
    for k in keys:
        values = [json.dumps(c.method.params.get(k), sort_keys=True, default=str) for c in cards]
        vals, groups = _distinct(values, letters)
        if len(vals) > 1:
            words = [_words(json.loads(v)) for v in vals]
            out.append(f"{k} {_vs(words, [_group_text(g) for g in groups], show)}")
    return out


# ---------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------

def pareto_front(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> List[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal accuracy,
    one of them strictly). Points without both values are left out. Sorted by cost."""
    pts = [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys)) if _num(x) and _num(y)]
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best, best_x = [], -math.inf, None
    for x, y, i in pts:
        if y > best:
            front.append(i)
            best, best_x = y, x
        elif y == best and x == best_x:      # an exact tie with the last point on the front
            front.append(i)
    return front


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------
# row order (issue 15 item 15)
# ---------------------------------------------------------------------------

def _point_index(card: Card) -> Optional[int]:
    idx = (card.point or {}).get("index")
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else None


def config_order(loaded: Sequence[LoadedCard]) -> List[LoadedCard]:
    """Rows in the config's order when the cards carry point.index: grouped by experiment (in the order
    the experiments first appear), then by index; a card without an index follows the indexed cards of
    its experiment, as given. Cards without any index keep the order given (file order)."""
    indices = [_point_index(lc.card) for lc in loaded]
    if all(i is None for i in indices):
        return list(loaded)
    rank: Dict[str, int] = {}
    for lc in loaded:
        rank.setdefault(lc.card.experiment, len(rank))
    keys = sorted(range(len(loaded)), key=lambda k: (rank[loaded[k].card.experiment], indices[k] is None,
                                                      indices[k] or 0, k))
    return [loaded[k] for k in keys]


# ---------------------------------------------------------------------------
# significance: each row against its reference row, paired on the same images (issue 13 item 3)
# ---------------------------------------------------------------------------

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


def fmt_p(p: float) -> str:
    """A p-value to two significant digits: 0.054, 0.0012, 1.0; below 0.0001, '< 0.0001'."""
    return "< 0.0001" if p < 1e-4 else f"{p:#.2g}"


def _fmt_level(level: float) -> str:
    """99.29 % -> '99.3 %': enough digits to tell the level from 100 % and from its neighbours."""
    for digits in range(1, 6):
        text = f"{100 * level:.{digits}f}"
        if float(text) < 100:
            return text.rstrip("0").rstrip(".") + " %"
    return f"{100 * level:g} %"


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
        whose = "the cards" if len(no_outcomes) == len(ok) else _group_text([letters[k] for k in no_outcomes])
        sig.notes.append(f"no per-sample outcomes on {whose} (written before card schema 2, or without them): "
                         "their differences are not tested for significance")
    if other_data:
        sig.notes.append("not tested: " + ", ".join(f"{letters[i]} vs {letters[j]}" for i, j in other_data[:8])
                         + (f" and {len(other_data) - 8} more" if len(other_data) > 8 else "")
                         + " are on different eval sets (fingerprints differ): a paired test needs the same images")
    unreferenced = [i for i in ok if bits[i] and i not in refs and i not in sig.references and not baseline
                    and cards[i].method.family != "none"]
    if unreferenced:
        sig.notes.append(f"not tested: no FP32 card of the same model for {_group_text([letters[i] for i in unreferenced])}"
                         " (name a reference with --baseline CARD_ID)")
    if not pairs:
        return sig
    from ..stats.intervals import paired_delta_interval, paired_delta_pvalue, per_image
    from ..stats.outcomes import unpack_outcomes
    from ..stats.significance import FDR_Q, benjamini_hochberg, fcr_level
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
                    f"Δ interval at {_fmt_level(level)}" for key, m, r, level in sizes)
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
    return f"the FP32 card of the same model ({_group_text([letters[j] for j in refs])})"


def _settings_differ(a: Card, b: Card) -> bool:
    pair = [a, b]
    return bool(_differences(pair, ["A", "B"], CONFOUNDERS)[0] or _differences(pair, ["A", "B"], METHOD_FIELDS)[0]
                or _param_differences(pair, ["A", "B"]) or _edge_text(a) != _edge_text(b))


def _edge_text(c: Card) -> Tuple[str, str]:
    return _edge(c.quantization.first_layer), _edge(c.quantization.last_layer)


def _within_noise(cards: List[Card], letters: List[str], tests: Dict[int, Dict[str, Any]]) -> List[str]:
    """'within noise: B vs A (p = 0.41, BH-adjusted)' for each tested pair whose settings differ but
    whose accuracies do not, significantly."""
    quiet = [(i, t) for i, t in tests.items() if not t["significant"]]
    lines: List[str] = []
    for k, (i, t) in enumerate(quiet):
        if len(lines) == MAX_WITHIN_NOISE_LINES:    # the table's ≈ marks say the rest (no settings check: fast)
            lines.append(f"within noise: {len(quiet) - k} more rows against their reference (marked ≈ in the table)")
            break
        if _settings_differ(cards[i], cards[t["ref"]]):
            lines.append(f"within noise: {letters[i]} vs {letters[t['ref']]} (p = {fmt_p(t['p_adjusted'])}, "
                         f"BH-adjusted over {t['family_size']} test{'s' if t['family_size'] != 1 else ''})")
    return lines


# ---------------------------------------------------------------------------
# runtime (issue 12) and reproducibility (issue 13 item 4)
# ---------------------------------------------------------------------------

RUNTIME_SHORT = {"onnxruntime": "ORT"}


def _runtime_cell(card: Card) -> Optional[str]:
    d = card.deployment
    if d is None or card.status != "ok":
        return None
    if d.status == "ok":
        short = RUNTIME_SHORT.get(d.runtime, d.runtime)
        return "—" if d.top1 is None else f"{d.top1:.2f} ({short})"
    return {"not_deployable": "not deployable", "failed": "failed"}[d.status]


def _runtime_gaps(cards: List[Card], letters: List[str]) -> List[str]:
    """'simulated vs runtime accuracy: B 98.62 vs 98.40 (onnxruntime)' for cards whose top-1 on the real
    runtime is not the simulated top-1 (at the table's two decimals)."""
    gaps = []
    for c, l in zip(cards, letters):
        d = c.deployment
        if c.status != "ok" or d is None or d.status != "ok" or d.top1 is None:
            continue
        sim = d.top1_simulated if d.top1_simulated is not None else c.results.quantized
        if sim is not None and abs(d.top1 - sim) >= 0.005:
            gaps.append(f"{l} {sim:.2f} vs {d.top1:.2f} ({d.runtime})")
    if not gaps:
        return []
    return ["simulated vs runtime accuracy: " + ", ".join(gaps[:8]) + (f" and {len(gaps) - 8} more" if len(gaps) > 8 else "")]


def _not_reproducible(cards: List[Card], letters: List[str]) -> List[str]:
    bad = [l for c, l in zip(cards, letters) if c.provenance.git_dirty or not c.provenance.git_commit]
    if not bad:
        return []
    return [f"not reproducible from a commit: {_group_text(bad)} (made from a source tree with uncommitted "
            "changes, or no git commit on the card)"]


# ---------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------

REFERENCE_COLUMNS = ["kind", "source", "dataset", "model", "method", "w_bits", "a_bits", "w_granularity", "fp32", "top1", "delta",
                     "citation"]
INT_COLUMNS = ("calibration", "eval_size", "n_runs")


@dataclass
class Comparison:
    """The result of compare_cards. `table` (a pandas DataFrame, one row per card in input order,
    failed cards included) is built on first use from `rows`, so exports that don't need pandas
    (Markdown, LaTeX, JSON) don't import it."""
    rows: List[Dict[str, Any]]                   # one dict per card: the table's rows
    differences: List[str]                       # confounding differences, plain words
    pareto: List[int]                            # row positions on the accuracy/cost front (x axis below)
    x: str = "bops"
    method_differences: List[str] = field(default_factory=list)
    difference_details: List[Dict[str, Any]] = field(default_factory=list)
    failed: List[Dict[str, Any]] = field(default_factory=list)     # {card, path, model, label, error}
    reference_rows: Optional[List[Dict[str, Any]]] = None    # published rows ("reported"), None when not asked
    reference_note: str = ""
    cards: List[LoadedCard] = field(default_factory=list)
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
            df = pd.DataFrame(self.rows, columns=list(self.rows[0]) if self.rows else None)
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

    # exports ---------------------------------------------------------------
    def to_markdown(self) -> str:
        return environment("md").get_template("compare.md.j2").render(**self._context())

    def to_latex(self) -> str:
        return environment("tex").get_template("compare.tex.j2").render(**self._context())

    def to_csv(self) -> str:
        """The measured table; with reference rows, a second table follows after a '# reported' line."""
        text = _csv(self.rows, list(self.rows[0]) if self.rows else [])
        if self.reference_rows:
            text += "\n# reported: published figures from qcard/cards/literature.yaml, not measured here\n"
            text += _csv(self.reference_rows, REFERENCE_COLUMNS)
        return text

    def to_json(self) -> str:
        clean = lambda rows: [{k: _clean(v) for k, v in r.items()} for r in rows]
        data = {"x": self.x, "profile": self.profile, "differences": self.differences, "difference_details": self.difference_details,
                "method_differences": self.method_differences,
                "pareto": [self.rows[i]["card"] for i in self.pareto],
                "cards": clean(self.rows), "failed": self.failed,
                "significance": self._significance_json(), "notes": self.notes, "read_first": self.read_first(),
                "reference": clean(self.reference_rows) if self.reference_rows is not None else None}
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    def _significance_json(self) -> Dict[str, Any]:
        sig, card = self.significance, lambda i: self.rows[i]["card"]
        return {"legend": sig.legend, "notes": sig.notes, "within_noise": sig.within_noise, "family": sig.family,
                "references": [card(j) for j in sig.references],
                "tests": [{"card": card(i), "ref": card(t["ref"]), "n": t["n"], "seeds": t["seeds"],
                           "only_card_correct": t["b"], "only_ref_correct": t["c"], "delta": t["delta"],
                           "p": t["p"], "p_adjusted": t["p_adjusted"], "significant": t["significant"],
                           "family": t["family"], "family_size": t["family_size"],
                           "interval_level": t["level"], "delta_interval": [t["lo"], t["hi"]]}
                          for i, t in sig.tests.items()]}

    def export(self, fmt: str) -> str:
        makers = {"md": self.to_markdown, "csv": self.to_csv, "tex": self.to_latex, "json": self.to_json}
        if fmt not in makers:
            raise QcardError(f"unknown export format '{fmt}'; allowed: {', '.join(makers)}")
        return makers[fmt]()

    def plot(self, path: Union[str, Path]) -> List[Path]:
        """Accuracy against the x axis with the Pareto front: writes PATH.png and PATH.pdf."""
        from .plots import pareto_plot
        key, label, needs_hw = X_AXES[self.x]
        ok = [i for i, r in enumerate(self.rows) if r["status"] == "ok" and _num(r[key]) and _num(r["quantized"])]
        if not ok:
            raise QcardError(f"no card has both an accuracy and cost.{key}; nothing to plot against --x {self.x}"
                             + (" (profiles without a hardware model give no energy or latency; name one that has "
                                "them with --profile NAME, or try --x bops or size)"
                                if needs_hw else ""))
        points = [{"label": f"{self.rows[i]['card']} {self.rows[i]['label']}", "x": float(self.rows[i][key]),
                   "y": float(self.rows[i]["quantized"]),
                   "err": float(self.rows[i]["std"]) if _num(self.rows[i]["std"]) else None,
                   "ci": ((float(self.rows[i]["ci95_lo"]), float(self.rows[i]["ci95_hi"]))
                          if _num(self.rows[i]["ci95_lo"]) and _num(self.rows[i]["ci95_hi"]) else None),
                   "model": self.rows[i]["model"]} for i in ok]
        pos = {i: n for n, i in enumerate(ok)}
        front = [pos[i] for i in self.pareto if i in pos]
        profiles = sorted({str(self.rows[i]["profile"]) for i in ok if self.rows[i]["profile"]})
        if needs_hw and profiles:
            label += f", profile {', '.join(profiles)}"
        title = "accuracy vs cost" + (" (cards differ in confounding settings)" if self.differences else "")
        return pareto_plot(points, front, label, Path(path), title=title)

    def _context(self) -> Dict[str, Any]:
        _, xlabel, _ = X_AXES[self.x]
        cols = _display_columns(self.rows)
        front = set(self.pareto)
        rows = [{"cells": [_display(r, c) for c, _, _ in cols], "pareto": i in front, "failed": r["status"] != "ok"}
                for i, r in enumerate(self.rows)]
        ref_rows, sources = [], {}
        for r in self.reference_rows or []:
            ref_rows.append([r["source"], r["dataset"], r["model"], r["method"], f"W{r['w_bits']}A{r['a_bits']}",
                             _words(r["w_granularity"]), f"{r['fp32']:.2f}", f"{r['top1']:.2f}", f"{r['delta']:+.2f}"])
            sources[r["source"]] = r["citation"]
        return {"n": len(self.rows), "n_ok": sum(r["status"] == "ok" for r in self.rows),
                "differences": self.differences, "method_differences": self.method_differences,
                "columns": [(h, a) for _, h, a in cols], "rows": rows,
                "pareto_cards": [self.rows[i]["card"] for i in self.pareto], "x_label": xlabel, "x": self.x,
                "failed": self.failed, "reference_rows": ref_rows, "reference_sources": sources,
                "reference_requested": self.reference_rows is not None, "reference_note": self.reference_note,
                "profile_note": self.profile_note, "within_noise": self.significance.within_noise,
                "notes": self.significance.notes + self.notes, "legend": self._legend(),
                "read_first": self.read_first()}

    def read_first(self) -> List[str]:
        """What a reader must see before the table: cards whose FP32 baseline or eval set makes their
        accuracies meaningless (cards.render.chance_notes), each said once with the cards it holds for."""
        from .render import chance_notes
        said: Dict[str, List[str]] = {}
        for r, lc in zip(self.rows, self.cards):
            if lc.card.status == "ok":
                for line in chance_notes(lc.card.results.model_dump(mode="json"), lc.card.dataset.eval_size):
                    said.setdefault(line, []).append(r["card"])
        return [f"{_group_text(letters)}: {line}" for line, letters in said.items()]

    def _legend(self) -> List[str]:
        """Lines below the table that say what its marks mean."""
        out = list(self.significance.legend)
        if any(r["ci95_lo"] is not None or r["fp32_ci95_lo"] is not None or
               (r["delta_ci95_lo"] is not None and r["delta_vs_ref"] is None) for r in self.rows):
            untested = " and on the Δ of untested rows" if self.significance.tests else ""
            out.append(f"[lo, hi] on FP32 and quantized{untested}: the card's own 95 % interval (results.ci_method)")
        from ..cost.profile import speedup_definition
        defined = {}
        for lc in self.cards:     # what "speedup vs FP32" means, per profile the column reads (issue 22)
            cost = _cost_in(lc.card, self.profile) if self.profile and lc.card.status == "ok" else lc.card.cost
            words = speedup_definition(cost.model_dump(mode="json")) if cost is not None else None
            if words:
                defined.setdefault(f"speedup vs FP32 ({cost.profile}): {words}", None)
        out += list(defined)
        if any(r["runtime_status"] == "ok" for r in self.rows):
            out.append("runtime: top-1 of the same quantized model on a real integer runtime (ORT: onnxruntime), "
                       "same images")
        return out


def _csv(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    import csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if _missing(r.get(c)) else _csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


# a text cell a spreadsheet would run as a formula (labels, paths and errors come from users' files)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(v: Any) -> Any:
    """Numbers as they are; text that starts like a formula gets a leading ' so it stays text."""
    if isinstance(v, str) and v.startswith(_FORMULA_STARTS):
        return "'" + v
    return v


def _clean(v: Any) -> Any:
    if _missing(v) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if hasattr(v, "item"):       # numpy scalars
        v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
    return v


# table column -> (display header, alignment); the DataFrame keeps raw values, displays format them
_DISPLAY = [
    ("card", "card", "l"), ("model", "model", "l"), ("method", "method", "l"), ("label", "label", "l"),
    ("wa", "W/A bits", "l"), ("granularity", "W granularity", "l"), ("bn", "BN", "l"),
    ("first_last", "first/last", "l"), ("residual", "residual adds", "l"), ("calibration", "calibration", "r"),
    ("fp32", "FP32", "r"), ("quantized", "quantized", "r"), ("delta", "Δ", "r"), ("vs_ref", "vs ref (BH p)", "l"),
    ("runtime_cell", "runtime", "r"),
    ("bops", "BOPs", "r"), ("size_bits", "size", "r"), ("energy_pj", "energy", "r"),
    ("latency_cycles", "latency (cycles)", "r"), ("speedup_vs_fp32", "speedup vs FP32", "r"), ("profile", "profile", "l"),
]


def _display_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """Display columns; a cost column that no card fills is left out (e.g. energy under a bitops profile)."""
    cols = []
    for key, head, align in _DISPLAY:
        if key in ("energy_pj", "latency_cycles", "speedup_vs_fp32") and all(_missing(r.get(key)) for r in rows):
            continue
        if key == "runtime_cell" and not any(r.get("runtime_status") == "ok" for r in rows):
            continue     # a runtime column only where a deploy check ran on some card
        if key == "vs_ref" and all(r.get("p_adjusted") is None for r in rows):
            continue
        cols.append((key, head, align))
    return cols


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return type(v).__name__ == "NAType"      # pandas.NA in nullable integer columns


def _display(r: Dict[str, Any], key: str) -> str:
    missing = _missing
    if key == "wa":
        if r["status"] != "ok":
            return "—"
        w, a = _nan_none(r["w_bits"]), _nan_none(r["a_bits"])
        return "FP32" if w is None and a is None else f"W{_bits(w)}A{_bits(a)}"
    if key == "quantized":
        if r["status"] != "ok":
            return "FAILED"
        if missing(r["quantized"]):
            return "—"
        text = f"{r['quantized']:.2f}"
        if r.get("ci95_lo") is not None:      # the interval says more than ± std over seeds
            text += _interval_text(r, "ci95", "")
        elif not missing(r["std"]):
            text += f" ± {r['std']:.2f}"
        return ("≈ " if r.get("significant") is False else "") + text
    if key == "vs_ref":
        if r.get("p_adjusted") is not None:
            m = r["family_size"]
            return f"{r['ref']}: {fmt_p(r['p_adjusted'])} ({m} test{'s' if m != 1 else ''})"
        return "ref" if r.get("is_reference") else "—"
    if key == "runtime_cell":
        return r.get("runtime_cell") or "—"
    v = r[key]
    if missing(v):
        return "—"
    if key in ("fp32",):
        return f"{v:.2f}" + _interval_text(r, "fp32_ci95", "")
    if key == "delta":
        if r.get("delta_vs_ref") is not None:      # tested: against the reference, at its family's level
            return f"{r['delta_vs_ref']:+.2f}" + _interval_text(r, "delta_vs_ref", "+")
        return f"{v:+.2f}" + _interval_text(r, "delta_ci95", "+")
    if key == "bops":
        return fmt_si(float(v))
    if key == "size_bits":
        return fmt_bits_size(float(v)).split(" (")[-1].rstrip(")")
    if key == "energy_pj":
        return fmt_energy(float(v))
    if key == "latency_cycles":
        return fmt_si(float(v))
    if key == "speedup_vs_fp32":
        return f"{v:.2f}×"
    if key == "calibration":
        return f"{int(v):,}"
    return str(v)


def _interval_text(r: Dict[str, Any], name: str, sign: str) -> str:
    """' [97.9, 99.3]' (sign '+': ' [-0.3, +0.7]'), or '' when the card has no such interval."""
    lo, hi = r.get(f"{name}_lo"), r.get(f"{name}_hi")
    if _missing(lo) or _missing(hi):
        return ""
    return f" [{_limit(lo, sign)}, {_limit(hi, sign)}]"


def _limit(v: float, sign: str) -> str:
    """One decimal, but a limit that would round to 0 keeps two significant digits (-0.046, not -0.0):
    whether an interval excludes 0 must still be readable."""
    text = f"{v:{sign}.1f}"
    if v != 0 and float(text) == 0:
        text = f"{v:{sign}.2g}"
    return text


def _nan_none(v: Any) -> Any:
    return None if _missing(v) else v


def _row(letter: str, lc: LoadedCard) -> Dict[str, Any]:
    c = lc.card
    q, r, cost = c.quantization, c.results, c.cost
    ok = c.status == "ok"
    return {
        "card": letter, "status": c.status, "model": c.model.ref, "method": c.method.name,
        "label": c.method.label or c.method.name, "family": c.method.family,
        "w_bits": q.weights.bits if ok else None, "a_bits": q.activations.bits if ok else None,
        "granularity": _gran_text(_gran(q)) if ok and q.weights.granularity else None,
        "a_granularity": _words(q.activations.granularity) if ok and q.activations.granularity else None,
        "bn": _BN.get(q.batch_norm, q.batch_norm) if ok else None,
        "first_last": f"{_edge(q.first_layer)} / {_edge(q.last_layer)}" if ok else None,
        "residual": _RES.get(q.residual_add, q.residual_add) if ok else None,
        "calibration": _range_images(c, "size") if ok else None,     # range-setting images (QAT: its init)
        "fp32": r.fp32, "quantized": r.quantized, "std": r.std, "delta": r.delta, "n_runs": r.n_runs,
        # a cost the method's records could not give (qcard.methods.from_model) is the FP32 model's: not shown
        **{k: None if (q.model_extra or {}).get("layer_records") == "missing" else getattr(cost, k)
           for k in ("bops", "size_bits", "energy_pj", "latency_cycles", "speedup_vs_fp32")},
        "profile": cost.profile,
        "dataset": c.dataset.ref, "eval_size": c.dataset.eval_size, "experiment": c.experiment, "id": c.id,
        "path": str(lc.path) if lc.path else None,
        # 95 % intervals where the card has them (schema 2)
        **_interval_keys("ci95", r.ci95), **_interval_keys("fp32_ci95", r.fp32_ci95),
        **_interval_keys("delta_ci95", r.delta_ci95),
        # the real runtime (card.deployment), where a deploy check ran
        "runtime_status": c.deployment.status if c.deployment is not None else None,
        "runtime_top1": c.deployment.top1 if c.deployment is not None else None,
        "runtime_cell": _runtime_cell(c),
        # significance against the reference row: filled by compare_cards (Δ and its interval at the
        # family's FCR-adjusted level, in points)
        "ref": None, "p_value": None, "p_adjusted": None, "significant": None, "is_reference": False,
        "family": None, "family_size": None, "interval_level": None,
        "delta_vs_ref": None, "delta_vs_ref_lo": None, "delta_vs_ref_hi": None,
        "reproducible": bool(c.provenance.git_commit) and not c.provenance.git_dirty,
        "point_index": _point_index(c),
    }


def _interval_keys(name: str, iv: Optional[Tuple[float, float]]) -> Dict[str, Optional[float]]:
    return {f"{name}_lo": iv[0] if iv else None, f"{name}_hi": iv[1] if iv else None}


def _cost_in(card: Card, profile: str) -> Optional[Any]:
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
        lacking = [c for c in ran if _cost_in(c, profile) is None]
        if lacking:
            have = sorted({n for c in ran for n in [c.cost.profile, *c.cost_profiles] if n})
            raise QcardError(f"cost profile '{profile}' is not on {len(lacking)} of {len(ran)} cards "
                             f"(e.g. {lacking[0].id[:10]}); profiles on these cards: {', '.join(have) or 'none'}")
        return profile, f"cost from profile {profile} (--profile)"
    key, _, needs_hw = X_AXES[x]
    if not needs_hw or not ran or all(_num(getattr(c.cost, key)) for c in ran):
        return None, ""
    names: List[str] = []
    for c in ran:
        names += [n for n in [c.cost.profile, *c.cost_profiles] if n and n not in names]
    for name in names:
        blocks = [_cost_in(c, name) for c in ran]
        if all(b is not None and _num(getattr(b, key)) for b in blocks):
            main = sorted({str(c.cost.profile) for c in ran})
            return name, (f"cost from profile {name}: the cards' main profile ({', '.join(main)}) "
                          f"gives no {X_AXES[x][1].split(' (')[0]} (choose with --profile NAME)")
    return None, ""


def _with_profile(lc: LoadedCard, profile: Optional[str]) -> LoadedCard:
    """The card with its cost block read from `profile` (failed cards keep theirs)."""
    if profile is None or lc.card.status != "ok":
        return lc
    return LoadedCard(lc.path, lc.card.model_copy(update={"cost": _cost_in(lc.card, profile)}))


def compare_cards(cards: Sequence[Any], x: str = "bops", reference: Union[bool, str] = False,
                  profile: Optional[str] = None, baseline: Optional[str] = None,
                  family: str = DEFAULT_FAMILY) -> Comparison:
    """Compare cards (Card, dict, LoadedCard or paths). x: the Pareto cost axis (bops|size|energy|latency).
    reference: False, "matching" (or True: published rows for the models among the cards) or "all".
    profile: the cost profile to read cost from (default: each card's main one, or for energy and
    latency the first profile that has them; `Comparison.profile_note` says which).
    baseline: an id prefix of the card every other row is tested against (default: the FP32 card of the
    same model). family: the Benjamini–Hochberg family, "table", "model" (default) or "experiment".
    Rows follow the config's order when the cards carry point.index (config_order)."""
    if x not in X_AXES:
        raise QcardError(f"unknown cost axis '{x}'; allowed: {', '.join(X_AXES)}")
    originals = config_order(_as_loaded(cards))
    if not originals:
        raise QcardError("no cards to compare")
    profile, profile_note = choose_profile([lc.card for lc in originals], x, profile)
    loaded = [_with_profile(lc, profile) for lc in originals]
    letters = [card_letter(i) for i in range(len(loaded))]
    rows = [_row(l, lc) for l, lc in zip(letters, loaded)]
    key = X_AXES[x][0]
    ok_idx = [i for i, lc in enumerate(loaded) if lc.card.status == "ok"]
    ok_cards = [loaded[i].card for i in ok_idx]
    ok_letters = [letters[i] for i in ok_idx]
    diffs, details = _differences(ok_cards, ok_letters, CONFOUNDERS)
    fl = _first_last(ok_cards, ok_letters, _show_groups(ok_letters)) if len(ok_cards) > 1 else []
    # keep the order of the spec: first/last right after the grid settings
    at = next((i for i, d in enumerate(details) if d["field"] in ("quantization.batch_norm", "quantization.residual_add")),
              len(diffs))
    diffs[at:at] = fl
    details[at:at] = [{"field": "quantization.first_layer/last_layer", "text": t, "values": []} for t in fl]
    mdiffs, _ = _differences(ok_cards, ok_letters, METHOD_FIELDS)
    mdiffs += _param_differences(ok_cards, ok_letters)
    ran = set(ok_idx)
    xs = [rows[i][key] if i in ran else None for i in range(len(rows))]
    front = pareto_front(xs, [r["quantized"] for r in rows])
    on = set(front)
    for i, r in enumerate(rows):
        r["pareto"] = i in on
    sig = significance([lc.card for lc in loaded], letters, ok_idx, baseline, family)
    for i, t in sig.tests.items():
        rows[i].update(ref=letters[t["ref"]], p_value=t["p"], p_adjusted=t["p_adjusted"], significant=t["significant"],
                       family=t["family"], family_size=t["family_size"], interval_level=t["level"],
                       delta_vs_ref=t["delta"], delta_vs_ref_lo=t["lo"], delta_vs_ref_hi=t["hi"])
    for j in sig.references:
        rows[j]["is_reference"] = True
    runtime = _runtime_gaps(ok_cards, ok_letters)
    diffs += runtime
    details += [{"field": "deployment.top1", "text": t, "values": []} for t in runtime]
    failed = [{"card": letters[i], "path": rows[i]["path"], "model": rows[i]["model"], "label": rows[i]["label"],
               "error": lc.card.error or "failed (no message recorded)"}
              for i, lc in enumerate(loaded) if lc.card.status != "ok"]
    ref, note = None, ""
    if reference:
        from .reference import card_dataset, model_key, reference_rows
        models = None if reference == "all" else sorted({lc.card.model.ref for lc in loaded})
        # published rows only on the cards' own dataset (all of them with --reference-all, dataset shown)
        ours = sorted({card_dataset(lc.card.dataset.model_dump(mode="json"),
                                    (lc.card.results.chance.num_classes if lc.card.results.chance else None))
                       for lc in loaded})
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
    return Comparison(rows=rows, differences=diffs, pareto=front, x=x, method_differences=mdiffs,
                      difference_details=details, failed=failed, reference_rows=ref, reference_note=note,
                      cards=originals, profile=profile, profile_note=profile_note, significance=sig,
                      notes=_not_reproducible(ok_cards, ok_letters))
