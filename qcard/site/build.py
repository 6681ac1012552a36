"""`qcard site`: a static gallery of cards that works from file:// and any static host.

SITE/
  index.html                      every card: sortable, filterable (model, method, bits, status)
  assets/site.css, site.js        the only style and script (the pages' CSP allows nothing inline)
  experiments/<exp>/index.html    the comparison: confounders, table with marks, legend, Pareto plot, reference rows
  experiments/<exp>/comparison.md, comparison.json, pareto.svg (or .png)
  cards/<exp>/<point>/index.html  the card's own HTML page (qcard.cards.render) with the gallery's links
  cards/<exp>/<point>/card.json   the card file itself
  qcard-site.json                 what was built (marks the folder as a qcard site, so a rebuild may replace it)

Marks and intervals come from one comparison per experiment (qcard.cards.compare), read in
qcard.site.rows.significance_by_id. The site is built in a temporary folder beside SITE and moved into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence
from urllib.parse import quote, urlsplit

import jinja2

from ..cards.compare import compare_cards
from ..cards.render import DASH, render_card
from ..cards.schema import Card
from ..errors import QcardError
from ..version import __version__
from .rows import Row, Tested, card_name, make_row, read_comparison

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
ASSETS = HERE / "assets"
MARKER = "qcard-site.json"

# scripts and styles from the site's own files only; images from its files (plots) and data: URIs (the
# card pages' plots); nothing fetched, no forms posted, no <base> rewritten
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; "
       "form-action 'none'")

# a card the comparison leaves out of its rows (a failed card, or one superseded by a later card of its
# point): no test, and shown after the compared rows
NOT_COMPARED = Tested(order=1 << 30)
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
SAFE_SCHEMES = ("", "http", "https")


def href(url: str) -> str:
    """A link target checked for its context: a relative path or an http(s) URL, percent-encoded where it
    must be. Anything else (javascript:, data:, vbscript:) is refused: every link on the site is built here."""
    url = str(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in SAFE_SCHEMES or url.strip() != url or any(ord(ch) < 32 for ch in url):
        raise QcardError(f"refusing to write a link to {url!r}: only relative paths and http(s) URLs are linked")
    return quote(url, safe="/#:?=&%.-_~")


def slug(text: str, taken: set) -> str:
    """A folder name from a user's string ([A-Za-z0-9._-]), unique among `taken` (which it joins)."""
    base = _SLUG.sub("-", text).strip("-.") or "item"
    name, n = base[:80], 2
    while name.lower() in taken:
        name = f"{base[:76]}-{n}"
        n += 1
    taken.add(name.lower())
    return name


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["href"] = href
    return env


@dataclass
class Experiment:
    name: str
    slug: str
    page: str                                   # relative to the site root
    description: Optional[str] = None
    rows: List[Row] = field(default_factory=list)
    differences: List[str] = field(default_factory=list)
    method_differences: List[str] = field(default_factory=list)
    legend: List[str] = field(default_factory=list)
    read_first: List[str] = field(default_factory=list)
    failed: List[Dict[str, str]] = field(default_factory=list)
    plot: Optional[str] = None                  # file name beside the page
    plot_note: str = ""
    x_label: str = "bops"                      # the cost axis (compare --x)
    reference: List[Dict[str, str]] = field(default_factory=list)
    reference_note: str = ""
    reference_runtime: List[Dict[str, str]] = field(default_factory=list)   # real-engine figures, apart


@dataclass
class SiteSummary:
    out: Path
    pages: List[Path]
    cards: int
    experiments: int


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _anchor(place: str) -> str:
    """The element id of a card's row: its folder on the site (cards/EXP/POINT), which is unique."""
    return "card-" + place.split("/", 1)[1].replace("/", "--")


def _card_page(card_html: str, nav: str) -> str:
    """The card's own page with the gallery's links at the top of its body."""
    if card_html.count("<body>") != 1:
        raise QcardError("the card's HTML page has no single <body> tag to put the gallery's links under")
    return card_html.replace("<body>", "<body>\n" + nav, 1)


def _plot(comparison: Any, folder: Path) -> tuple:
    """(the Pareto plot's file name beside the experiment page, or None; why not). SVG where compare writes
    one, else its PNG; the other files it writes (PDF) are left beside it for download."""
    try:
        written = [Path(p) for p in comparison.plot(folder / "pareto")]
    except QcardError as exc:
        return None, str(exc)
    for suffix in (".svg", ".png"):
        for p in written:
            if p.suffix.lower() == suffix:
                return p.name, ""
    return None, "the plot was written in no format a browser shows (" + ", ".join(p.name for p in written) + ")"


def _reference_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    return [{"source": str(r.get("source")), "dataset": str(r.get("dataset")), "model": str(r.get("model")),
             "method": str(r.get("method")), "bits": f"W{r.get('w_bits')}A{r.get('a_bits')}",
             "fp32": _num(r.get("fp32")), "top1": _num(r.get("top1")), "delta": _num(r.get("delta"), "+"),
             "citation": str(r.get("citation") or "")}
            for r in rows]


def _num(v: Any, sign: str = "") -> str:
    return DASH if v is None else f"{float(v):{sign}.2f}"


def _facets(rows: Sequence[Row]) -> List[Dict[str, Any]]:
    def values(key):
        return sorted({r.data[key] for r in rows}, key=lambda v: (v.lower(), v))
    return [{"key": "model", "title": "model", "choices": values("model")},
            {"key": "method", "title": "method", "choices": values("method")},
            {"key": "bits", "title": "bits", "choices": values("bits")},
            {"key": "status", "title": "status", "choices": values("status")},
            {"key": "experiment", "title": "experiment", "choices": values("experiment")}]


def build_site(loaded: Sequence[Any], out: Path, prepare: Optional[Callable[[Card], Card]] = None,
               title: str = "Quantization cards", log: Callable[[str], None] = lambda m: None) -> SiteSummary:
    """Write the gallery of `loaded` (qcard.cards.compare.LoadedCard: card + its file) into `out`.
    prepare: applied to each card before its page is rendered (the CLI hands methods' sections to old cards).
    `out` must be missing, empty, or a site an earlier build wrote (it is replaced whole)."""
    out = Path(out)
    if not loaded:
        raise QcardError("no cards to put on the site")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise QcardError(f"{out}: exists and is not a site qcard wrote (no {MARKER}); give an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _build(loaded, tmp, prepare or (lambda c: c), title, log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        os.chmod(out, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SiteSummary(out=out, pages=[out / p.relative_to(tmp) for p in summary.pages], cards=summary.cards,
                       experiments=summary.experiments)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _build(loaded: Sequence[Any], root: Path, prepare: Callable[[Card], Card], title: str,
           log: Callable[[str], None]) -> SiteSummary:
    env = environment()
    groups: Dict[str, List[Any]] = {}
    for lc in loaded:
        groups.setdefault(lc.card.experiment, []).append(lc)
    taken: set = set()
    experiments: List[Experiment] = []
    card_places: List[tuple] = []      # (loaded card, its folder relative to root, its experiment)
    for name, members in groups.items():
        s = slug(name, taken)
        exp = Experiment(name=name, slug=s, page=f"experiments/{s}/index.html",
                         description=next((lc.card.description for lc in members if lc.card.description), None))
        folders: set = set()
        for lc in members:
            c = lc.card
            stem = lc.path.parent.name if lc.path is not None and lc.path.name == "card.json" else \
                f"{c.model.ref}__{c.method.label or c.method.name}__{c.id[:10]}"
            card_places.append((lc, f"cards/{s}/{slug(stem, folders)}", exp))
        experiments.append(exp)
    names = {lc.card.id: card_name(lc.card) for lc in loaded}

    for exp in experiments:
        members = [p for p in card_places if p[2] is exp]
        folder = root / "experiments" / exp.slug
        folder.mkdir(parents=True)
        log(f"experiment {exp.name}: {len(members)} card(s)")
        comparison = compare_cards([lc for lc, _, _ in members], reference=True)
        view = read_comparison(comparison)
        _write(folder / "comparison.md", comparison.export("md"))
        _write(folder / "comparison.json", comparison.export("json"))
        exp.differences = list(comparison.differences)
        exp.method_differences = view.method_differences
        exp.read_first = list(comparison.read_first())
        exp.legend = view.legend
        exp.x_label = view.x
        exp.failed = [{"name": names.get(lc.card.id, lc.card.id), "error": lc.card.error or "failed (no message)"}
                      for lc, _, _ in members if lc.card.status != "ok"]
        exp.plot, exp.plot_note = _plot(comparison, folder)
        exp.reference = _reference_rows(view.reference)
        exp.reference_note = view.reference_note if exp.reference else ""
        exp.reference_runtime = _reference_rows(view.reference_runtime)
        for lc, place, _ in members:
            exp.rows.append(make_row(lc.card, f"{place}/index.html", _anchor(place), exp.page,
                                     view.tested.get(str(lc.path) if lc.path else lc.card.id, NOT_COMPARED),
                                     names))
        exp.rows.sort(key=lambda r: r.tested.order)      # compare's order (the config's), letters A, B, ...
    common = dict(csp=CSP, version=__version__, experiments=experiments, n_cards=len(loaded))
    pages: List[Path] = []

    for lc, place, exp in card_places:
        depth = "../" * place.count("/") + "../"
        nav = env.get_template("card_nav.html.j2").render(root=depth, experiment=exp.name,
                                                         experiment_page=exp.page, anchor=_anchor(place))
        page = root / place / "index.html"
        _write(page, _card_page(render_card(prepare(lc.card), "html"), nav))
        # the card file as it was read (byte for byte), or as the loaded card says when it came from no file
        data = lc.path.read_bytes() if lc.path is not None else lc.card.to_json().encode("utf-8")
        (root / place / "card.json").write_bytes(data)
        pages.append(page)

    for exp in experiments:
        page = root / exp.page
        _write(page, env.get_template("experiment.html.j2").render(e=exp, root="../../", **common))
        pages.append(page)

    rows = [r for exp in experiments for r in exp.rows]
    index = root / "index.html"
    _write(index, env.get_template("index.html.j2").render(
        title=title, rows=rows, root="", facets=_facets(rows), n_failed=sum(r.card.status != "ok" for r in rows),
        **common))
    pages.insert(0, index)
    (root / "assets").mkdir()
    for asset in sorted(ASSETS.iterdir()):
        shutil.copyfile(asset, root / "assets" / asset.name)
    _write(root / MARKER, json.dumps({"qcard_version": __version__, "cards": [lc.card.id for lc in loaded],
                                      "experiments": [e.name for e in experiments]}, indent=2) + "\n")
    return SiteSummary(out=root, pages=pages, cards=len(loaded), experiments=len(experiments))
