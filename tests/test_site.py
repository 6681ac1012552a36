"""`qcard site`: the gallery's pages parse as strict HTML, every link resolves inside the site, every
string from a card is escaped for its context, marks and intervals are those of compare, and the output
folder is guarded. The same site in a real browser: tests/test_site_browser.py."""
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from click.testing import CliRunner

from qcard.cards.compare import compare_cards, load_cards
from qcard.cli import main
from qcard.errors import QcardError
from qcard.site import build_site
from qcard.site.build import CSP, href

ROOT = Path(__file__).parent.parent
PUBLISHED = ROOT / "cards" / "quickstart"
# the published quickstart cards this site is made of (by folder prefix: their ids change when they are remade)
QUICKSTART = ("resnet8__fp32__", "resnet8__W8A8__", "resnet8__W4A8-minmax__", "mobilenet_tiny__fp32__",
              "mobilenet_tiny__W8A8__")
HOSTILE_LABEL = "</script><img src=x onerror=alert(1)>"
HOSTILE_DESCRIPTION = 'javascript:alert(1) <a href="javascript:alert(2)">click</a> & "quotes"'
HOSTILE_EXPERIMENT = '"><svg onload=alert(3)>'
HOSTILE_ERROR = "RuntimeError: <b>boom</b> javascript:alert(4)"


def _published(prefix: str) -> Path:
    found = sorted(PUBLISHED.glob(prefix + "*"))
    assert found, f"no published card folder {prefix}* under {PUBLISHED}"
    return found[0]


def make_runs(tmp: Path) -> Path:
    """runs/quickstart/: five published cards; runs/evil/: a card whose label, description and experiment
    are markup and script, and a failed card whose error is markup."""
    runs = tmp / "runs"
    for prefix in QUICKSTART:
        src = _published(prefix)
        (runs / "quickstart" / src.name).mkdir(parents=True)
        shutil.copyfile(src / "card.json", runs / "quickstart" / src.name / "card.json")
    data = json.loads((_published("resnet8__W4A8-minmax__") / "card.json").read_text())
    data["method"]["label"] = HOSTILE_LABEL
    data["description"] = HOSTILE_DESCRIPTION
    data["experiment"] = HOSTILE_EXPERIMENT
    data["id"] = "e" * 64
    (runs / "evil" / "hostile").mkdir(parents=True)
    (runs / "evil" / "hostile" / "card.json").write_text(json.dumps(data))
    failed = json.loads((_published("resnet8__fp32__") / "card.json").read_text())
    failed.update(status="failed", error=HOSTILE_ERROR, experiment=HOSTILE_EXPERIMENT, cost={}, method_stats={},
                  results={"metric": "top1", "seeds": [0]}, deployment=None)
    failed["id"] = "f" * 64
    (runs / "evil" / "failed").mkdir(parents=True)
    (runs / "evil" / "failed" / "card.json").write_text(json.dumps(failed))
    return runs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    runs = make_runs(tmp)
    summary = build_site(load_cards([runs]), tmp / "site")
    return summary


class Links(HTMLParser):
    """Every link and resource of a page, and its script elements."""
    def __init__(self):
        super().__init__()
        self.refs, self.scripts, self.csp = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.refs.append((tag, key, a[key]))
        if tag == "script":
            self.scripts.append(a)
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp.append(a.get("content"))


def _links(page: Path) -> Links:
    p = Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def test_every_page_parses_as_strict_html(site):
    html5lib = pytest.importorskip("html5lib")
    pages = sorted(site.out.rglob("*.html"))
    # index + 2 experiments + 7 cards
    assert len(pages) == len(site.pages) == 10
    for page in pages:
        try:
            html5lib.HTMLParser(strict=True).parse(page.read_text(encoding="utf-8"))
        except Exception as exc:     # html5lib raises ParseError with the position
            pytest.fail(f"{page.relative_to(site.out)}: not strict HTML: {exc}")


def test_the_checker_refuses_broken_html():
    html5lib = pytest.importorskip("html5lib")
    with pytest.raises(Exception):
        html5lib.HTMLParser(strict=True).parse("<!DOCTYPE html><html><head><title>x</title></head><body>"
                                               "<p>a</b></body></html>")


def test_every_link_stays_inside_the_site_and_resolves(site):
    for page in site.out.rglob("*.html"):
        for tag, key, ref in _links(page).refs:
            if tag == "img" and ref.startswith("data:image/png;base64,"):   # a card page's own plots
                continue
            parts = urlsplit(ref)
            assert parts.scheme == "" and not parts.netloc, f"{page}: {tag} {key}={ref[:80]!r} leaves the site"
            if not parts.path:          # an anchor on the same page
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page.relative_to(site.out)}: {ref} does not exist"
            assert site.out.resolve() in target.parents
            if parts.fragment:
                assert f'id="{parts.fragment}"' in target.read_text(encoding="utf-8"), ref


def test_scripts_only_from_files_under_a_strict_csp(site):
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    for page in site.out.rglob("*.html"):
        links = _links(page)
        assert links.csp, f"{page}: no Content-Security-Policy"
        script_src = [d for d in links.csp[0].split(";") if d.strip().startswith(("script-src", "default-src"))]
        assert script_src and all("unsafe" not in d for d in script_src), links.csp
        for s in links.scripts:      # no inline script anywhere: each has a src, our own file
            assert s.get("src", "").endswith("assets/site.js"), f"{page}: inline or foreign script {s}"
    index = _links(site.out / "index.html")
    assert len(index.scripts) == 1


def test_hostile_strings_render_as_text(site):
    escaped_label = "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    index = (site.out / "index.html").read_text(encoding="utf-8")
    assert escaped_label in index and HOSTILE_LABEL not in index
    assert "&lt;svg onload=alert(3)&gt;" in index and "<svg" not in index
    pages = list(site.out.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "<img src=x" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
        assert not re.search(r"""(href|src)\s*=\s*["']?\s*javascript:""", text, re.I), page
        assert "<b>boom</b>" not in text
    evil = [p for p in pages if "hostile" in str(p)]
    assert len(evil) == 1
    card_page = evil[0].read_text(encoding="utf-8")
    assert escaped_label in card_page
    assert "javascript:alert(1) &lt;a href=&#34;javascript:alert(2)&#34;&gt;click&lt;/a&gt; &amp; &#34;quotes&#34;" \
        in card_page
    exp_pages = list(site.out.glob("experiments/*onload*/index.html"))
    assert len(exp_pages) == 1 and "RuntimeError: &lt;b&gt;boom&lt;/b&gt; javascript:alert(4)" in exp_pages[0].read_text()
    # the experiment's folder name is made of safe characters only
    for folder in (site.out / "experiments").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", folder.name), folder.name


def test_href_refuses_script_and_data_urls():
    for bad in ("javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)", "java\tscript:alert(1)",
                "data:text/html,<script>alert(1)</script>", "vbscript:x"):
        with pytest.raises(QcardError, match="refusing to write a link"):
            href(bad)
    assert href("cards/a b/index.html#card-1") == "cards/a%20b/index.html#card-1"
    assert href("https://example.org/x?a=1") == "https://example.org/x?a=1"


def test_rows_carry_compares_marks_and_intervals(site):
    """Each quickstart row's top-1 cell and 'vs ref' cell say what compare's JSON says for that card."""
    runs = list((site.out / "cards").glob("quickstart/*/card.json"))
    comparison = json.loads(compare_cards(load_cards(runs)).export("json"))
    by_letter = {r["card"]: r for r in comparison["cards"]}
    index = (site.out / "index.html").read_text(encoding="utf-8")
    tested = 0
    for r in comparison["cards"]:
        row = re.search(rf'<tr id="card-quickstart--[^"]*"[^>]*data-id="{r["id"]}"[^>]*>(.*?)</tr>', index, re.S)
        assert row, f"card {r['id'][:10]} is not on the index"
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]
        top1 = f"{r['quantized']:.2f} [{r['ci95_lo']:.1f}, {r['ci95_hi']:.1f}]"
        if r["p_adjusted"] is not None:
            tested += 1
            mark = "" if r["significant"] else "≈ "
            assert mark + top1 in cells, (cells, r)
            ref = by_letter[r["ref"]]
            m = r["family_size"]
            assert any(c.startswith(f"{ref['model']} · {ref['label']}: ") and c.endswith(f"({m} test{'s' if m != 1 else ''})")
                       for c in cells), (cells, ref["label"], m)
        else:
            assert top1 in cells and not any(c.startswith("≈") for c in cells)
        assert f'data-top1="{float(r["quantized"])!r}"' in row.group(0)
    assert tested == 3       # W8A8 and W4A8 of resnet8, W8A8 of mobilenet_tiny, each against its FP32 card


def test_card_pages_link_their_json_and_comparison(site):
    page = next(p for p in site.out.glob("cards/quickstart/resnet8__W8A8__*/index.html"))
    text = page.read_text(encoding="utf-8")
    assert 'href="card.json"' in text and "Quantization card" in text
    assert (page.parent / "card.json").read_bytes() == (_published("resnet8__W8A8__") / "card.json").read_bytes()
    assert f'experiments/quickstart/index.html#card-quickstart--{page.parent.name}' in text
    exp = (site.out / "experiments" / "quickstart" / "index.html").read_text(encoding="utf-8")
    assert "pareto.svg" in exp and (site.out / "experiments" / "quickstart" / "pareto.svg").is_file()
    assert "Confounding differences" in exp and "Published figures" not in exp
    assert (site.out / "experiments" / "quickstart" / "comparison.json").is_file()


def test_cli_writes_and_replaces_a_site_but_not_another_folder(tmp_path):
    runs = tmp_path / "runs"
    src = _published("resnet8__W8A8__")
    (runs / src.name).mkdir(parents=True)
    shutil.copyfile(src / "card.json", runs / src.name / "card.json")
    out = tmp_path / "site"
    r = CliRunner().invoke(main, ["site", str(runs), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 card(s), 1 experiment(s)" in r.output and (out / "index.html").is_file()
    (out / "stale.html").write_text("old")
    r = CliRunner().invoke(main, ["site", str(runs), "-o", str(out)])      # a site qcard wrote: replaced whole
    assert r.exit_code == 0, r.output
    assert not (out / "stale.html").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["site", str(runs), "-o", str(other)])
    assert r.exit_code == 2 and "is not a site qcard wrote" in r.output
    assert (other / "notes.txt").read_text() == "keep me"
    inside = runs / "site"          # a site inside the runs it shows: its card copies are not read back
    for _ in range(2):
        r = CliRunner().invoke(main, ["site", str(runs), "-o", str(inside)])
        assert r.exit_code == 0 and "1 card(s)" in r.output, r.output
    r = CliRunner().invoke(main, ["site", str(tmp_path / "nothing"), "-o", str(tmp_path / "s2")])
    assert r.exit_code == 2 and "no such card file or run folder" in r.output


def test_published_reference_rows_where_they_apply(tmp_path):
    """A torchvision resnet18 card on ImageNet gets the published rows for resnet18 (reported, apart from
    the measured table); the quickstart's MNIST models have none, and their pages show no such table."""
    fixture = ROOT / "tests" / "fixtures" / "cards" / "ptq_w4a8_resnet18.json"
    out = build_site(load_cards([fixture]), tmp_path / "site").out
    page = next(out.glob("experiments/*/index.html")).read_text(encoding="utf-8")
    published = compare_cards(load_cards([fixture]), reference=True).reference_rows
    assert published and "Published figures (reported, not measured here)" in page
    for r in published:
        assert f"<td>{r['source']}</td>" in page and f'<td class="r">{r["top1"]:.2f}</td>' in page
        assert r["citation"] in page
    html5lib = pytest.importorskip("html5lib")
    html5lib.HTMLParser(strict=True).parse(page)
