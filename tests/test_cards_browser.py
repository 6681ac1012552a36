"""The HTML card in a real headless browser (Debian's chromium): no console messages (errors, CSP
violations, failed fetches), the key numbers in the page text, and a screenshot written to
test-artifacts/card.png (gitignored) for a person to look at.

Set-up: when chromium is missing, the test installs it with `apt-get install -y chromium` if it runs
as root with apt-get available (set QCARD_NO_APT=1 to forbid that); otherwise it skips and says why.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qcard.cards.render import render_card
from qcard.cards.schema import load_card

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "cards"
ARTIFACTS = ROOT / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def _which():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    path = _which()
    if path:
        return path
    why = None
    if os.environ.get("QCARD_NO_APT") == "1":
        why = "QCARD_NO_APT=1 forbids installing it"
    elif not shutil.which("apt-get"):
        why = "apt-get is not available to install it"
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        why = "installing it with apt-get needs root"
    else:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "-qq", "chromium"],
                    ["sh", "-c", "apt-get update -qq && apt-get install -y -qq chromium"]):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            except subprocess.TimeoutExpired:
                why = "apt-get install chromium timed out"
                continue
            path = _which()
            if path:
                return path
            why = "apt-get install chromium failed: " + (r.stderr or r.stdout).strip()[-300:]
    pytest.skip(f"headless browser test skipped: chromium is not installed and {why}")


def _run(chromium, url, tmp_path, *extra, timeout=90):
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _console_lines(stderr: str):
    # chromium logs every console message (console.error, uncaught exceptions, CSP refusals) as CONSOLE
    return [l for l in stderr.splitlines() if ":CONSOLE" in l or "Uncaught" in l]


def test_html_card_in_headless_chromium(chromium, tmp_path):
    page = tmp_path / "card.html"
    page.write_text(render_card(load_card(FIXTURES / "ptq_w4a8_resnet18.json"), "html"), encoding="utf-8")
    url = page.resolve().as_uri()

    dom = _run(chromium, url, tmp_path, "--dump-dom", "--virtual-time-budget=2000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr) == [], "console messages while loading the card"
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    text = re.sub(r"\s+", " ", text).replace("&amp;", "&")
    for needle in ("69.76", "68.42 ± 0.09", "-1.33", "175.6 G", "937.4 µJ", "1,814,073,344",
                   "Hardware-unfriendly choices", "first and last layers in FP32 (conv1, fc)",
                   "per-channel", "folded", "1,024 images from train"):
        assert needle in text, f"{needle!r} is not in the page text"
    assert len(re.findall(r'<img src="data:image/png;base64,', dom.stdout)) == 2

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "card.png"
    if shot.exists():
        shot.unlink()
    r = _run(chromium, url, tmp_path, f"--screenshot={shot}", "--window-size=1200,4200")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console_lines(r.stderr) == []
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_console_check_catches_errors(chromium, tmp_path):
    """The negative control: a page with a script error and a blocked fetch is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                   "content=\"default-src 'none'; script-src 'unsafe-inline'\"></head><body><p>x</p>"
                   "<script>undefined_function()</script><img src=\"http://example.invalid/a.png\"></body></html>")
    r = _run(chromium, bad.resolve().as_uri(), tmp_path, "--dump-dom", "--virtual-time-budget=2000")
    lines = _console_lines(r.stderr)
    assert any("Uncaught ReferenceError" in l for l in lines), r.stderr[-2000:]
    assert any("Refused to load" in l or "Content Security Policy" in l for l in lines), r.stderr[-2000:]
