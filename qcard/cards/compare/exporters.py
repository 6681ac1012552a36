"""The one list of export formats: Comparison.export and the CLI's --format choices both read it. Each
format is one module of this package with `export(cmp, **options) -> str`, imported when used (csv
needs nothing heavy, but html and tex need Jinja)."""
from __future__ import annotations

import importlib
from typing import Callable

from ...errors import QcardError

# format -> (module, what it is); md, tex and html put values into words, csv and json carry raw values + ids
EXPORTERS = {
    "md": ("md", "Markdown: differences, table, legend"),
    "csv": ("csv", "one row per card, raw values"),
    "tex": ("tex", "a LaTeX table float that fits a column (--columns, --width)"),
    "json": ("json", "everything, raw values and ids"),
    "html": ("html", "an HTML fragment: differences, table, legend"),
}


def exporter(fmt: str) -> Callable[..., str]:
    if fmt not in EXPORTERS:
        raise QcardError(f"unknown export format '{fmt}'; allowed: {', '.join(EXPORTERS)}")
    return importlib.import_module(f"{__package__}.{EXPORTERS[fmt][0]}").export
