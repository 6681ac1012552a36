"""Issue 14: points as tasks on a local Ray cluster, one per test session (ray.init(num_cpus=2)): the same
cards as in-process, retries of a dead worker, failed cards for a point that raises, a killed driver and
a rerun, a worker that does not see --out. All slow: starting Ray costs ~6-8 s and ~600 MB."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcard.errors import QcardError
from qcard.runner import run

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
ROOT = TESTS.parent

HEAD = """\
experiment: {name}
out: {out}
models: {models}
dataset: {{ref: qcard:mnist5k, eval_size: 200, batch_size: 100, calibration: {{size: 32}}}}
cost: {{profiles: [bitops]}}
"""


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session; its workers import the tests' methods through PYTHONPATH."""
    import ray
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def config(write_config, tmp_path, methods, name="r", models="[qcard:lenet5]"):
    text = HEAD.format(name=name, out=tmp_path / "runs", models=models) + "methods:\n" + methods
    return write_config(text, f"{name}.yaml")


def test_ray_cards_match_the_in_process_cards_with_the_same_threads(ray_cluster, write_config, tmp_path):
    import torch
    methods = "  - fp32\n  - {name: ptq, params: {w_bits: [8, 4], a_bits: 8, pipeline: minmax}}\n"
    cfg = config(write_config, tmp_path, methods, name="same", models="[qcard:mlp, qcard:lenet5]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # a Ray point with cpus_per_point 1 runs with 1 torch thread
    try:
        local = run(cfg, out=str(tmp_path / "local"), progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    lines = []
    remote = run(cfg, out=str(tmp_path / "ray"), progress=False, executor="ray", log=lines.append)
    assert local.ok and remote.ok and len(remote.outcomes) == 6, lines
    assert [o.point.id for o in remote.outcomes] == [o.point.id for o in local.outcomes]   # config order
    for a, b in zip(local.outcomes, remote.outcomes):
        for block in ("results", "cost", "quantization"):
            assert a.card[block] == b.card[block], (a.point.describe(), block)
        assert json.loads((b.folder / "card.json").read_text())["status"] == "ok"
    assert any("1 torch thread(s) each" in l for l in lines), lines
    assert sum("progress: " in l for l in lines) == 6 and "6 done, 0 failed, 0 running" in lines[-2], lines
    # one FP32 baseline per (model, eval data), shared by the three points of each model
    assert len(list((tmp_path / "ray" / ".cache" / "fp32").glob("*.json"))) == 2
    assert not list((tmp_path / "ray" / "same").glob(".qcard-driver-*"))      # the probe is removed
    again = run(cfg, out=str(tmp_path / "ray"), progress=False, executor="ray", log=lines.append)
    assert [o.status for o in again.outcomes] == ["skipped"] * 6


def test_a_dead_worker_is_retried_and_a_raising_point_is_a_failed_card(ray_cluster, write_config, tmp_path):
    marker = tmp_path / "died-once"
    methods = (f"  - {{name: ray_methods:DieOnce, label: once, params: {{marker: '{marker}'}}}}\n"
               f"  - {{name: ray_methods:DieOnce, label: always, params: {{marker: '{marker}-2', always: true}}}}\n"
               "  - {name: user_methods:ScaleWeights, label: raises, params: {fail: true}}\n"
               "  - fp32\n")
    lines = []
    summary = run(config(write_config, tmp_path, methods, name="retry"), progress=False, executor="ray",
                  max_retries=1, log=lines.append)
    status = {o.point.method_label: o for o in summary.outcomes}
    assert [o.point.method_label for o in summary.outcomes] == ["once", "always", "raises", "fp32"]
    assert status["once"].status == "ok" and marker.exists()
    assert status["fp32"].status == "ok"
    raised = status["raises"]
    assert raised.status == "failed" and raised.error == "RuntimeError: this method was asked to fail"
    card = json.loads((raised.folder / "card.json").read_text())
    assert card["status"] == "failed" and card["error"] == raised.error        # as a local run writes it
    assert "this method was asked to fail" in (raised.folder / "error.log").read_text()
    died = status["always"]
    assert died.status == "failed" and died.error.startswith("worker process failed: "), died.error
    assert json.loads((died.folder / "card.json").read_text())["status"] == "failed"
    retried = [l for l in lines if l.startswith("qcard: retrying point ")]
    assert len(retried) == 3, lines                                    # once, always, raises: one retry each
    assert all("attempt 1 of 2 failed" in l and l.endswith("starting attempt 2 of 2") for l in retried), retried


def start_driver(cfg, address, env):
    return subprocess.Popen([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", "--executor",
                             "ray", "--address", address], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_cards(out, n, proc, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and len(list(out.glob("*/card.json"))) < n and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()


def test_a_stopped_or_killed_driver_and_a_rerun_run_every_point_exactly_once(ray_cluster, write_config, tmp_path,
                                                                             subprocess_env):
    factors = ", ".join(str(1 - k / 20) for k in range(8))
    methods = f"  - {{name: user_methods:ScaleWeights, params: {{delay: 1.5, factor: [{factors}]}}}}\n"
    cfg = config(write_config, tmp_path, methods, name="kill")
    out = tmp_path / "runs" / "kill"
    address = ray_cluster.get_runtime_context().gcs_address       # the drivers join the session's cluster
    proc = start_driver(cfg, address, subprocess_env)
    wait_for_cards(out, 1, proc)
    proc.send_signal(signal.SIGTERM)      # Ray's own SIGTERM handler would abort the driver with a core dump
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "interrupted by signal 15" in text and "rerun" in text, text

    proc = start_driver(cfg, address, subprocess_env)
    wait_for_cards(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    lines = []
    summary = run(cfg, progress=False, executor="ray", log=lines.append)
    assert summary.ok and len(summary.outcomes) == 8
    skipped = sum(o.status == "skipped" for o in summary.outcomes)
    assert 3 <= skipped < 8 and f"{8 - skipped} ran, {skipped} skipped, 0 failed" in lines[-1], lines
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 8
    for folder in folders:
        names = [p.name for p in folder.iterdir()]
        assert names.count("card.json") == 1 and not [n for n in names if n.startswith(".tmp-")], names
        assert json.loads((folder / "card.json").read_text())["status"] == "ok"


def test_a_worker_that_does_not_see_the_out_folder_is_a_clear_error(ray_cluster, write_config, tmp_path,
                                                                    monkeypatch):
    import qcard.executors.ray_cluster as ray_cluster_module
    # the driver's probe file is not written: what a worker on a node without the shared folder sees
    monkeypatch.setattr(ray_cluster_module, "atomic_write_text", lambda path, text: None)
    cfg = config(write_config, tmp_path, "  - fp32\n", name="unseen")
    with pytest.raises(QcardError, match=r"does not see the driver's --out folder .*shared file system"):
        run(cfg, progress=False, executor="ray", log=lambda m: None)


def test_ctrl_c_of_the_driver_cancels_the_tasks(ray_cluster, write_config, tmp_path):
    factors = ", ".join(str(1 - k / 20) for k in range(6))
    methods = f"  - {{name: user_methods:ScaleWeights, params: {{delay: 2.0, factor: [{factors}]}}}}\n"
    cfg = config(write_config, tmp_path, methods, name="ctrlc")
    out = tmp_path / "runs" / "ctrlc"

    def running():
        return len(list(out.glob("*/point.yaml"))) > len(list(out.glob("*/card.json")))

    was_running = []

    def interrupt_while_a_point_runs(line):
        if "progress: " in line:
            deadline = time.time() + 60
            while time.time() < deadline and not running():
                time.sleep(0.02)
            was_running.append(running())
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, executor="ray", log=interrupt_while_a_point_runs)
    done = len(list(out.glob("*/card.json")))       # the driver returns once the cancelled tasks ended
    assert was_running == [True]
    time.sleep(6)                 # a task still running would finish (2 s each) and write its card now
    assert len(list(out.glob("*/card.json"))) == done < 6
    assert not list(out.glob(".qcard-driver-*"))
