"""Issue 22, run side: the FP32 cache never serves another model's baseline, files are readable by others
(the umask's permissions), and two `qcard run` processes into one --out split the points. Real
subprocesses on real files."""
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# a user's constructor: the same weights, a kwarg that changes what the model computes
POOLNET = '''
from torch import nn


class PoolNet(nn.Module):
    input_shape = (1, 28, 28)

    def __init__(self, pool: str = "avg", num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5, stride=2)
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()).flatten(1)){EDIT}
'''


def user_package(tmp_path: Path, edit: str = "") -> Path:
    pkg = tmp_path / "userpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "poolnet.py").write_text(POOLNET.replace("{EDIT}", edit))
    return pkg


def weights_file(tmp_path: Path, pkg: Path) -> Path:
    import torch
    sys.path.insert(0, str(pkg))
    try:
        import importlib
        import poolnet
        importlib.reload(poolnet)
        torch.manual_seed(3)
        state = poolnet.PoolNet().state_dict()
    finally:
        sys.path.remove(str(pkg))
    path = tmp_path / "poolnet.pt"
    torch.save(state, path)
    return path


CONFIG = """\
experiment: pools
out: {out}
models:
  - {{ref: "python:poolnet:PoolNet", weights: {weights}, kwargs: {{pool: max}}, label: max}}
  - {{ref: "python:poolnet:PoolNet", weights: {weights}, kwargs: {{pool: avg}}, label: avg}}
dataset: {{ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
methods: [fp32]
"""


def qcard_run(cfg: Path, env, *args, pkg: Path):
    env = dict(env, PYTHONPATH=os.pathsep.join([str(pkg), env["PYTHONPATH"]]))
    return subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def cards(out: Path):
    return {json.loads(p.read_text())["model"]["label"]: json.loads(p.read_text())
            for p in sorted(out.glob("*/card.json"))}


def test_fp32_cache_separates_kwargs_and_code_edits(tmp_path, subprocess_env):
    pkg = user_package(tmp_path)
    weights = weights_file(tmp_path, pkg)
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "runs", weights=weights))
    first = qcard_run(cfg, subprocess_env, pkg=pkg)
    assert first.returncode == 0, first.stdout + first.stderr
    got = cards(tmp_path / "runs" / "pools")
    assert set(got) == {"max", "avg"}
    # one weights file, two models: each its own FP32 measurement (per-image outcomes differ)
    assert got["max"]["results"]["outcomes"]["fp32"] != got["avg"]["results"]["outcomes"]["fp32"]
    assert len(list((tmp_path / "runs" / ".cache" / "fp32").glob("*.json"))) == 2

    # the user edits forward (a changed model, same id): a rerun into the same runs/ measures it again
    user_package(tmp_path, edit=" * 0.0 + self.fc.bias * 0.0 + __import__('torch').arange(10.0)")
    again = qcard_run(cfg, subprocess_env, "--force", pkg=pkg)
    assert again.returncode == 0, again.stdout + again.stderr
    edited = cards(tmp_path / "runs" / "pools")
    # the edited model always says class 9: its FP32 is the share of 9s, for both pools
    assert edited["max"]["results"]["outcomes"]["fp32"] == edited["avg"]["results"]["outcomes"]["fp32"]
    assert edited["max"]["results"]["fp32"] != got["max"]["results"]["fp32"] or \
        edited["avg"]["results"]["fp32"] != got["avg"]["results"]["fp32"]
    assert len(list((tmp_path / "runs" / ".cache" / "fp32").glob("*.json"))) == 4


def test_a_cached_baseline_whose_logits_do_not_match_is_measured_again(tmp_path, subprocess_env):
    pkg = user_package(tmp_path)
    weights = weights_file(tmp_path, pkg)
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "runs", weights=weights))
    first = qcard_run(cfg, subprocess_env, pkg=pkg)
    assert first.returncode == 0, first.stdout + first.stderr
    true_fp32 = {k: c["results"]["fp32"] for k, c in cards(tmp_path / "runs" / "pools").items()}
    # what the key cannot see (code the model's classes do not live in, a changed library): the cached
    # entry says something else than the model does now; the logits check catches it
    for entry in (tmp_path / "runs" / ".cache" / "fp32").glob("*.json"):
        data = json.loads(entry.read_text())
        assert data["probe"]["n"] == 4 and len(data["probe"]["logits"][0]) == 10
        data["top1"] = 12.34
        data["probe"]["logits"][0][0] += 5.0
        entry.write_text(json.dumps(data))
    again = qcard_run(cfg, subprocess_env, "--force", pkg=pkg)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("does not match the model now") == 2, again.stdout
    for label, card in cards(tmp_path / "runs" / "pools").items():
        assert card["results"]["fp32"] == true_fp32[label] != 12.34


# ------------------------------------------------------------------ permissions

def test_cards_points_and_cache_get_the_umask_permissions(tmp_path, subprocess_env, write_config):
    cfg = write_config(f"experiment: perm\nout: {tmp_path / 'runs'}\nmodels: [qcard:lenet5]\n"
                       "dataset: {ref: qcard:mnist5k, eval_size: 32, batch_size: 32}\n"
                       "cost: {profiles: [bitops]}\nmethods: [fp32]\n", "perm.yaml")
    run = subprocess.run(["sh", "-c", f'umask 022 && exec "{sys.executable}" -m qcard.cli run "{cfg}" --no-progress'],
                         env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"card.json", "card.md", "point.yaml"} <= names and any(p.parent.name == "fp32" for p in files)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o644)}, \
        {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}


def test_atomic_write_follows_the_umask(tmp_path):
    from qcard.store import atomic_write_text
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


# ------------------------------------------------------------------ locks: two runs into one --out

SIX = """\
experiment: shared
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
methods:
  - {{name: user_methods:ScaleWeights, params: {{delay: 0.5, factor: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]}}}}
"""


def test_two_runs_into_one_out_split_the_points(tmp_path, subprocess_env, write_config):
    cfg = write_config(SIX.format(out=tmp_path / "runs"), "shared.yaml")
    cmd = [sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ran = [int(o.split(" ran, ")[0].rsplit(" ", 1)[1]) for o in outs]
    # every point written exactly once: the two runs' points add up to six (none computed twice)
    assert sum(ran) == 6, outs
    folders = sorted(p for p in (tmp_path / "runs" / "shared").iterdir() if p.is_dir())
    assert len(folders) == 6
    for folder in folders:
        assert json.loads((folder / "card.json").read_text())["status"] == "ok"
        assert not (folder / ".qcard-lock").exists()


def test_a_lock_of_a_dead_process_is_taken_over_a_live_one_is_not(tmp_path):
    from qcard.store import LOCK_FILE, PointLock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "token": "old"}))
    lock = PointLock(tmp_path)
    got, note = lock.acquire()
    assert got and "is gone" in note
    other = PointLock(tmp_path)
    assert other.acquire() == (False, f"pid {os.getpid()} on {socket.gethostname()}")
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert other.acquire()[0]
    other.release()


def test_a_lock_whose_heartbeat_stopped_is_taken_over(tmp_path, monkeypatch):
    from qcard.store import LOCK_FILE, PointLock
    monkeypatch.setenv("QCARD_LOCK_STALE_S", "5")
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "token": "old"}))
    assert PointLock(tmp_path).acquire()[0] is False          # fresh: its owner may be alive elsewhere
    os.utime(path, (time.time() - 60, time.time() - 60))
    lock = PointLock(tmp_path)
    got, note = lock.acquire()
    assert got and "no heartbeat" in note
    lock.release()


# ------------------------------------------------------------------ item 12, run side

WARNS = '''
import warnings
from user_methods import ScaleWeights


class Warns(ScaleWeights):
    def apply(self, model, data, params, ctx):
        if params.factor < 1:
            warnings.warn(f"careful with factor {params.factor}")
        return super().apply(model, data, params, ctx)
'''


def test_warnings_are_logged_with_the_point_that_raised_them(tmp_path, write_config, monkeypatch, capfd):
    (tmp_path / "warn_method.py").write_text(WARNS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write_config(f"experiment: w\nout: {tmp_path / 'runs'}\nmodels: [qcard:lenet5]\n"
                       "dataset: {ref: qcard:mnist5k, eval_size: 32, batch_size: 32}\ncost: {profiles: [bitops]}\n"
                       "methods:\n  - {name: 'warn_method:Warns', params: {factor: [1.0, 0.5]}}\n", "w.yaml")
    from qcard.runner import run
    lines = []
    summary = run(cfg, progress=False, log=lines.append)
    assert summary.ok
    second = summary.outcomes[1].point
    warned = [i for i, line in enumerate(lines) if "careful with factor 0.5" in line]
    assert len(warned) == 1 and second.id[:10] in lines[warned[0]], lines
    # in order: after the first point's result line, before the second's
    results = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert results[0] < warned[0] < results[1], lines
    assert "careful" not in capfd.readouterr().err


def test_a_closed_pipe_ends_a_command_quietly(tmp_path, write_config, subprocess_env):
    factors = ", ".join(str(round(1 - i / 2000, 5)) for i in range(800))    # > 64 KiB of --dry-run lines
    cfg = write_config(f"experiment: pipe\nmodels: [qcard:lenet5]\ndataset: qcard:mnist5k\n"
                       f"methods:\n  - {{name: user_methods:ScaleWeights, params: {{factor: [{factors}]}}}}\n",
                       "pipe.yaml")
    r = subprocess.run(["sh", "-c", f'"{sys.executable}" -m qcard.cli run "{cfg}" --dry-run | head -n 2'],
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert len(r.stdout.splitlines()) == 2
    assert r.stderr.strip() == "", r.stderr            # no "error: Broken pipe", no "Exception ignored"


TWELVE = "  - {name: user_methods:ScaleWeights, params: {delay: 0.6, factor: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, " \
         "0.7, 0.65, 0.6, 0.55, 0.5, 0.45]}}\n"


def test_ctrl_c_with_workers_exits_cleanly(tmp_path, write_config, subprocess_env):
    import signal
    cfg = write_config(f"experiment: intr\nout: {tmp_path / 'runs'}\nmodels: [qcard:lenet5]\n"
                       "dataset: {ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {size: 16}}\n"
                       "cost: {profiles: [bitops]}\nmethods:\n" + TWELVE, "intr.yaml")
    # a terminal's Ctrl-C: SIGINT at its default disposition in the child (a test run started in the
    # background by a non-interactive shell inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the sweep would finish and exit 0)
    proc = subprocess.Popen([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", "--workers", "2"],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "runs" / "intr").glob("*/card.json"))) < 2 \
            and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C reaches the whole process group
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "rerun the same command" in text
    for noise in ("leaked semaphore", "Exception ignored", "Traceback", "Errno"):
        assert noise not in text, text


def test_a_rerun_over_a_read_only_folder_of_finished_cards_skips_them(tmp_path, write_config, monkeypatch):
    import errno
    from qcard.runner import run
    from qcard.store import PointLock
    cfg = write_config(f"experiment: ro\nout: {tmp_path / 'runs'}\nmodels: [qcard:lenet5]\n"
                       "dataset: {ref: qcard:mnist5k, eval_size: 32, batch_size: 32}\ncost: {profiles: [bitops]}\n"
                       "methods: [fp32]\n", "ro.yaml")
    assert run(cfg, progress=False, log=lambda m: None).ok

    def read_only(self):          # what a read-only folder (or file system) answers, even to root
        raise PermissionError(errno.EROFS, "Read-only file system", str(self.path))
    monkeypatch.setattr(PointLock, "_create", read_only)
    again = run(cfg, progress=False, log=lambda m: None)
    assert [o.status for o in again.outcomes] == ["skipped"]
