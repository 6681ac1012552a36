"""`qcard compare --format html`: the comparison as an HTML fragment (autoescaped) for a page to embed."""
from __future__ import annotations

from typing import Any

from ..render import environment
from .display import context


def export(cmp: Any) -> str:
    return environment("html").get_template("compare.html.j2").render(**context(cmp))
