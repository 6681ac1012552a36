"""`qcard verify`: reruns a card's point from the card alone; the card against its own outcomes, the rerun
against the card image by image (changed images, exact McNemar p), cost and quantization identical,
environment differences; exit codes (could not verify: 2); and `make cards` refusing a dirty tree."""
import copy
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import qcard
from qcard.cards.schema import load_card
from qcard.cli import main
from qcard.runner import run
from qcard.cards.evidence import results_from_outcomes
from qcard.stats.outcomes import pack_outcomes, unpack_outcomes
from qcard.verify import CardVerdict, compare_card, environment_differences, missing_inputs, verify_cards

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
experiment: vfy
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 200, batch_size: 100, calibration: {{size: 32}}}}
cost: {{profiles: [bitops, asic45]}}
methods:
  - fp32
  - {{name: ptq, label: W8A8, params: {{w_bits: 8, a_bits: 8}}}}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run of two cheap points (FP32 and PTQ W8A8 on LeNet-5, 200 images); tests copy its cards."""
    tmp = tmp_path_factory.mktemp("verify_run")
    cfg = tmp / "vfy.yaml"
    cfg.write_text(CONFIG.format(out=tmp / "runs"))
    summary = run(cfg, progress=False, log=lambda m: None)
    assert summary.ok and len(summary.outcomes) == 2
    return tmp / "runs" / "vfy"


def ptq_card_file(run_dir: Path) -> Path:
    (path,) = [p for p in run_dir.glob("*/card.json") if "__W8A8__" in str(p)]
    return path


def edited_copy(run_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the PTQ point's card with edit(card dict) applied, as a hand edit would leave it."""
    data = json.loads(ptq_card_file(run_dir).read_text())
    edit(data)
    out = tmp_path / "edited" / "card.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(data, indent=2))
    return out


def verify(*args):
    return CliRunner().invoke(main, ["verify", *[str(a) for a in args]])


def test_fresh_cards_verify_identical_and_the_temporary_folder_is_removed(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))   # where the reruns go without --keep
    r = verify(run_dir)
    assert r.exit_code == 0, r.output
    assert r.output.count("VERIFIED") == 2 and "NOT VERIFIED" not in r.output
    assert r.output.count("the card's figures agree with its own per-sample outcomes") == 2
    assert "outcomes, FP32: all 200 eval images the same" in r.output
    assert "outcomes, seed 0: all 200 eval images the same" in r.output
    assert "results.quantized: card" in r.output and ": identical" in r.output
    assert "results.per_seed[0].top1" in r.output and "results.fp32" in r.output
    assert "cost totals: identical" in r.output and "quantization block: identical" in r.output
    assert "2 of 2 card(s) verified" in r.output
    assert "same: torch" in r.output and "CPU" in r.output
    assert list(tmp_path.iterdir()) == []        # the reruns were removed


@pytest.mark.parametrize("field, edit", [
    ("results.quantized", lambda c: c["results"].update(quantized=12.5)),
    ("results.per_seed[0].top1", lambda c: c["results"]["per_seed"][0].update(top1=12.5)),
])
def test_an_edited_accuracy_fails_naming_the_field(run_dir, tmp_path, field, edit):
    r = verify(edited_copy(run_dir, tmp_path, edit))
    assert r.exit_code == 1, r.output
    assert "NOT VERIFIED" in r.output and "FAIL the card disagrees with its own per-sample outcomes" in r.output
    mismatch, figure = [ln.strip() for ln in r.output.splitlines() if f"{field}:" in ln]
    assert mismatch.startswith(f"{field}: stored 12.5000, the outcomes give ")
    assert figure.startswith("FAIL") and "card 12.50" in figure
    assert "0 of 1 card(s) verified" in r.output


def test_an_edited_cost_figure_fails_naming_it(run_dir, tmp_path):
    def edit(c):
        c["cost"]["bops"] = 1.0
        c["cost_profiles"]["asic45"]["energy_pj"] = 2.0
    r = verify(edited_copy(run_dir, tmp_path, edit))
    assert r.exit_code == 1, r.output
    assert "FAIL cost totals: 2 field(s) differ" in r.output
    assert "cost.bops: card 1.0, rerun" in r.output
    assert "cost_profiles.asic45.energy_pj: card 2.0, rerun" in r.output
    assert "quantization block: identical" in r.output


def test_a_tampered_point_config_is_not_rerun_as_the_card(run_dir, tmp_path):
    path = edited_copy(run_dir, tmp_path,
                       lambda c: c["point"]["config"]["methods"][0]["params"].update(w_bits=4))
    r = verify(path)
    assert r.exit_code == 1, r.output
    assert "no longer gives the same point with this qcard" in r.output and "nothing was rerun" in r.output


def v1_card(data):
    """A card as qcard wrote it before schema 2: no point block, no intervals."""
    data["schema_version"] = "1"
    for key in ("point", "description", "deployment"):
        data.pop(key, None)
    for key in ("ci95", "fp32_ci95", "delta_ci95", "ci_method", "outcomes"):
        data["results"].pop(key, None)


def test_user_errors_exit_2_with_one_line_and_nothing_run(run_dir, tmp_path):
    old = edited_copy(run_dir, tmp_path, v1_card)
    r = verify(old)
    assert r.exit_code == 2
    assert r.output.startswith(f"error: {old} was written by an older qcard (no `point` block)")
    assert "cannot be rerun from the card alone" in r.output and "qcard run" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "rerunning" not in r.output
    # with a good card beside it: still nothing runs
    r = verify(ptq_card_file(run_dir), old)
    assert r.exit_code == 2 and "rerunning" not in r.output

    r = verify(tmp_path / "missing" / "card.json")
    assert r.exit_code == 2 and r.output.startswith("error: no such card file or run folder")

    failed = tmp_path / "failed" / "card.json"
    failed.parent.mkdir()
    data = json.loads(ptq_card_file(run_dir).read_text())
    data.update(status="failed", error="RuntimeError: boom")
    failed.write_text(json.dumps(data))
    r = verify(failed)
    assert r.exit_code == 2 and "is a failed card" in r.output and "boom" in r.output

    notacard = tmp_path / "x.json"
    notacard.write_text('{"hello": 1}')
    r = verify(notacard)
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_missing_inputs_could_not_verify_with_the_fix(run_dir, tmp_path, monkeypatch):
    """#22 item 5: a weights file at a relative path that is not there from this folder, or user code whose
    folder is not on PYTHONPATH, is "could not verify" (exit 2) with the fix, not NOT VERIFIED."""
    def relative_weights(c):
        c["point"]["config"]["models"][0]["weights"] = "weights/lenet5.safetensors"
    card = load_card(edited_copy(run_dir, tmp_path, relative_weights), check_evidence=False)
    elsewhere_dir = tmp_path / "elsewhere"
    elsewhere_dir.mkdir()
    monkeypatch.chdir(elsewhere_dir)
    (line,) = missing_inputs(card)
    assert line.startswith("point.config.models[0].weights: file weights/lenet5.safetensors not found from "
                           f"{elsewhere_dir}")
    assert "run qcard verify from the folder the card was made in" in line
    r = verify(tmp_path / "edited" / "card.json")
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: could not verify {tmp_path / 'edited' / 'card.json'}: point.config.models")
    assert "rerunning" not in r.output and "NOT VERIFIED" not in r.output
    # from the folder the card was made in, the same relative path is there: nothing is missing
    (tmp_path / "made" / "weights").mkdir(parents=True)
    (tmp_path / "made" / "weights" / "lenet5.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "made")
    assert missing_inputs(card) == []

    def user_method(c):
        c["point"]["config"]["methods"][0]["name"] = "qcard_nowhere_pkg.methods:MyPTQ"
        c["reproduce"] = "PYTHONPATH=/home/me/code qcard run cfg.yaml --only abc --force  # qcard 0.1.0"
    (line,) = missing_inputs(load_card(edited_copy(run_dir, tmp_path / "m", user_method), check_evidence=False))
    assert line == ("point.config.methods[0].name: module 'qcard_nowhere_pkg.methods' is not importable here; "
                    "the card was made with PYTHONPATH=/home/me/code (its reproduce line): run "
                    "`PYTHONPATH=/home/me/code qcard verify ...`")


def test_threads_from_the_card_and_keep(run_dir, tmp_path):
    import torch
    before = torch.get_num_threads()
    path = edited_copy(run_dir, tmp_path, lambda c: c["provenance"].update(torch_threads=1))
    lines = []
    (v,) = verify_cards([path], keep=tmp_path / "kept", log=lines.append)
    assert torch.get_num_threads() == before            # restored
    assert "1 torch threads" in lines[0]
    kept = load_card(v.rerun_folder / "card.json")
    assert kept.provenance.torch_threads == 1 and kept.id == v.card.id
    assert v.problem is None and v.figures


# ------------------------------------------------------------------ the rule, on synthetic reruns (no run)


def judged(run_dir, edit_card=None, edit_rerun=None) -> CardVerdict:
    """The verdict for the PTQ card (edited) against a 'rerun' that is the card itself (edited)."""
    data = json.loads(ptq_card_file(run_dir).read_text())
    rerun = copy.deepcopy(data)
    if edit_card:
        edit_card(data)
    if edit_rerun:
        edit_rerun(rerun)
    v = CardVerdict(Path("card.json"), qcard.cards.schema.card_from_dict(data))
    compare_card(v, rerun)
    return v


def same_environment(c):
    c["provenance"].update(git_dirty=False)


def flip_images(c, lost=0, gained=0):
    """Change the seed's outcomes of card dict c: `lost` right images made wrong, `gained` wrong made right;
    every figure recomputed from the new bits, as a run that scored them would write it."""
    o = c["results"]["outcomes"]
    n, fp = o["n"], unpack_outcomes(o["fp32"], o["n"])
    bits = unpack_outcomes(o["seeds"]["0"], n).copy()
    right, wrong = np.flatnonzero(bits), np.flatnonzero(~bits)
    assert len(right) >= lost and len(wrong) >= gained, "the fixture run has too few such images"
    bits[right[:lost]] = False
    bits[wrong[:gained]] = True
    top5 = {k: c["results"][k] for k in ("top5", "top5_fp32")}
    c["results"].update(results_from_outcomes(fp, {0: bits}, fingerprint=o["fingerprint"]), **top5)
    c["results"]["per_seed"][0]["top5"] = top5["top5"]


def elsewhere(lost=0, gained=0):
    """The rerun on another CPU, with images changed."""
    def edit(r):
        r["provenance"]["cpu"] = "Some Other CPU"
        flip_images(r, lost, gained)
    return edit


def test_rule_same_environment_no_image_may_change(run_dir):
    v = judged(run_dir, same_environment, lambda r: (same_environment(r), flip_images(r, lost=1)))
    assert not v.explained and not v.ok and v.evidence.ok
    (seed,) = [c for c in v.images if c.label == "seed 0"]
    assert (seed.changed, seed.lost, seed.gained) == (1, 1, 0)
    text = qcard.verify.format_verdict(v)
    assert ("FAIL outcomes, seed 0: 1 of 200 eval images changed outcome (1 right on the card and wrong in the "
            "rerun, 0 the reverse); exact McNemar p = 1.00: nothing in the environment differs, so none may "
            "change") in text
    assert "outcomes, FP32: all 200 eval images the same" in text


def test_rule_another_environment_may_change_images_not_significantly(run_dir):
    v = judged(run_dir, None, elsewhere(lost=2, gained=1))
    assert v.explained and v.ok, qcard.verify.format_verdict(v)
    (seed,) = [c for c in v.images if c.label == "seed 0"]
    assert seed.p == pytest.approx(1.0)      # 2 vs 1: exact McNemar p = 1
    text = qcard.verify.format_verdict(v)
    assert "3 of 200 eval images changed outcome" in text and "not significant at 0.05" in text
    # the top-1 moved by the rerun's one net image: shown, judged through the images
    assert "ok   results.quantized" in text and "differs by -0.50 points" in text


def test_rule_a_significant_change_fails_even_on_another_environment(run_dir):
    v = judged(run_dir, None, elsewhere(lost=7))
    assert v.explained and not v.ok
    (seed,) = [c for c in v.images if c.label == "seed 0"]
    assert seed.p == pytest.approx(2 * 0.5 ** 7)       # 0.015625: binomial, two-sided
    assert "exact McNemar p = 0.016: significant at 0.05: the rerun scores differently" in \
        qcard.verify.format_verdict(v)


def test_rule_a_card_with_flipped_bits_fails_against_an_identical_rerun(run_dir):
    def flip_bits_only(c):           # the bits edited, the figures left as they were
        o = c["results"]["outcomes"]
        bits = unpack_outcomes(o["seeds"]["0"], o["n"])
        bits[:2] = ~bits[:2]
        o["seeds"]["0"] = pack_outcomes(bits)
    v = judged(run_dir, flip_bits_only)
    assert not v.ok and not v.evidence.ok
    assert {m.field for m in v.evidence.mismatches} >= {"results.quantized", "results.per_seed[0].top1"}
    (seed,) = [c for c in v.images if c.label == "seed 0"]
    assert seed.changed == 2
    text = qcard.verify.format_verdict(v)
    assert "FAIL the card disagrees with its own per-sample outcomes" in text


def test_rule_a_deleted_headline_is_named_missing_not_outside_an_interval(run_dir):
    v = judged(run_dir, lambda c: c["results"].pop("quantized"))
    assert not v.ok
    text = qcard.verify.format_verdict(v)
    assert "results.quantized: stored nothing (missing), the outcomes give" in text
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("FAIL results.quantized")]
    assert "card missing" in line and "missing on the card" in line
    assert "interval" not in line and "None" not in text


def without_outcomes(c):
    for key in ("ci95", "fp32_ci95", "delta_ci95", "ci_method", "outcomes"):
        c["results"][key] = None


def test_rule_no_outcomes_means_top1_must_be_identical(run_dir):
    v = judged(run_dir, without_outcomes, without_outcomes)
    assert v.ok and v.images == [] and not v.evidence.checked
    assert "no per-sample evidence: figures not checked" in qcard.verify.format_verdict(v)

    def moved(r):
        without_outcomes(r)
        r["provenance"]["cpu"] = "Some Other CPU"
        r["results"]["quantized"] = r["results"]["per_seed"][0]["top1"] = 90.0
    v = judged(run_dir, without_outcomes, moved)
    assert v.explained and not v.ok
    assert [f.field for f in v.figures if not v.figure_ok(f)] == ["results.quantized", "results.per_seed[0].top1"]


def test_rule_a_rerun_that_cannot_find_an_input_could_not_verify(run_dir):
    def failed(error):
        return lambda r: r.update(status="failed", error=error)
    v = judged(run_dir, lambda c: c.update(reproduce="PYTHONPATH=/src/me qcard run c.yaml --only x --force"),
               failed("ModuleNotFoundError: No module named 'my_pkg'"))
    assert v.unverifiable and v.problem is None and not v.ok and v.state == "COULD NOT VERIFY"
    text = qcard.verify.format_verdict(v)
    assert text.endswith("could not verify: the rerun could not find an input: ModuleNotFoundError: No module "
                         "named 'my_pkg': run qcard verify from the folder the card was made in, with "
                         "PYTHONPATH=/src/me (the card's reproduce line), or make the input available at the "
                         "path its point config names")
    v = judged(run_dir, None, failed("RuntimeError: boom"))
    assert v.unverifiable is None and v.problem == "the rerun failed: RuntimeError: boom"
    assert v.state == "NOT VERIFIED"


def test_rule_cost_and_quantization_must_be_identical_on_any_environment(run_dir):
    def rerun(r):
        r["provenance"]["torch"] = "9.9"
        r["quantization"]["weights"]["bits"] = 4
    v = judged(run_dir, None, rerun)
    assert v.explained and not v.ok and v.quantization == ["quantization.weights.bits: card 8.0, rerun 4"]
    # a key a newer qcard adds to the cost is not a difference
    v = judged(run_dir, None, lambda r: r["cost"].update(new_total=3))
    assert v.ok and v.cost == []


def test_environment_differences_name_each_field_and_dirty_trees():
    card = {"torch": "2.3.0", "cpu": "Intel Xeon", "torch_threads": 4, "git_commit": "a" * 40, "git_dirty": True,
            "qcard_version": "0.1.0", "python": "3.11.7", "torchvision": "0.18.0"}
    here = dict(card, torch="2.14.1", cpu="AMD EPYC", torch_threads=2, git_commit="b" * 40, git_dirty=False)
    differ, same = environment_differences(card, here)
    assert [w for w, _, _ in differ] == ["torch", "CPU", "torch threads", "git commit", "uncommitted changes"]
    assert ("torch", "2.3.0", "2.14.1") in differ
    assert [w for w, _ in same] == ["torchvision", "Python", "qcard version"]
    # uncommitted changes on both sides: the code is not known from the commit, so it could explain
    differ, _ = environment_differences(dict(card, git_dirty=True), dict(card, git_dirty=True))
    assert [w for w, _, _ in differ] == ["uncommitted changes"]
    assert environment_differences(dict(card, git_dirty=False), dict(card, git_dirty=False))[0] == []


# ------------------------------------------------------------------ make cards refuses a dirty tree


def _git(repo: Path, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def scratch_repo(tmp_path):
    """A git repo with the project's Makefile and a stand-in qcard that logs its calls (nothing is installed
    or run for real: the test is about the cards target's order of steps)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (repo / ".gitignore").write_text(".venv/\nbuild/\n")
    calls = tmp_path / "calls.txt"
    fake = repo / ".venv" / "bin" / "qcard"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                    'if [ "$1" = run ]; then mkdir -p build/cards/quickstart; fi\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (repo / "cards").mkdir()
    (repo / "cards" / "README").write_text("published cards\n")
    earlier = (repo / "pyproject.toml").stat().st_mtime - 100
    os.utime(repo / "pyproject.toml", (earlier, earlier))     # the install target is up to date
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    return repo, calls


def make_cards(repo: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run(["make", "-s", "cards"], cwd=repo, capture_output=True, text=True, env=env)


def test_make_cards_runs_from_a_clean_tree(scratch_repo):
    repo, calls = scratch_repo
    r = make_cards(repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["run", "render", "compare"]


@pytest.mark.parametrize("dirty", ["modified", "untracked"])
def test_make_cards_refuses_a_dirty_tree_before_running_anything(scratch_repo, dirty):
    repo, calls = scratch_repo
    if dirty == "modified":
        (repo / "cards" / "README").write_text("edited\n")
        shown = " M cards/README"
    else:
        (repo / "notes.py").write_text("x = 1\n")
        shown = "?? notes.py"
    r = make_cards(repo)
    assert r.returncode != 0
    assert "refusing to publish from a git tree with uncommitted changes" in r.stdout
    assert shown in r.stdout
    assert not calls.exists()                           # nothing ran


# ------------------------------------------------------------------ the published cards


def _published_cards_have_points() -> bool:
    files = sorted((ROOT / "cards" / "quickstart").glob("*/card.json"))
    return bool(files) and all(json.loads(f.read_text()).get("point") for f in files)


@pytest.mark.slow
@pytest.mark.xfail(not _published_cards_have_points(), strict=False,
                   reason="cards/quickstart holds cards written before cards carried their point config "
                          "(schema 1); this becomes a real test once `make cards` republishes them")
def test_the_published_quickstart_cards_verify():
    r = verify(ROOT / "cards" / "quickstart")
    assert r.exit_code == 0, r.output
