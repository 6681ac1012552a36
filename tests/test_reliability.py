"""Issue 15: interrupted runs leave no process behind, only valid cards count as finished, OS errors and
bad names are one line and exit 2, merged methods are reported, method params are strictly typed."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cli import main

BASE = """\
experiment: {name}
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
"""


def make(write_config, tmp_path, methods: str, name="t", head=None):
    text = (head or BASE).format(name=name, out=tmp_path / "runs")
    return write_config(text + "methods:\n" + methods, f"{name}.yaml")


def cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def tagged_processes(tag: str):
    """pids of live processes whose environment carries tag (the driver's children inherit it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in env and state != "Z":
            pids.append(int(d.name))
    return pids


def wait_gone(tag: str, seconds: float):
    deadline = time.time() + seconds
    while time.time() < deadline and tagged_processes(tag):
        time.sleep(0.2)
    return tagged_processes(tag)


# ------------------------------------------------------------------ item 1: no orphaned workers

TWELVE = "  - {name: user_methods:ScaleWeights, params: {delay: 0.6, factor: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, " \
         "0.7, 0.65, 0.6, 0.55, 0.5, 0.45]}}\n"


def start_workers_run(cfg, env, tag):
    env = dict(env, QCARD_TEST_TAG=tag)
    return subprocess.Popen([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_cards(out: Path, n: int, proc, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and len(list(out.glob("*/card.json"))) < n and proc.poll() is None:
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the processes")
def test_sigterm_with_workers_leaves_no_process_and_rerun_finishes_each_point_once(write_config, tmp_path,
                                                                                   subprocess_env):
    cfg = make(write_config, tmp_path, TWELVE, name="term")
    out = tmp_path / "runs" / "term"
    tag = f"qcard-test-{uuid.uuid4().hex}"
    proc = start_workers_run(cfg, subprocess_env, tag)
    wait_for_cards(out, 2, proc)
    assert proc.poll() is None, proc.stdout.read()
    assert len(tagged_processes(tag)) >= 3           # the driver, two workers (and the resource tracker)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "rerun" in text
    assert wait_gone(tag, 10) == []
    done_before = len(list(out.glob("*/card.json")))
    assert 2 <= done_before < 12

    result = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", "--workers", "2"],
                            env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("already done, skipped") == done_before
    assert f"{12 - done_before} ran, {done_before} skipped, 0 failed" in result.stdout
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 12
    for folder in folders:
        names = [p.name for p in folder.iterdir()]
        assert names.count("card.json") == 1 and not [n for n in names if n.startswith(".tmp-")]
        assert json.loads((folder / "card.json").read_text())["status"] == "ok"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the processes")
def test_sigkill_of_the_driver_ends_its_workers(write_config, tmp_path, subprocess_env):
    cfg = make(write_config, tmp_path, TWELVE, name="kill9")
    tag = f"qcard-test-{uuid.uuid4().hex}"
    proc = start_workers_run(cfg, subprocess_env, tag)
    wait_for_cards(tmp_path / "runs" / "kill9", 1, proc)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert wait_gone(tag, 10) == []


# ------------------------------------------------------------------ item 2: only a valid card is finished

def test_a_card_that_fails_the_schema_is_rerun_not_skipped(write_config, tmp_path):
    import qcard
    cfg = make(write_config, tmp_path, "  - fp32\n", name="bad")
    first = qcard.run(cfg, progress=False)
    assert first.ok
    path = first.outcomes[0].folder / "card.json"
    card = json.loads(path.read_text())
    card["results"]["quantized"] = "ninety"          # valid JSON, not a valid card
    path.write_text(json.dumps(card))
    lines = []
    from qcard.runner import run
    again = run(cfg, progress=False, log=lines.append)
    assert [o.status for o in again.outcomes] == ["ok"]
    assert any("not a finished card, rerunning" in line for line in lines), lines
    assert cli("compare", path.parent.parent)[0] == 0


# ------------------------------------------------------------------ item 3: one line and exit 2

@pytest.mark.parametrize("field,value,fragment", [
    ("experiment", "x" * 300, "at most 100"),
    ("experiment", "-lead", "start with a letter or digit"),
    ("experiment", "my experiment", "contains ' '"),
    ("label", "y" * 300, "at most 100"),
    ("label", "-rf", "starts with '-'"),
])
def test_names_and_labels_that_make_bad_folders_fail_at_validate(write_config, tmp_path, field, value, fragment):
    head = BASE.replace("experiment: {name}", "experiment: '{name}'")
    if field == "experiment":
        cfg = make(write_config, tmp_path, "  - fp32\n", name=value if len(value) < 200 else value, head=head) \
            if len(value) < 200 else write_config(head.format(name=value, out=tmp_path) + "methods: [fp32]\n")
    else:
        cfg = make(write_config, tmp_path, f"  - {{name: fp32, label: '{value}'}}\n")
    code, out = cli("validate", cfg)
    assert code == 2, out
    assert "Traceback" not in out and fragment in out, out
    assert "[A-Za-z0-9]" not in out         # the rule in words, not the regex


def unwritable_folders(tmp_path):
    """A folder name over the file-name limit (any user), and a read-only folder (not as root)."""
    yield tmp_path / ("n" * 300), "File name too long", "shorten"
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):     # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            yield locked, "Permission denied", "permissions"
        finally:
            locked.chmod(0o700)


def test_unwritable_output_folders_are_one_line_and_exit_2(write_config, tmp_path):
    import qcard
    cfg = make(write_config, tmp_path, "  - fp32\n", name="ro")
    runs = qcard.run(cfg, progress=False)
    card = runs.outcomes[0].folder / "card.json"
    for folder, reason, fix in unwritable_folders(tmp_path):
        for args in (["run", cfg, "--out", folder, "--force"],
                     ["compare", card, "-o", folder / "table.md"],
                     ["compare", card, "--plot", folder / "p.png"],
                     ["render", card, "--out", folder / "site"]):
            code, out = cli(*args)
            assert code == 2, (args, out)
            last = out.strip().splitlines()[-1]
            assert "Traceback" not in out and out.count("error:") == 1 and last.startswith("error:"), (args, out)
            assert reason in last and fix in last, (args, out)


def test_os_errors_are_mapped_in_one_place():
    import errno
    from qcard.commands import os_error_line
    line = os_error_line(OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "a" * 300))
    assert "File name too long" in line and "shorten" in line
    assert "disk is full" in os_error_line(OSError(errno.ENOSPC, "No space left on device", "/x"))


def test_zoo_train_zero_epochs_is_a_usage_error(tmp_path):
    code, out = cli("zoo", "train", "mlp", "--epochs", "0", "--out", tmp_path)
    assert code == 2 and "Traceback" not in out and "--epochs" in out, out


# ------------------------------------------------------------------ item 4: merged methods are reported

def test_two_labels_with_the_same_params_warn_naming_both(write_config, tmp_path):
    cfg = make(write_config, tmp_path, "  - {name: ptq, label: A, params: {w_bits: 8}}\n"
                                       "  - {name: ptq, label: B, params: {w_bits: 8}}\n")
    result = CliRunner().invoke(main, ["validate", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "1 point" in result.stdout
    assert "'A' and 'B'" in result.stderr and "same settings" in result.stderr


# ------------------------------------------------------------------ item 6: strict method params

@pytest.mark.parametrize("params,fragment", [
    ("{w_symmetric: 'yes'}", "expects true or false, got 'yes'"),
    ("{w_bits: true}", "expects an integer, got True (a YAML true/false is not a number)"),
    ("{w_bits: '4'}", "expects an integer, got '4' (write it without quotes)"),
])
def test_method_params_are_strictly_typed(write_config, tmp_path, params, fragment):
    cfg = make(write_config, tmp_path, f"  - {{name: ptq, params: {params}}}\n")
    code, out = cli("validate", cfg)
    assert code == 2 and fragment in out and "methods[0].params" in out, out


# ------------------------------------------------------------------ item 5: cheap checks at validate time

SMALL = """\
experiment: v
models: [{model}]
dataset: {dataset}
methods: [fp32]
"""


def validate(write_config, model="qcard:lenet5", dataset="{ref: qcard:mnist5k}"):
    # the config-level checks alone (lenet5 cannot read digits' 8x8 images: the build step says so)
    return cli("validate", "--no-build", write_config(SMALL.format(model=model, dataset=dataset), "v.yaml"))


def test_a_misspelled_constructor_kwarg_of_a_python_model_fails_at_validate(write_config):
    code, out = validate(write_config, model="{ref: 'python:user_models:tiny_net', kwargs: {hiden: 8}}")
    assert code == 2 and "models[0].kwargs.hiden" in out and "did you mean 'hidden'" in out, out
    assert validate(write_config, model="{ref: 'python:user_models:tiny_net', kwargs: {hidden: 8}}")[0] == 0


@pytest.mark.parametrize("ref,split,n", [("qcard:mnist5k", "test", 1000), ("qcard:digits", "test", 360)])
def test_eval_size_larger_than_the_split_fails_at_validate(write_config, ref, split, n):
    code, out = validate(write_config, dataset=f"{{ref: '{ref}', eval_size: {n + 1}}}")
    assert code == 2 and "dataset.eval_size" in out and f"({n} images)" in out, out
    assert validate(write_config, dataset=f"{{ref: '{ref}', eval_size: {n}}}")[0] == 0


def test_known_split_sizes_match_the_loaded_datasets():
    from qcard.data import load_dataset
    from qcard.data.catalog import SPLIT_SIZES
    for ref in ("qcard:mnist5k", "qcard:digits"):
        for split, n in SPLIT_SIZES[ref].items():
            assert len(load_dataset(ref, split)) == n


def test_image_folders_empty_or_without_images_or_too_small_fail_at_validate(write_config, tmp_path):
    from PIL import Image
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    texts = tmp_path / "texts"
    (texts / "cat").mkdir(parents=True)
    (texts / "cat" / "notes.txt").write_text("not an image")
    for folder in (empty, texts):
        code, out = validate(write_config, dataset=f"{{ref: 'imagefolder:{folder}'}}")
        assert code == 2 and "dataset.ref" in out and "Traceback" not in out, out
    good = tmp_path / "good"
    (good / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(good / "cat" / f"{i}.png")
    assert validate(write_config, dataset=f"{{ref: 'imagefolder:{good}', eval_split: val}}")[0] == 0
    code, out = validate(write_config, dataset=f"{{ref: 'imagefolder:{good}', eval_split: val, eval_size: 4}}")
    assert code == 2 and "(3 images)" in out, out


# ------------------------------------------------------------------ item 7: points show their swept values

def test_dry_run_and_progress_show_each_swept_value_and_point_yaml_keeps_the_config_order(write_config, tmp_path):
    import yaml
    from qcard.runner import run
    cfg = make(write_config, tmp_path, "  - {name: ptq, params: {w_bits: [8, 4], a_bits: 8, pipeline: minmax}}\n")
    code, out = cli("run", cfg, "--dry-run")
    assert code == 0, out
    lines = [l for l in out.splitlines() if "ptq" in l]
    assert "w_bits=8, a_bits=8, pipeline=minmax" in lines[0] and "w_bits=4" in lines[1], out  # default 8 shown
    assert "steps=" not in out and "weight_range" not in out          # derived, not set by the config
    log = []
    summary = run(cfg, progress=False, log=log.append)
    assert summary.ok
    assert any("ptq w_bits=8 (" in l for l in log) and any("ptq w_bits=4 (" in l for l in log), log
    for k, o in enumerate(summary.outcomes):
        assert yaml.safe_load((o.folder / "point.yaml").read_text())["index"] == k


def test_a_model_built_for_another_image_size_is_named_with_both_sizes_at_validate(write_config):
    # qcard:lenet5 takes 1x28x28; qcard:digits gives 1x8x8: the error names both sizes and the ways out
    code, out = cli("validate", write_config(SMALL.format(model="qcard:lenet5", dataset="{ref: qcard:digits}"),
                                             "v.yaml"))
    assert code == 2 and "qcard:lenet5 was built for 1x28x28 images and qcard:digits gives 1x8x8" in out, out
    assert "models[0]" in out, out
