"""Put cards side by side: one table row per card, the confounding differences named in plain words
above it, the accuracy/cost Pareto front, exports (Markdown, CSV, LaTeX, JSON, HTML).

    from qcard.cards.compare import load_cards, compare_cards
    cmp = compare_cards(load_cards(["runs/exp"]))
    cmp.differences      # ["per-channel vs per-tensor weights", "calibration 1024 vs 256 images", ...]
    cmp.rows             # one typed Row per card shown, values as the cards store them (per_channel, ...)
    cmp.table            # the same as a pandas DataFrame
    cmp.pareto           # row indices on the accuracy/cost front
    cmp.significance     # each row against its reference row (paired outcomes of all seeds, BH per family)
    cmp.failed, cmp.superseded   # failed cards (one short section) and cards a later one of the same point replaced
    cmp.export("tex", columns=["card", "label", "quantized"], width="\\textwidth")

One module per job: load (finding, ordering, superseded cards), rows (the typed rows, cost profile, Pareto
front), differences (confounders, method choices, swept parameters), significance, runtime, words and
display (the only places values become words), comparison (compare_cards), and one module per export
format listed in exporters.EXPORTERS (md, csv, tex, json, html) plus plot.

pandas is imported on first use of Comparison.table, once per process: no export needs it.
"""
from .comparison import INT_COLUMNS, Comparison, compare_cards
from .differences import CONFOUNDERS, METHOD_FIELDS, Field, swept_params
from .exporters import EXPORTERS
from .load import CARD_FILE, LoadedCard, config_order, find_card_files, load_card, load_cards, superseded
from .rows import REFERENCE_COLUMNS, X_AXES, Row, choose_profile, pareto_front
from .runtime import runtime_cell, runtime_gaps
from .significance import DEFAULT_FAMILY, FAMILIES, Significance, significance
from .words import card_letter, fmt_p

__all__ = ["CARD_FILE", "CONFOUNDERS", "DEFAULT_FAMILY", "EXPORTERS", "FAMILIES", "INT_COLUMNS", "METHOD_FIELDS",
           "REFERENCE_COLUMNS", "X_AXES", "Comparison", "Field", "LoadedCard", "Row", "Significance", "card_letter",
           "choose_profile", "compare_cards", "config_order", "find_card_files", "fmt_p", "load_card", "load_cards",
           "pareto_front", "runtime_cell", "runtime_gaps", "significance", "superseded", "swept_params"]
