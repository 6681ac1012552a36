"""`qcard compare --format md`: the differences in words, the table, the legend, failed cards."""
from __future__ import annotations

from typing import Any

from ..render import environment
from .display import context


def export(cmp: Any) -> str:
    return environment("md").get_template("compare.md.j2").render(**context(cmp))
