"""The gallery (`qcard site`) in a real browser: Debian's chromium driven by Playwright (its own browser
download is not used: executable_path). From file://, as a reader opens it: the index, a filter by method,
a sort by top-1, a card link and back; no console message, no page error, no failed request, no dialog.
A card labelled `</script><img src=x onerror=alert(1)>` with `javascript:` in its description renders as
text. Screenshots go to test-artifacts/ (gitignored); docs/gallery.png is one of them, committed.

chromium is found (or installed with apt-get as root) by tests/test_cards_browser.py's fixture; in CI a
missing browser or a missing playwright is a failure (tests/conftest.py)."""
from pathlib import Path

import pytest

from qcard.cards.compare import load_cards
from qcard.site import build_site
from test_cards_browser import chromium  # noqa: F401  (the fixture that finds or installs chromium)
from test_site import HOSTILE_LABEL, make_runs

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("site-browser"))


@pytest.fixture(scope="module")
def site_dir(runs):
    return build_site(load_cards([runs]), runs.parent / "site", title="qcard gallery").out


class Watch:
    """Everything a page says went wrong: console messages of type error/warning (CSP refusals included),
    uncaught exceptions, failed requests, dialogs (an alert() that ran)."""
    def __init__(self, page):
        self.console, self.errors, self.failed, self.dialogs = [], [], [], []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def assert_clean(self):
        assert self.console == [] and self.errors == [] and self.failed == [] and self.dialogs == [], \
            (self.console, self.errors, self.failed, self.dialogs)


@pytest.fixture(scope="module")
def browser(chromium):  # noqa: F811
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _visible(page):
    return page.eval_on_selector_all(
        "#cards tbody tr", "rows => rows.filter(r => !r.hidden).map(r => ({method: r.dataset.method, "
                           "top1: r.dataset.top1, id: r.id}))")


def test_index_filter_sort_follow_and_back(browser, site_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 600})
    watch = Watch(page)
    index = (site_dir / "index.html").resolve().as_uri()
    page.goto(index)
    rows = _visible(page)
    assert len(rows) == 7
    assert page.inner_text("#count") == "7 of 7 cards shown"       # site.js ran

    page.select_option("select[data-filter=method]", "ptq")
    rows = _visible(page)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"ptq"}
    assert page.inner_text("#count") == "4 of 7 cards shown"

    page.click("button[data-sort=top1]")
    tops = [float(r["top1"]) for r in _visible(page)]
    assert len(tops) == 4 and tops == sorted(tops, reverse=True)
    assert page.get_attribute("th:has(button[data-sort=top1])", "aria-sort") == "descending"
    page.click("button[data-sort=top1]")
    tops = [float(r["top1"]) for r in _visible(page)]
    assert tops == sorted(tops)
    page.click("button[data-sort=top1]")             # best first again
    page.select_option("select[data-filter=method]", "")
    # failed cards (no top-1) sort last in both directions
    assert _visible(page)[-1]["top1"] in ("", None)
    page.select_option("select[data-filter=experiment]", "quickstart")
    assert len(_visible(page)) == 5
    page.screenshot(path=str(ARTIFACTS / "site-index.png"))

    first = page.eval_on_selector("#cards tbody tr:not([hidden]) a.card-link", "a => a.getAttribute('href')")
    page.click("#cards tbody tr:not([hidden]) a.card-link")
    page.wait_for_load_state()
    assert page.url.endswith(first) and "Quantization card" in page.inner_text("h1")
    assert page.is_visible("nav.qcard-site a[href='card.json']")
    page.screenshot(path=str(ARTIFACTS / "site-card.png"))
    page.click("nav.qcard-site a[href='card.json']")
    page.wait_for_load_state()
    assert page.url.endswith("/card.json") and '"schema_version"' in page.content()
    page.go_back()
    page.go_back()
    page.wait_for_load_state()
    assert page.url == index and page.is_visible("#cards")
    # the rows shown are still those the filters say (the browser restores the chosen experiment)
    chosen = page.eval_on_selector("select[data-filter=experiment]", "s => s.value")
    shown = _visible(page)
    assert len(shown) == (5 if chosen == "quickstart" else 7)
    assert page.inner_text("#count") == f"{len(shown)} of 7 cards shown"

    page.goto((site_dir / "experiments" / "quickstart" / "index.html").resolve().as_uri())
    assert page.eval_on_selector("figure img", "img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=str(ARTIFACTS / "site-experiment.png"), full_page=True)
    watch.assert_clean()
    page.close()


def test_gallery_of_the_published_cards(browser, runs):
    """The screenshot in the README (docs/gallery.png is this file, reduced to 64 colours): the published
    quickstart cards alone, best top-1 first."""
    out = build_site(load_cards([runs / "quickstart"]), runs.parent / "gallery", title="qcard quickstart cards").out
    page = browser.new_page(viewport={"width": 1500, "height": 470})
    watch = Watch(page)
    page.goto((out / "index.html").resolve().as_uri())
    page.click("button[data-sort=top1]")
    tops = [float(r["top1"]) for r in _visible(page)]
    assert len(tops) == 5 and tops == sorted(tops, reverse=True)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gallery.png"))
    assert (ARTIFACTS / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    watch.assert_clean()
    page.close()


def test_hostile_card_renders_as_text(browser, site_dir):
    page = browser.new_page()
    watch = Watch(page)
    page.goto((site_dir / "index.html").resolve().as_uri())
    # the label is the text of a cell, not an element: no <img src=x> exists, no onerror ran
    assert page.query_selector_all("img[src=x]") == []
    assert any(HOSTILE_LABEL in t for t in page.eval_on_selector_all("#cards td", "tds => tds.map(t => t.textContent)"))
    hostile = next(p for p in (site_dir / "cards").rglob("hostile/index.html"))
    page.goto(hostile.resolve().as_uri())
    assert page.query_selector_all("img[src=x]") == []
    assert HOSTILE_LABEL in page.inner_text("body") and "javascript:alert(1)" in page.inner_text("body")
    assert page.query_selector_all("a[href^='javascript']") == []
    for exp in (site_dir / "experiments").iterdir():
        page.goto((exp / "index.html").resolve().as_uri())
        assert page.query_selector_all("svg, img[src=x], a[href^='javascript']") == []
    watch.assert_clean()
    page.close()


def test_the_watch_catches_a_dialog_and_an_error(browser, tmp_path):
    """Negative control: a page whose script raises and opens an alert is caught by the same checks."""
    (tmp_path / "bad.js").write_text("alert('ran'); undefined_function();")
    (tmp_path / "bad.html").write_text('<!DOCTYPE html><html><head><title>x</title><script src="bad.js"></script>'
                                       '</head><body><img src="missing.png" alt=""></body></html>')
    page = browser.new_page()
    watch = Watch(page)
    page.goto((tmp_path / "bad.html").resolve().as_uri())
    assert watch.dialogs == ["ran"] and any("undefined_function" in e for e in watch.errors)
    assert any("missing.png" in f for f in watch.failed)
    with pytest.raises(AssertionError):
        watch.assert_clean()
    page.close()
