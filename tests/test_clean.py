"""Superseded and failed cards (issue 25 item 3): compare shows the latest card per point and lists failed
ones in one short section (--all shows everything); `qcard clean` removes failed and superseded point
folders and stale caches, dry-run by default, and never anything qcard did not write; `qcard run` replaces
a failed card of the same point."""
import json
import os
import time
from pathlib import Path

from click.testing import CliRunner

import qcard
from qcard.cards.compare import compare_cards, load_cards
from qcard.cli import main
from qcard.methods.base import Method, MethodParams, QuantResult
from qcard.store import LOCK_FILE, TMP_PREFIX
from user_methods import not_quantized

FIXTURE = Path(__file__).parent / "fixtures" / "cards" / "ptq_w4a8_resnet18.json"
OLD, NEW = "2026-01-01T10:00:00+00:00", "2026-02-01T10:00:00+00:00"


def card(id_char: str, finished: str = OLD, failed: bool = False) -> dict:
    c = json.loads(FIXTURE.read_text(encoding="utf-8"))
    c["id"] = id_char * 64
    c["provenance"].update(started_at=finished, finished_at=finished)
    if failed:
        c.update(status="failed", error="RuntimeError: " + "shape mismatch " * 40 + "\nTraceback (most recent call last)",
                 cost={}, method_stats={}, results={"metric": "top1", "seeds": [0]})
    return c


def write(folder: Path, c: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(c), encoding="utf-8")
    (folder / "card.md").write_text("# card\n", encoding="utf-8")
    return folder


def make_runs(tmp_path: Path):
    """runs/exp: a point made twice (an old folder elsewhere and the current one), a failed point, a failed card
    outside any point folder, a locked failed point, and FP32 caches (current, older qcard, killed write)."""
    runs = tmp_path / "runs"
    exp = runs / "exp"
    f = {
        "current": write(exp / f"resnet18__w4__{'a' * 10}", card("a", NEW)),
        "old": write(runs / "exp-copy" / f"resnet18__w4__{'a' * 10}", card("a", OLD)),
        "failed": write(exp / f"resnet18__w2__{'b' * 10}", card("b", NEW, failed=True)),
        "stranger": write(exp / "my-notes", card("c", NEW, failed=True)),       # not the store's layout
        "locked": write(exp / f"resnet18__w3__{'d' * 10}", card("d", NEW, failed=True)),
        "other": write(exp / f"resnet18__w8__{'e' * 10}", card("e", OLD)),
    }
    (f["locked"] / LOCK_FILE).write_text("host pid token")
    cache = runs / ".cache" / "fp32"
    cache.mkdir(parents=True)
    (cache / "good.json").write_text(json.dumps({"top1": 98.0, "probe": {"n": 2, "logits": [[0.1, 0.2]]}}))
    (cache / "old.json").write_text(json.dumps({"top1": 98.0}))
    killed = cache / (TMP_PREFIX + "x1")
    killed.write_text("{")
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    fresh = cache / (TMP_PREFIX + "x2")        # a write in progress right now
    fresh.write_text("{")
    return runs, f, cache


def test_compare_shows_the_latest_card_per_point_and_failed_ones_apart(tmp_path):
    runs, f, _ = make_runs(tmp_path)
    cmp = compare_cards(load_cards([runs]))
    ids = [r.id[0] for r in cmp.rows]
    assert sorted(ids) == ["a", "e"]                  # one row per point: the latest "a", and "e"
    current = next(r for r in cmp.rows if r.id[0] == "a")
    assert Path(current.path).parent == f["current"]
    assert [s["path"] for s in cmp.superseded] == [str(f["old"] / "card.json")]
    assert sorted(x["path"] for x in cmp.failed) == sorted(str(f[k] / "card.json") for k in ("failed", "locked", "stranger"))
    md = cmp.to_markdown()
    assert "## Failed" in md and "1 superseded card left out" in md
    failed_lines = [l for l in md.splitlines() if "FAILED —" in l]
    assert len(failed_lines) == 3 and all(len(l) < 330 and "Traceback" not in l for l in failed_lines)
    every = compare_cards(load_cards([runs]), show_all=True)
    assert len(every.rows) == 6 and every.superseded == [] and len(every.failed) == 3
    r = CliRunner().invoke(main, ["compare", str(runs)])
    assert r.exit_code == 0 and "1 superseded card(s) left out" in r.output and "--all shows them" in r.output
    r = CliRunner().invoke(main, ["compare", str(runs), "--all", "--format", "json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["cards"]) == 6


def test_clean_is_a_dry_run_by_default_then_removes_only_what_qcard_wrote(tmp_path):
    runs, f, cache = make_runs(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["clean", str(runs)])
    assert r.exit_code == 0, r.output
    assert sorted(p for p in tmp_path.rglob("*")) == before              # nothing deleted
    out = r.stdout
    assert f"would remove {f['old']}{os.sep}  (superseded: a later card of the same point in {f['current']})" in out
    assert f"would remove {f['failed']}{os.sep}  (failed: RuntimeError: shape mismatch" in out
    assert f"would remove {cache / 'old.json'}" in out and f"would remove {cache / (TMP_PREFIX + 'x1')}" in out
    assert "2 point folder(s), 2 cache file(s); run again with --yes" in out
    assert f"left {f['stranger']}: not a point folder" in r.stderr and f"left {f['locked']}: a run holds its lock" in r.stderr
    r = CliRunner().invoke(main, ["clean", str(runs), "--yes"])
    assert r.exit_code == 0, r.output
    assert "removed 2 point folder(s), 2 cache file(s)" in r.stdout
    assert not f["old"].exists() and not f["failed"].exists()
    for k in ("current", "stranger", "locked", "other"):
        assert (f[k] / "card.json").is_file(), k
    assert sorted(p.name for p in cache.iterdir()) == sorted(["good.json", TMP_PREFIX + "x2"])
    assert (runs / "exp-copy").is_dir()                 # only the point folder went, not its parent
    r = CliRunner().invoke(main, ["clean", str(runs)])
    assert r.exit_code == 0 and "nothing to remove" in r.stdout


def test_clean_refuses_what_is_not_a_run_folder(tmp_path):
    r = CliRunner().invoke(main, ["clean", str(tmp_path / "missing")])
    assert r.exit_code == 2
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["clean", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no card.json found" in r.output


class Flaky(Method):
    """Fails while QCARD_TEST_FLAKY is set: the same point, failed first, then fixed."""
    name = "flaky"
    family = "other"

    class Params(MethodParams):
        level: int = 1

    def apply(self, model, data, params, ctx):
        if os.environ.get("QCARD_TEST_FLAKY"):
            raise RuntimeError("flaky failure")
        return QuantResult(model=model, quantization=not_quantized(), pipeline=["flaky"], layers=[], stats={})


def test_run_replaces_a_failed_card_of_the_same_point(write_config, tmp_path, monkeypatch):
    cfg = write_config(f"""\
experiment: flaky
out: {tmp_path / 'runs'}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 100, batch_size: 100, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
methods:
  - {{name: "test_clean:Flaky", label: flaky}}
""", "flaky.yaml")
    monkeypatch.setenv("QCARD_TEST_FLAKY", "1")
    assert not qcard.run(cfg, progress=False).ok
    cards = list((tmp_path / "runs" / "flaky").glob("*/card.json"))
    assert len(cards) == 1 and json.loads(cards[0].read_text())["status"] == "failed"
    monkeypatch.delenv("QCARD_TEST_FLAKY")
    for force in (False, True):          # a failed point reruns with or without --force, into the same folder
        assert qcard.run(cfg, progress=False, force=force).ok
        again = list((tmp_path / "runs" / "flaky").glob("*/card.json"))
        assert again == cards and json.loads(again[0].read_text())["status"] == "ok"
