"""What differs between the cards, in plain words: the confounding differences (every setting other than
the method's own choice; Garg et al., Confounding Tradeoffs for Neural Network Quantization, 2021) and the
method's own choices, and the method parameters swept among the rows.

What counts as a confounder: every setting on the card other than the method's own choice. The method's
own choices are its name, family, label, params and pipeline, and what those decide inside the quantizer:
rounding (nearest/AdaRound/...), weight and activation range setting, cross-layer equalization, bias
correction and the mixed-precision policy (allowed bits). Those are reported separately as
`method_differences`. Everything else that differs — bit widths, granularity, symmetry, first/last layers,
BN, residuals, calibration data, FP32 baseline, weights, evaluation data, preprocessing, cost profile,
software versions, and the environment (CPU, GPU, torch threads, qcard commit, uncommitted changes) ... —
is a confounding difference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..schema import Card
from .words import (BN_WORDS, RESIDUAL_WORDS, bits_word, compact, edge, granularity_text, group_text,
                    show_groups, vs, words)


@dataclass
class Field:
    name: str                                   # dotted card key(s), for JSON and docs
    get: Callable[[Card], Any]                   # hashable value
    text: Callable[[Any], str]                   # value -> words
    say: Union[str, Callable[[List[str], List[str]], str]]   # "{vs} weights" or a function(values, groups)
    skip_if: Tuple[str, ...] = ()               # don't say it when one of these fields differs (it follows)
    texts: Optional[Callable[[List[Any]], List[str]]] = None   # all distinct values -> words at once
    quantized_only: bool = False                # a quantizer detail: FP32 baseline cards (family none) don't have it


def layer_edge(layer) -> str:
    return edge(layer.weight_bits, layer.activation_bits)


def gran(q) -> Any:
    g = q.weights.granularity
    return (g, q.weights.group_size) if g == "per_group" else g


def _gran_text(v: Any) -> str:
    return granularity_text(*v) if isinstance(v, tuple) else granularity_text(v)


def _residual_say(vals: List[str], groups: List[str]) -> str:
    if len(vals) == 2 and "quantized" in vals:
        other = 1 - vals.index("quantized")
        return f"residual adds {vals[other]} in {groups[other]}"
    return "residual adds " + vs(vals, groups, True)


def _pipeline_say(vals: List[str], groups: List[str]) -> str:
    # a pipeline is a paragraph: more than two of them side by side is unreadable
    if len(vals) <= 2:
        return "pipeline " + vs(vals, groups, True)
    return f"{len(vals)} different pipelines (each card lists its own under method.pipeline)"


def range_images(c: Card, key: str) -> Any:
    """A key of the images the card's quantization ranges were set from (cards.render.calibration_roles:
    for QAT its range initialisation, never the training set it also names)."""
    from ..render import calibration_roles
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
        parts = [f"{k} {compact(d[k])}" if k in d else f"no {k}" for k in differing]
        out.append(", ".join(parts) if parts else "same keys")
    return out


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
    Field("dataset.calibration.size", lambda c: range_images(c, "size"),
          lambda v: "no" if v is None else str(v), "calibration {vs} images", quantized_only=True),
    Field("dataset.calibration.split", lambda c: range_images(c, "split"),
          words, "range calibration from {vs} split", skip_if=("dataset.calibration.size",), quantized_only=True),
    Field("dataset.calibration.labels_used", lambda c: range_images(c, "labels_used"),
          lambda v: {True: "with", False: "without", None: "no data, so without"}.get(v, str(v)),
          "calibration {vs} labels", skip_if=("dataset.calibration.size",), quantized_only=True),
    Field("results.metric", lambda c: c.results.metric, str, "different metrics ({vs})"),
    Field("results.fp32", lambda c: None if c.results.fp32 is None else round(c.results.fp32, 4), _fp32_text,
          "different FP32 baselines ({vs})"),
    Field("results.n_runs", lambda c: c.results.n_runs, str, "mean over {vs} runs"),
    Field("quantization.preset", lambda c: c.quantization.preset, words, "backend preset {vs}", quantized_only=True),
    Field("quantization.graph_mode", lambda c: c.quantization.graph_mode, words, "{vs} graph mode", quantized_only=True),
    Field("quantization.weights.bits", lambda c: c.quantization.weights.bits, bits_word, "{vs} weights"),
    Field("quantization.activations.bits", lambda c: c.quantization.activations.bits, bits_word, "{vs} activations"),
    Field("quantization.weights.granularity", lambda c: gran(c.quantization), _gran_text, "{vs} weights", quantized_only=True),
    Field("quantization.activations.granularity", lambda c: c.quantization.activations.granularity, words,
          "{vs} activations", quantized_only=True),
    Field("quantization.weights.symmetric", lambda c: c.quantization.weights.symmetric,
          lambda v: "unknown-grid" if v is None else ("symmetric" if v else "asymmetric"), "{vs} weights", quantized_only=True),
    Field("quantization.activations.symmetric", lambda c: c.quantization.activations.symmetric,
          lambda v: "unknown-grid" if v is None else ("symmetric" if v else "asymmetric"), "{vs} activations", quantized_only=True),
    Field("quantization.weights.signed", lambda c: c.quantization.weights.signed,
          lambda v: "unknown-sign" if v is None else ("signed" if v else "unsigned"), "{vs} weights", quantized_only=True),
    Field("quantization.activations.signed", lambda c: c.quantization.activations.signed,
          lambda v: "unknown-sign" if v is None else ("signed" if v else "unsigned"), "{vs} activations", quantized_only=True),
    Field("quantization.weights.scale_format", lambda c: c.quantization.weights.scale_format, words,
          "{vs} weight scales", quantized_only=True),
    Field("quantization.activations.dynamic", lambda c: c.quantization.activations.dynamic,
          lambda v: "unknown" if v is None else ("dynamic" if v else "static"), "{vs} activation ranges", quantized_only=True),
    Field("quantization.activations.quant_point", lambda c: c.quantization.activations.quant_point,
          lambda v: {"after_activation": "after", "before_activation": "before"}.get(v, "unknown"),
          "activations quantized {vs} the non-linearity", quantized_only=True),
    # first/last layers: said once as "first/last layers" when they move together (see _first_last)
    Field("quantization.batch_norm", lambda c: c.quantization.batch_norm, lambda v: BN_WORDS.get(v, words(v)), "BN {vs}", quantized_only=True),
    Field("quantization.residual_add", lambda c: c.quantization.residual_add, lambda v: RESIDUAL_WORDS.get(v, words(v)),
          _residual_say, quantized_only=True),
    Field("quantization.concat", lambda c: c.quantization.concat, words, "concat {vs}", quantized_only=True),
    Field("quantization.avg_pool", lambda c: c.quantization.avg_pool, words, "average pool {vs}", quantized_only=True),
    Field("quantization.bias_bits", lambda c: c.quantization.bias_bits, bits_word, "{vs} bias", quantized_only=True),
    Field("quantization.accumulator_bits", lambda c: c.quantization.accumulator_bits, bits_word, "{vs} accumulators", quantized_only=True),
    Field("quantization.mixed_precision.enabled", lambda c: bool((c.quantization.mixed_precision or {}).get("enabled")),
          lambda v: "mixed" if v else "uniform", "{vs} precision"),
    Field("quantization.unquantized_layers", _unquantized, _names, "other layers left unquantized: {vs}", quantized_only=True),
    Field("quantization.overrides", lambda c: len(c.quantization.overrides), str, "per-layer overrides {vs}", quantized_only=True),
    Field("cost.profile", lambda c: c.cost.profile, words, "different cost profile ({vs})"),
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
    Field("quantization.weights.rounding", lambda c: c.quantization.weights.rounding, words, "{vs} rounding", quantized_only=True),
    Field("quantization.weights.range_setting", lambda c: c.quantization.weights.range_setting, words,
          "weight ranges {vs}", quantized_only=True),
    Field("quantization.activations.range_setting", lambda c: c.quantization.activations.range_setting, words,
          "activation ranges {vs}", quantized_only=True),
    Field("quantization.cross_layer_equalization", lambda c: bool((c.quantization.cross_layer_equalization or {}).get("applied")),
          lambda v: "with" if v else "without", "{vs} cross-layer equalization", quantized_only=True),
    Field("quantization.bias_correction", lambda c: c.quantization.bias_correction, words, "bias correction {vs}", quantized_only=True),
    Field("quantization.mixed_precision.allowed_bits",
          lambda c: json.dumps((c.quantization.mixed_precision or {}).get("allowed_bits")), lambda v: words(json.loads(v)),
          "allowed bits {vs}", quantized_only=True),
]


def first_last(cards: List[Card], letters: List[str], show: bool) -> List[str]:
    first = [layer_edge(c.quantization.first_layer) for c in cards]
    last = [layer_edge(c.quantization.last_layer) for c in cards]
    if first == last:
        pairs = [("first/last layers", first)]
    else:
        pairs = [("first layer", first), ("last layer", last)]
    out = []
    for name, values in pairs:
        vals, groups = distinct(values, letters)
        if len(vals) > 1:
            out.append(f"{name} {vs(vals, [group_text(g) for g in groups], show)}")
    return out


def distinct(values: List[Any], letters: List[str]) -> Tuple[List[Any], List[List[str]]]:
    order: Dict[Any, List[str]] = {}
    for v, l in zip(values, letters):
        order.setdefault(v, []).append(l)
    return list(order), list(order.values())


def differences(cards: List[Card], letters: List[str], fields: List[Field]) -> Tuple[List[str], List[Dict[str, Any]]]:
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
        vals, groups = distinct(values, [l for _, l in these])
        if len(vals) > 1:
            differing[f.name] = (f, vals, groups)
    show = show_groups(letters)
    out, detail = [], []
    for name, (f, vals, groups) in differing.items():
        if any(s in differing for s in f.skip_if):
            continue
        texts = f.texts(vals) if f.texts else [f.text(v) for v in vals]
        gtext = [group_text(g) for g in groups]
        if len(set(texts)) < len(texts):         # two values that read the same: say them apart
            texts = [f"{w} #{i + 1}" for i, w in enumerate(texts)]
        if callable(f.say):
            sentence = f.say(texts, gtext)
        else:
            sentence = f.say.format(vs=vs(texts, gtext, show))
        out.append(sentence)
        detail.append({"field": name, "text": sentence,
                       "values": [{"value": _jsonable(v), "cards": g} for v, g in zip(vals, groups)]})
    return out, detail


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def param_differences(cards: List[Card], letters: List[str]) -> List[str]:
    """Method params that differ, among cards of the same method (different methods differ anyway)."""
    if len(cards) < 2 or len({c.method.name for c in cards}) > 1:
        return []
    show = show_groups(letters)
    keys: List[str] = []
    for c in cards:
        for k in c.method.params:
            if k not in keys:
                keys.append(k)
    out = []
    for k in keys:
        values = [json.dumps(c.method.params.get(k), sort_keys=True, default=str) for c in cards]
        vals, groups = distinct(values, letters)
        if len(vals) > 1:
            texts = [words(json.loads(v)) for v in vals]
            out.append(f"{k} {vs(texts, [group_text(g) for g in groups], show)}")
    return out


def settings_differ(a: Card, b: Card) -> bool:
    pair = [a, b]
    return bool(differences(pair, ["A", "B"], CONFOUNDERS)[0] or differences(pair, ["A", "B"], METHOD_FIELDS)[0]
                or param_differences(pair, ["A", "B"]) or _edge_text(a) != _edge_text(b))


def _edge_text(c: Card) -> Tuple[str, str]:
    return layer_edge(c.quantization.first_layer), layer_edge(c.quantization.last_layer)




# ---------------------------------------------------------------------------
# swept method parameters: what tells apart rows of the same model, method and label (issue 25 item 2)
# ---------------------------------------------------------------------------

def flat_params(card: Card, given: bool = False) -> Dict[str, Any]:
    """The method's params with nested blocks as dotted keys (train.lr), values as the card stores them;
    given=True: only those the config set (point.config), where the card records them."""
    out: Dict[str, Any] = {}
    params = card.method.params or {}
    if given:
        methods = ((card.point or {}).get("config") or {}).get("methods")
        if isinstance(methods, list) and len(methods) == 1 and isinstance(methods[0], dict):
            params = methods[0].get("params") or {}

    def walk(d: Dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(params, "")
    return out


def swept_params(cards: List[Card]) -> Tuple[List[str], List[List[str]]]:
    """(names of the method parameters that vary among cards of the same model, method and label, in order
    of first appearance; for each card, those that vary within its own group): the axes a sweep expanded,
    which no other column tells apart. Read from the params the config set where the cards record them, so
    a value the method derives from a swept one (a default that follows it) is not a second axis."""
    groups: Dict[Tuple[str, str, str], List[int]] = {}
    flats = [flat_params(c, given=True) for c in cards]
    for k, c in enumerate(cards):
        groups.setdefault((c.model.ref, c.method.name, c.method.label or c.method.name), []).append(k)
    keys: List[str] = []
    own: List[List[str]] = [[] for _ in cards]
    for members in groups.values():
        if len(members) < 2:
            continue
        for name in dict.fromkeys(n for m in members for n in flats[m]):
            if len({json.dumps(flats[m].get(name), sort_keys=True, default=str) for m in members}) > 1:
                if name not in keys:
                    keys.append(name)
                for m in members:
                    own[m].append(name)
    return keys, own
