"""Render card.json (the single source of truth) through Jinja template files.

One template per format in templates/: card.md.j2, card.html.j2, card.tex.j2. Every template gets
`card` (the card as a plain dict, card.json's keys) and `view` (the rows every format shows, already
formatted as plain text by `card_view`), so a new format is one new template file. Escaping is the
environment's job, never the template author's: HTML autoescapes, LaTeX escapes every `<< >>`
expression through `finalize`, Markdown escapes with the `cell` / `code` filters.
The HTML format also gets `plots` (see qcard.cards.plots; drawn only for HTML).

A method's own tables and plots are the card's `sections` (Method.card_sections, stored by the
runner); they are rendered as they are, so adding a method needs no edit here. The generic tables
(training curve, per seed) are read from method_stats keys every method may write.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jinja2

from ..errors import QcardError
from ..quant.qspec import value_text
from .deployment import deployment_banner, deployment_tables
from .method_tables import method_tables
from .schema import Card, card_from_dict

TEMPLATES = Path(__file__).parent / "templates"
FORMATS = {"md": "card.md.j2", "html": "card.html.j2", "tex": "card.tex.j2"}
EXTENSIONS = {"md": "md", "html": "html", "tex": "tex"}

DASH = "—"   # a value that does not apply

# ---------------------------------------------------------------------------
# value formatting (plain text; escaping happens later, per format)
# ---------------------------------------------------------------------------


def fmt_bits(v: Any) -> str:
    if v is None:
        return "FP32"
    if isinstance(v, bool):
        return str(v)
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def fmt_num(v: Any, digits: int = 2) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e6:
            return fmt_si(v)
        return f"{v:,.{digits}f}"
    return str(v)


_SI = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"),
       (1e-9, "n"), (1e-12, "p")]


def fmt_si(v: Any, unit: str = "") -> str:
    """1.161e11 -> '116.1 G' (4 significant digits); the unit follows the prefix."""
    if v is None:
        return DASH
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    if v == 0:
        return f"0 {unit}".rstrip()
    for scale, prefix in _SI:
        if abs(v) >= scale:
            break
    x = v / scale
    text = f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{text} {prefix}{unit}".rstrip()


def fmt_energy(pj: Any) -> str:
    """Energy given in picojoules, shown with an SI prefix on joules: 3.99e8 -> '399 µJ'."""
    if pj is None:
        return DASH
    return fmt_si(pj * 1e-12, "J")


def fmt_bits_size(bits: Any) -> str:
    """A size in bits, with bytes in binary units beside it: '46,758,048 bits (5.57 MiB)'."""
    if bits is None:
        return DASH
    b = bits / 8
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= scale:
            return f"{bits:,.0f} bits ({b / scale:.2f} {unit})"
    return f"{bits:,.0f} bits ({b:.0f} B)"


def fmt_value(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) if v else DASH
    return value_text(str(v))


def fmt_pct(v: Any) -> str:
    return DASH if v is None else f"{v:.2f}"


def fmt_delta(v: Any) -> str:
    return DASH if v is None else f"{v:+.2f}"


MINUS = "−"   # U+2212, in intervals: [−0.3, +0.7]


def fmt_interval(iv: Any, signed: bool = False) -> str:
    """' [97.9, 99.3]' (with a leading space), or '' where the card has no interval (v1 cards)."""
    if not iv:
        return ""
    one = (lambda v: f"{v:+.1f}".replace("-", MINUS)) if signed else (lambda v: f"{v:.1f}")
    return f" [{one(iv[0])}, {one(iv[1])}]"


# ---------------------------------------------------------------------------
# escaping, one function per format
# ---------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


def md_cell(v: Any) -> str:
    """Text safe in Markdown (also inside a table cell): punctuation Markdown or HTML would act on is
    backslash-escaped (CommonMark shows it literally), newlines become spaces."""
    return _MD_SPECIAL.sub(r"\\\1", str(v)).replace("\r", " ").replace("\n", " ")


def md_code(v: Any) -> str:
    """An inline code span that survives backticks and table pipes in the value."""
    text = str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_MD_ESCAPED = re.compile(r"\\" + _MD_SPECIAL.pattern)


def md_plain(text: str) -> str:
    """Markdown made by md_cell/md_code as a terminal should show it: the backslash escapes undone."""
    return _MD_ESCAPED.sub(r"\1", text)


_TEX_MAP = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "_": r"\_",
    "%": r"\%", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "|": r"\textbar{}",
    # non-ASCII the renderings use, so the fragment needs no unicode set-up in the paper
    "—": "---", "–": "--", "±": r"$\pm$", "→": r"$\rightarrow$", "×": r"$\times$", "Δ": r"$\Delta$",
    "≥": r"$\geq$", "≤": r"$\leq$", "µ": r"$\mu$", "⚠": r"\textbf{!}", "·": r"$\cdot$", "…": r"\ldots{}",
    "≈": r"$\approx$",   # compare's mark for a difference within noise
}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_MAP))


class TexRaw(str):
    """LaTeX markup a template or filter built on purpose: `finalize` leaves it as is."""


def tex_escape(v: Any) -> str:
    """Text as LaTeX that pdflatex compiles with no unicode set-up: the specials escaped, every other
    non-ASCII character named (accent commands, math symbols) or shown as its code point, [U+91CF]."""
    from .tex_unicode import tex_unicode      # the unicode table, kept beside this module
    if isinstance(v, TexRaw):
        return v
    if v is None:
        return "---"
    text = str(v).replace("\r", " ").replace("\n", " ")
    return tex_unicode(_TEX_RE.sub(lambda m: _TEX_MAP[m.group(0)], text))


_BREAK_AFTER = re.compile(r"(\\_|/|(?<!\\)\.|:)")     # not the dot of an accent command (\\.{z})


def tex_breakable(v: Any) -> TexRaw:
    """tex_escape, with a line break allowed after _ / . : so a long name or path wraps in a narrow column
    instead of running into the margin."""
    return TexRaw(_BREAK_AFTER.sub(lambda m: m.group(0) + "\\allowbreak{}", tex_escape(v)))


# ---------------------------------------------------------------------------
# the view: what every format shows, as plain text rows
# ---------------------------------------------------------------------------

_RESIDUAL = {"quant_all": "quantized (add requantized)", "gemm_inputs_only": "not quantized (only conv/matmul inputs)",
             "relu_only": "skip path unquantized (only after ReLU)", "not_present": "none in this model"}


def _edge(layer: Dict[str, Any]) -> str:
    w, a = layer.get("weight_bits"), layer.get("activation_bits")
    text = "FP32 (not quantized)" if w is None and a is None else f"W {fmt_bits(w)} / A {fmt_bits(a)}"
    return f"{text}, {layer['name']}" if layer.get("name") else text


def _mixed_precision(mp: Dict[str, Any]) -> str:
    if not mp or not mp.get("enabled"):
        base = "no"
    else:
        parts = [f"{mp['granularity']}-wise" if mp.get("granularity") else None,
                 f"allowed bits {fmt_value(mp['allowed_bits'])}" if mp.get("allowed_bits") is not None else None]
        base = "yes (" + "; ".join(p for p in parts if p) + ")" if any(parts) else "yes"
    acc = []
    if mp.get("mean_weight_bits") is not None:
        acc.append(f"mean W bits {mp['mean_weight_bits']:g}")
    if mp.get("mean_activation_bits") is not None:
        acc.append(f"mean A bits {mp['mean_activation_bits']:g}")
    if acc:
        base += "; " + ", ".join(acc) + " (element-weighted over every layer, FP32 ones as 32)"
    if mp.get("max_activation_map_bits") is not None:
        base += f"; largest activation map {fmt_si(mp['max_activation_map_bits'], 'bit')}"
    return base


def _cle(cle: Dict[str, Any]) -> str:
    if not cle or not cle.get("applied"):
        return "no"
    return "yes, with high-bias absorption" if cle.get("bias_absorption") else "yes"


def _preprocessing(p: Optional[Dict[str, Any]]) -> Optional[str]:
    if not p:
        return None
    return ", ".join(f"{k} {fmt_value(v) if not isinstance(v, str) else v}" for k, v in p.items())


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _summary(v: Any) -> str:
    """A nested statistic in a few words: short ones in full, a number series by its range, a table by
    its size and columns (card.json's method_stats holds all of it)."""
    if not v:
        return "none"
    if isinstance(v, dict):
        if len(v) <= 24 and all(_scalar(x) for x in v.values()):
            return fmt_value({k: (f"{x:.4g}" if isinstance(x, float) else x) for k, x in v.items()})
        keys = list(v)
        return f"{len(v)} keys ({', '.join(map(str, keys[:4]))}{', …' if len(keys) > 4 else ''}; in card.json)"
    if all(_scalar(x) for x in v):
        if len(v) <= 8:
            return fmt_value(v)
        nums = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(nums) == len(v):
            return f"{len(v)} values, {min(nums):.4g} … {max(nums):.4g} (first {nums[0]:.4g}, last {nums[-1]:.4g})"
        return f"{len(v)} values: {fmt_value(v[:4])}, …"
    cols = list(v[0]) if isinstance(v[0], dict) else []
    return f"{len(v)} row{'s' if len(v) > 1 else ''}" + (f" of {', '.join(map(str, cols[:5]))}{', …' if len(cols) > 5 else ''}" if cols else "") \
        + " (in card.json)"


def _flat_scalars(d: Any, prefix: str = "", depth: int = 0) -> List[Tuple[str, str]]:
    """(dotted key, value) for the scalar leaves of method_stats, two levels deep; lists and deeper
    dicts are summarized by size so the text stays short (plots show the bulky parts)."""
    out: List[Tuple[str, str]] = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if depth < 1:
                out += _flat_scalars(v, key + ".", depth + 1)
            else:
                out.append((key, _summary(v)))
        elif isinstance(v, list):
            out.append((key, _summary(v)))
        elif isinstance(v, float):
            out.append((key, f"{v:.4g}"))
        else:
            out.append((key, fmt_value(v) if not isinstance(v, str) else v))
    return out


def _subset_words(ds: Dict[str, Any]) -> str:
    """Which images `eval_size: N` took (dataset.split_info.subset), or '' for the whole split."""
    sub = (ds.get("split_info") or {}).get("subset") or {}
    by = f", {sub['chosen_by']}" if sub.get("chosen_by") else ""
    if sub.get("kind") == "first":
        return f" (the first {fmt_num(sub.get('size'))} of the split, in file order{by})"
    if sub.get("kind") == "stratified":
        return f" (a class-stratified sample, seed {fmt_value(sub.get('seed'))}{by})"
    return ""


def _header_rows(c: Dict[str, Any], regime: str) -> List[Tuple[str, str]]:
    r, ds, m = c["results"], c["dataset"], c["method"]
    weights = c["model"].get("weights") or "random initialization (no weights loaded)"
    label = c["model"].get("label")
    shown = f"{c['model']['ref']} ({label})" if label and label != c["model"]["ref"] else c["model"]["ref"]
    header = [("Description", c["description"])] if c.get("description") else []
    header += [
        ("Model", f"{shown} ({fmt_num(c['model'].get('params'))} parameters)"),
        ("Weights", weights + (f" (sha256 {c['model']['weights_sha256'][:12]}…)" if c["model"].get("weights_sha256") else "")),
        ("Dataset", f"{ds['ref']}, split {ds['eval_split']}, {fmt_num(ds.get('eval_size'))} images"
                    + _subset_words(ds)),
    ]
    pre = _preprocessing(ds.get("preprocessing"))
    if pre:
        header.append(("Preprocessing", pre))
    header += [
        (f"FP32 {r['metric']} (this run)", f"{fmt_pct(r.get('fp32'))} %{fmt_interval(r.get('fp32_ci95'))}"),
        ("Method", f"{m['name']} ({fmt_value(m['family'])}), {regime}"
                   + (f": {' → '.join(m['pipeline'])}" if m.get("pipeline") else "")),
        ("Card", f"id {c['id'][:16]}, experiment {c['experiment']}, schema v{c['schema_version']}"),
    ]
    return header


def _wa_rows(w: Dict[str, Any], a: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    sym = lambda v: DASH if v is None else ("symmetric" if v else "asymmetric")
    sign = lambda v: DASH if v is None else ("signed" if v else "unsigned")
    gran = fmt_value(w.get("granularity")) + (f" (group {w['group_size']})" if w.get("group_size") else "")
    wa_rows = [
        ("bits", fmt_bits(w.get("bits")), fmt_bits(a.get("bits"))),
        ("granularity", gran, fmt_value(a.get("granularity"))),
        ("grid", sym(w.get("symmetric")), sym(a.get("symmetric"))),
        ("sign", sign(w.get("signed")), sign(a.get("signed"))),
        ("range setting", fmt_value(w.get("range_setting")), fmt_value(a.get("range_setting"))),
        ("scale format / ranges", fmt_value(w.get("scale_format")),
         DASH if a.get("dynamic") is None else ("dynamic" if a.get("dynamic") else "static")),
        ("rounding / quantization point", fmt_value(w.get("rounding")), fmt_value(a.get("quant_point"))),
    ]
    return wa_rows


NOT_REPORTED = "not reported by the method"

TRAINING_FAMILIES = ("qat", "adaptive_precision_training")


def calibration_roles(cal: Optional[Dict[str, Any]], method: Dict[str, Any],
                      stats: Optional[Dict[str, Any]] = None) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(the images the quantization ranges were set from, the images the method trained on), from the
    card's dataset.calibration. A training method's block is its training split; its ranges started from
    range_init (cards written before it was recorded: method_stats.qat.init_calibration)."""
    if not cal:
        return None, None
    training = cal.get("used_for") == "training" or (
        cal.get("labels_used") is True and (method.get("family") in TRAINING_FAMILIES or method.get("name") == "fp32_train"))
    if not training:
        return cal, None
    ranges = cal.get("range_init") or ((stats or {}).get("qat") or {}).get("init_calibration")
    return ranges, cal


def _images(cal: Dict[str, Any]) -> str:
    return f"{fmt_num(cal.get('size'))} images from {cal.get('split') or DASH}, seed {fmt_value(cal.get('seed'))}"


def _network_rows(q: Dict[str, Any], ds: Dict[str, Any], method: Dict[str, Any],
                  stats: Dict[str, Any]) -> List[Tuple[str, str]]:
    cal = ds.get("calibration")
    ranges, training = calibration_roles(cal, method, stats)
    if training:
        data_rows = [("training data", _images(training)),
                     ("range initialisation", f"{_images(ranges)} (before training)" if ranges else "none (no calibrated ranges)")]
    else:
        data_rows = [("calibration data", _images(cal) if cal else "none used")]
    graph = fmt_value(q.get("graph_mode"))
    if q.get("graph_mode_reason"):
        graph += f" ({q['graph_mode_reason']})"
    # a key the method's block left out (quantization.not_reported) has only the schema's default: not a fact
    unknown = set(q.get("not_reported") or [])
    said = lambda key, text: NOT_REPORTED if key in unknown else text
    network_rows = [
        ("backend preset", fmt_value(q.get("preset"))),
        ("graph mode", said("graph_mode", graph)),
        ("first layer", said("first_layer", _edge(q["first_layer"]))),
        ("last layer", said("last_layer", _edge(q["last_layer"]))),
        ("batch norm", said("batch_norm", fmt_value(q.get("batch_norm")))),
        ("residual adds", said("residual_add", _RESIDUAL.get(q.get("residual_add"), fmt_value(q.get("residual_add"))))),
        ("concat / average pool", said("concat", f"{fmt_value(q.get('concat'))} / {fmt_value(q.get('avg_pool'))}")),
        ("bias / accumulator bits", said("bias_bits", f"{fmt_bits(q.get('bias_bits'))} / {fmt_bits(q.get('accumulator_bits'))}")),
        ("cross-layer equalization", said("cross_layer_equalization", _cle(q.get("cross_layer_equalization") or {}))),
        ("bias correction", said("bias_correction", fmt_value(q.get("bias_correction")))),
        ("mixed precision", said("mixed_precision", _mixed_precision(q.get("mixed_precision") or {}))),
        *data_rows,
        ("labels used", fmt_value(cal.get("labels_used")) if cal else DASH),
        ("per-layer overrides", fmt_value(q.get("overrides"))),
    ]
    return network_rows


def _results_rows(r: Dict[str, Any]) -> List[Tuple[str, ...]]:
    std = f" ± {r['std']:.2f}" if r.get("std") is not None else ""
    seeds = ", ".join(str(s) for s in r.get("seeds") or [])
    # the headline row carries the 95 % intervals where the card has them (v2 cards with outcomes)
    results_rows = [(r["metric"], fmt_pct(r.get("fp32")) + fmt_interval(r.get("fp32_ci95")),
                     fmt_pct(r.get("quantized")) + std + fmt_interval(r.get("ci95")),
                     fmt_delta(r.get("delta")) + fmt_interval(r.get("delta_ci95"), signed=True),
                     f"{r.get('n_runs', 0)} ({seeds})" if seeds else str(r.get("n_runs", 0)))]
    if top5_trivial(r):
        k = r["chance"]["num_classes"]
        results_rows.append(("top5", DASH, DASH, DASH, f"trivially 100 % with {k} classes"))
    elif r.get("top5_fp32") is not None or r.get("top5") is not None:
        d5 = r["top5"] - r["top5_fp32"] if r.get("top5") is not None and r.get("top5_fp32") is not None else None
        results_rows.append(("top5", fmt_pct(r.get("top5_fp32")), fmt_pct(r.get("top5")), fmt_delta(d5), ""))
    return results_rows


def _interval_note(r: Dict[str, Any]) -> Optional[str]:
    """The legend under the results: what the bracketed intervals are (None where there are none)."""
    if not (r.get("ci95") or r.get("delta_ci95")):
        return None
    return "In brackets: " + (r.get("ci_method") or "95 % intervals")


NOT_DERIVED = "not derived: the method returned no per-layer records (every layer counted as FP32)"


def _records_missing(c: Dict[str, Any]) -> bool:
    """The cost could not be read from the quantized model (qcard.methods.from_model): its bit-dependent
    figures are the FP32 model's, so they are not shown as the quantized model's."""
    return (c.get("quantization") or {}).get("layer_records") == "missing"


def _cost_rows(c: Dict[str, Any]) -> List[Tuple[str, str]]:
    from ..cost.profile import speedup_definition
    cost = c["cost"]
    cost_rows: List[Tuple[str, str]] = []
    if cost.get("profile") and _records_missing(c):
        return [("parameters", fmt_num(cost.get("params"))), ("MACs", fmt_num(cost.get("macs"))),
                ("size, BOPs, energy, latency, speedup", NOT_DERIVED)]
    if cost.get("profile"):
        speed = []
        if cost.get("speedup_vs_fp32") is not None:
            speed.append(f"{cost['speedup_vs_fp32']:.2f}× vs FP32")
        if cost.get("speedup_vs_int8") is not None:
            speed.append(f"{cost['speedup_vs_int8']:.2f}× vs INT8")
        cost_rows = [
            ("parameters", fmt_num(cost.get("params"))),
            ("model size", fmt_bits_size(cost.get("size_bits"))),
            ("model size with scales/zero-points", fmt_bits_size(cost.get("size_bits_with_metadata"))),
            ("MACs", fmt_num(cost.get("macs"))),
            ("BOPs (simple / UNIQ)", f"{fmt_si(cost.get('bops'))} / {fmt_si(cost.get('bops_uniq'))}"),
            ("activation peak", fmt_si(cost.get("activation_peak_bits"), "bit")),
            ("memory traffic", fmt_si(cost.get("memory_traffic_bits"), "bit")),
            ("energy", fmt_energy(cost.get("energy_pj"))),
            ("latency", DASH if cost.get("latency_cycles") is None else f"{fmt_si(cost['latency_cycles'])} cycles"),
            (f"speedup ({cost['profile']})", ", ".join(speed) if speed else DASH),
        ]
        defined = speedup_definition(cost)
        if defined:
            cost_rows.append(("speedup means", defined))
        for name, other in (c.get("cost_profiles") or {}).items():
            bits = []
            if other.get("energy_pj") is not None:
                bits.append(f"energy {fmt_energy(other['energy_pj'])}")
            if other.get("latency_cycles") is not None:
                bits.append(f"latency {fmt_si(other['latency_cycles'])} cycles")
            if other.get("speedup_vs_fp32") is not None:
                bits.append(f"{other['speedup_vs_fp32']:.2f}× vs FP32")
            if other.get("speedup_vs_int8") is not None:
                bits.append(f"{other['speedup_vs_int8']:.2f}× vs INT8")
            cost_rows.append((f"on profile {name}", ", ".join(bits) if bits else
                              f"BOPs {fmt_si(other.get('bops'))}, size {fmt_bits_size(other.get('size_bits'))} "
                              "(no energy or latency model)"))
    return cost_rows


def _has_weights(l: Dict[str, Any]) -> bool:
    """A layer with weights of its own (a conv or linear; a weight shared with an earlier layer counts
    its parameters there): an add, a pool or a matmul of two activations has none."""
    return bool(l.get("params")) or str(l.get("op", "")).startswith(("conv", "linear"))


def _layer_table(cost: Dict[str, Any], q: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], List[Dict[str, Any]]]:
    layers = cost.get("layers") or []
    unknown = q.get("layer_records") == "missing"     # no records: the bits below would be defaults
    w_cell = lambda l: "unknown" if unknown else (fmt_bits(l.get("weight_bits")) if _has_weights(l) else DASH)
    a_cell = lambda l: "unknown" if unknown else fmt_bits(l.get("activation_bits"))
    # columns appear only when some layer has the value (a bitops profile has no energy or cycles)
    has = lambda key: any(l.get(key) is not None for l in layers)
    has_eff = any(l.get("effective_activation_bits") is not None
                  and l.get("effective_activation_bits") != l.get("activation_bits") for l in layers)
    layer_cols = [("layer", "l"), ("op", "l"), ("MACs", "r"), ("params", "r"), ("W bits", "r"), ("A bits", "r")]
    if has_eff:
        layer_cols.append(("eff. A bits", "r"))
    layer_cols.append(("BOPs", "r"))
    if has("energy_pj"):
        layer_cols.append(("energy", "r"))
    if has("cycles"):
        layer_cols.append(("cycles", "r"))
    unq = {u.get("name") for u in q.get("unquantized_layers") or []}
    layer_rows = []
    for l in layers:
        row = [l["name"], l["op"], fmt_num(l.get("macs")), fmt_num(l.get("params")), w_cell(l), a_cell(l)]
        if has_eff:
            e = l.get("effective_activation_bits")
            row.append(DASH if e is None else f"{e:.2f}")
        row.append("unknown" if unknown else fmt_si(l.get("bops")))
        if has("energy_pj"):
            row.append("unknown" if unknown else fmt_energy(l.get("energy_pj")))
        if has("cycles"):
            row.append("unknown" if unknown else fmt_si(l.get("cycles")))
        # FP32: a weighted layer whose weights are not quantized, or a weightless op (add, pool) whose
        # activations are not; the cost model writes 32 for FP32 operands
        has_weights = _has_weights(l)
        side = l.get("weight_bits") if has_weights else l.get("activation_bits")
        fp32 = not unknown and (side is None or side >= 32 or l["name"] in unq)
        layer_rows.append({"cells": row, "fp32": fp32})
    return layer_cols, layer_rows


def _environment(p: Dict[str, Any]) -> str:
    env = [f"qcard {p['qcard_version']}"
           + (f" (git {p['git_commit'][:12]}{', uncommitted changes' if p.get('git_dirty') else ''})" if p.get("git_commit") else ""),
           f"Python {p['python']}", f"torch {fmt_value(p.get('torch'))}", f"torchvision {fmt_value(p.get('torchvision'))}",
           f"timm {fmt_value(p.get('timm'))}", f"{p['platform']}"]
    if p.get("cpu"):
        env.append(p["cpu"])
    if p.get("gpu"):
        env.append(p["gpu"])
    env.append(f"seed {fmt_value(p.get('seed'))}" + (", deterministic" if p.get("deterministic") else ""))
    if p.get("wall_seconds") is not None:
        env.append(f"{p['wall_seconds']:.1f} s")
    for r in p.get("resumed") or []:
        stage = f" of {r['stage']}" if r.get("stage") else ""
        env.append(f"seed {r.get('seed')} resumed from the checkpoint{stage} of step {r.get('step')}")
    if p.get("finished_at"):
        env.append(f"finished {p['finished_at']}")
    return "; ".join(env)


SYNTHETIC_NOTE = ("evaluated on synthetic data (random images and random labels): the accuracy is meaningless "
                  "(chance level at best); only the cost and the quantization settings carry information")
TIE_NOTE = "ties between logits break toward the lowest class index (top-1 = argmax)"


def chance_notes(results: Dict[str, Any], eval_size: Any = None) -> List[str]:
    """Why a card's accuracies may say nothing (results.chance, qcard.evaluate.chance_check): the eval
    images are all of one class, FP32 answers one class, or FP32 is at chance. compare says the same."""
    ch = results.get("chance") or {}
    n = f"{eval_size:,} " if isinstance(eval_size, int) else ""
    if ch.get("eval_classes") == 1:
        return [f"the {n}eval images are all of one class: an accuracy on them says nothing about the other "
                f"classes (`eval_subset: first` on a folder sorted by class does this; use `eval_subset: stratified`)"]
    out = []
    if ch.get("one_class") is not None:
        out.append(f"FP32 is right on exactly the images of class {ch['one_class']}: it answers one class for "
                   f"every image (a random-weight or broken model), so no quantized result here can be judged")
    elif ch.get("at_chance"):
        out.append(f"FP32 is at chance: top-1 {fmt_pct(results.get('fp32'))} % where always answering the most "
                   f"common class scores {fmt_pct(ch.get('chance_top1'))} % ({ch.get('eval_classes')} classes); "
                   f"\"≈ FP32\" and Δ mean nothing until the model learns (check its weights)")
    return out


def top5_trivial(results: Dict[str, Any]) -> bool:
    """A model with 5 or fewer classes always has the label among its top 5."""
    k = (results.get("chance") or {}).get("num_classes")
    return k is not None and k <= 5


def _banner(c: Dict[str, Any]) -> List[str]:
    """What a reader must see before the numbers: synthetic data, an uninformative FP32 baseline or eval
    set, the card's warnings, then what the deploy check found."""
    synthetic = (c.get("dataset") or {}).get("ref") == "synthetic"
    out = [SYNTHETIC_NOTE] if synthetic else chance_notes(c.get("results") or {}, (c.get("dataset") or {}).get("eval_size"))
    return out + list(c.get("warnings") or []) + deployment_banner(c)


def _not_used(unused: Dict[str, str]) -> str:
    """'adaround_iters, adaround_reg (no adaround step in minmax); labels (...)': grouped by reason."""
    by: Dict[str, List[str]] = {}
    for k, why in unused.items():
        by.setdefault(str(why), []).append(k)
    return "; ".join(f"{', '.join(ks)} ({why})" for why, ks in by.items())


def card_view(c: Dict[str, Any]) -> Dict[str, Any]:
    """The rows every rendering shows, formatted as plain text (no escaping yet)."""
    q, m, cost = c["quantization"], c["method"], c["cost"]
    w, a = q["weights"], q["activations"]
    label = m.get("label") or m["name"]
    regime = f"W{fmt_bits(w.get('bits'))}A{fmt_bits(a.get('bits'))}" if (w.get("bits") or a.get("bits")) else "FP32"
    layer_cols, layer_rows = _layer_table(cost, q)
    # params the method says this point never read (method_stats.params_not_used: {name: why})
    unused = (c.get("method_stats") or {}).get("params_not_used") or {}
    unused = unused if isinstance(unused, dict) else {}
    unquantized = [(u.get("name", DASH), u.get("op", DASH), u.get("reason") or DASH) for u in q.get("unquantized_layers") or []]
    return {
        "title": f"{c['model']['ref']} · {label}",
        "label": label, "regime": regime, "failed": c["status"] == "failed", "error": c.get("error"),
        "header": _header_rows(c, regime), "flags": list(q.get("hardware_unfriendly") or []),
        "wa_rows": _wa_rows(w, a), "network_rows": _network_rows(q, c["dataset"], m, c.get("method_stats") or {}), "unquantized": unquantized,
        "results_header": ("metric", "FP32", "quantized", "Δ", "runs (seeds)"), "results_rows": _results_rows(c["results"]),
        "interval_note": _interval_note(c["results"]),
        "cost_profile": cost.get("profile"), "cost_rows": _cost_rows(c),
        "layer_cols": layer_cols, "layer_rows": layer_rows,
        "method_stats": _flat_scalars(c.get("method_stats") or {}),
        "method_tables": method_tables(c) + deployment_tables(c),
        "method_params": [(k, fmt_value(v) if not isinstance(v, str) else v) for k, v in (m.get("params") or {}).items()
                          if k not in unused],
        "params_not_used": _not_used(unused),
        "banner": _banner(c), "tie_note": TIE_NOTE,
        "warnings": list(c.get("warnings") or []), "provenance": _environment(c["provenance"]), "reproduce": c["reproduce"],
    }


# ---------------------------------------------------------------------------
# environments and the entry point
# ---------------------------------------------------------------------------

FILTERS = dict(bits=fmt_bits, num=fmt_num, value=fmt_value, cell=md_cell, code=md_code, si=fmt_si,
               energy=fmt_energy, pct=fmt_pct, delta=fmt_delta)


@lru_cache(maxsize=None)
def environment(fmt: str) -> jinja2.Environment:
    common = dict(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    if fmt == "tex":
        # LaTeX is full of { } and %: other delimiters, and every expression escaped on output
        env = jinja2.Environment(block_start_string="<%", block_end_string="%>", variable_start_string="<<",
                                 variable_end_string=">>", comment_start_string="<#", comment_end_string="#>",
                                 finalize=tex_escape, autoescape=False, **common)
        env.filters["raw"] = TexRaw
        env.filters["brk"] = tex_breakable
    else:
        env = jinja2.Environment(autoescape=(fmt == "html"), **common)
    env.filters.update(FILTERS)
    return env


def _as_dict(card: Union[Card, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(card, Card):
        return card.model_dump(mode="json")
    if isinstance(card, dict):
        # validate and fill defaults once, so templates can rely on every key (StrictUndefined)
        return card_from_dict(card).model_dump(mode="json")
    raise TypeError(f"render_card takes a Card or a dict, not {type(card).__name__}")


def render_card(card: Union[Card, Dict[str, Any]], fmt: str = "md") -> str:
    """The card as text in one format: md, html or tex."""
    if fmt not in FORMATS:
        raise QcardError(f"unknown card format '{fmt}'; allowed: {', '.join(FORMATS)}")
    data = _as_dict(card)
    context: Dict[str, Any] = {"card": data, "view": card_view(data)}
    if fmt == "html":
        from .plots import card_plots
        context["plots"] = card_plots(data)
    return environment(fmt).get_template(FORMATS[fmt]).render(**context)
