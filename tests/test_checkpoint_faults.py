"""Fault tests of checkpoints inside a point (issue #24): real `qcard run` processes on real files,
SIGKILLed right after their k-th checkpoint write (the QCARD_TEST_KILL_AFTER_CHECKPOINT hook), rerun, and
their final card compared with an uninterrupted run's, less what is a wall time or a timestamp.

Data: 96 synthetic 28×28 images, mini-batches of 32 (3 per epoch), 3 epochs = 9 optimizer steps, a
checkpoint every 2 steps and at the last (steps 2, 4, 6, 8, 9): kills land mid-epoch and at an epoch end.
Each test starts 1 to 3 `qcard run` processes (a few seconds each on an idle machine): marked slow."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcard.checkpoint import CHECKPOINT_GLOB, KILL_ENV

ROOT = Path(__file__).resolve().parents[1]

TRAIN = "train: {epochs: 3, batch_size: 32, optimizer: adam, lr: 1.0e-3, weight_decay: 0.0, augment: shift}"
METHODS = {
    "qat": f"{{w_bits: 4, a_bits: 4, {TRAIN}}}",
    "marvin": f"{{min_lookback: 2, max_lookback: 4, train: {{epochs: 3, batch_size: 32, lr: 0.05}}}}",
    "fp32_train": f"{{{TRAIN}}}",
}


def _config(tmp_path: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(f"""\
experiment: ckpt_{method}
models: [qcard:lenet5]
dataset: {{ref: synthetic, input_shape: [1, 28, 28], num_classes: 10, size: 96, batch_size: 96,
           calibration: {{size: 32}}}}
cost: {{profiles: [bitops]}}
checkpoint: {{every_steps: 2}}
methods:
  - name: {method}
    params: {METHODS[method]}
""")
    return path


def _run(config: Path, out: Path, kill_after=None, env=None):
    env = dict(env)
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(config), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _card_path(out: Path) -> Path:
    (path,) = out.glob("*/*/card.json")
    return path


def _comparable(card: dict) -> dict:
    """The card less wall times, timestamps, memory peaks (measured, not computed), the resume note itself
    and the command lines (which name each run's own temporary config path), flattened to {"a.b[0].c": value}."""
    card = json.loads(json.dumps(card))
    for k in ("started_at", "finished_at", "wall_seconds", "timings", "resumed", "command", "memory"):
        card["provenance"].pop(k, None)
    card["method_stats"]["training"].pop("seconds")
    card.pop("reproduce")
    return _flat(card)


def _flat(v, path=""):
    if isinstance(v, dict):
        return {k2: v2 for k, x in v.items() for k2, v2 in _flat(x, f"{path}.{k}").items()}
    if isinstance(v, list):
        return {k2: v2 for i, x in enumerate(v) for k2, v2 in _flat(x, f"{path}[{i}]").items()} or {path: []}
    return {path: v}


def _differences(card: dict, ref: dict):
    a, b = _comparable(card), _comparable(ref)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _killed(result) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    """method -> the card of an uninterrupted run (made once per method)."""
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    cards = {}

    def get(method: str) -> dict:
        if method not in cards:
            tmp = tmp_path_factory.mktemp(f"ref_{method}")
            r = _run(_config(tmp, method), tmp / "out", env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            cards[method] = json.loads(_card_path(tmp / "out").read_text())
            assert not list(_card_path(tmp / "out").parent.glob(CHECKPOINT_GLOB)), "checkpoints left behind"
        return cards[method]
    get.env = env
    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qat", "marvin"])
def test_killed_twice_resumes_and_ends_identical(method, reference, tmp_path):
    ref = reference(method)
    config, out = _config(tmp_path, method), tmp_path / "out"
    first = _run(config, out, kill_after=1, env=reference.env)          # killed after step 2 (epoch 1, mid-way)
    assert _killed(first), first.stdout + first.stderr
    folder = next(out.glob("*/*/point.yaml")).parent
    assert [p.name for p in folder.glob(CHECKPOINT_GLOB)] == ["checkpoint-seed0.pt"]
    assert not (folder / "card.json").exists()
    second = _run(config, out, kill_after=2, env=reference.env)         # resumes at 2; killed after step 6
    assert _killed(second), second.stdout + second.stderr
    assert "resumed from the checkpoint of step 2" in second.stdout
    third = _run(config, out, env=reference.env)                        # resumes at 6 (end of epoch 2)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resumed from the checkpoint of step 6" in third.stdout
    card = json.loads(_card_path(out).read_text())
    assert card["provenance"]["resumed"] == [{"seed": 0, "step": 6}]
    assert "resumed from the checkpoint of step 6" in (_card_path(out).parent / "card.md").read_text()
    assert card["method_stats"]["training"]["steps"] == 9
    if method == "marvin":
        assert card["method_stats"]["marvin"]["switch_count"] > 0     # the switching state crossed the kills
    assert _differences(card, ref) == []
    assert not list(_card_path(out).parent.glob(CHECKPOINT_GLOB)), "checkpoints are removed with the card"


@pytest.mark.slow
def test_fp32_train_killed_after_its_last_step_resumes_identical(reference, tmp_path):
    ref = reference("fp32_train")
    config, out = _config(tmp_path, "fp32_train"), tmp_path / "out"
    assert _killed(_run(config, out, kill_after=5, env=reference.env))     # the 5th save: the last step (9)
    done = _run(config, out, env=reference.env)
    assert done.returncode == 0, done.stdout + done.stderr
    card = json.loads(_card_path(out).read_text())
    assert card["provenance"]["resumed"] == [{"seed": 0, "step": 9}]
    assert _differences(card, ref) == []


@pytest.mark.slow
def test_truncated_checkpoint_is_ignored_with_a_warning_and_the_point_restarts(reference, tmp_path):
    """The point's own checkpoint file, cut short (a disk that filled up, a copy that stopped): the run
    says so and starts from step 0. The file is the first half of a real checkpoint (no process is
    killed here: the kill tests above make those)."""
    from qcard.checkpoint import Checkpointer
    from qcard.config import load_config
    ref = reference("qat")
    config, out = _config(tmp_path, "qat"), tmp_path / "out"
    (point,) = load_config(config).points()
    folder = out / point.experiment / point.folder
    Checkpointer(folder, "seed0", "f" * 64).save(4, {"model": {"w": torch.arange(4096.0)}, "step": 4})
    ckpt = folder / "checkpoint-seed0.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    done = _run(config, out, env=reference.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checkpoint {ckpt} ignored" in done.stdout and "truncated or corrupt" in done.stdout
    assert "starts from step 0" in done.stdout
    card = json.loads(_card_path(out).read_text())
    assert card["provenance"]["resumed"] is None
    assert _differences(card, ref) == []
