"""Issue 14: one executor interface for the in-process loop, --workers N and Ray; the choice of executor
from the command line's options; Ray missing or unreachable is one line and exit 2 (no Ray started here)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cli import main
from qcard.config import load_config
from qcard.errors import QcardError
from qcard.executors import Executor, InProcessExecutor, PoolExecutor, RayExecutor, make_executor
from qcard.runner import PointJob, run

BASE = """\
experiment: ex
out: {out}
models: [qcard:lenet5]
dataset: {{ref: qcard:mnist5k, eval_size: 64, batch_size: 64, calibration: {{size: 16}}}}
cost: {{profiles: [bitops]}}
methods:
  - fp32
  - {{name: user_methods:ScaleWeights, params: {{factor: [0.5, 0.25]}}}}
"""


@pytest.fixture
def cfg(write_config, tmp_path):
    return write_config(BASE.format(out=tmp_path / "runs"), "ex.yaml")


def cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def job_and_tasks(cfg, device="cpu"):
    exp = load_config(cfg)
    return PointJob(exp, str(exp.out_dir(None)), device), list(enumerate(exp.points(), 1))


def test_make_executor_chooses_by_the_options_and_rejects_mixed_ones():
    assert type(make_executor("local")) is InProcessExecutor
    pool = make_executor("local", workers=3)
    assert type(pool) is PoolExecutor and pool.workers == 3
    ray_ex = make_executor("ray", address="auto", max_retries=2)
    assert type(ray_ex) is RayExecutor and ray_ex.max_retries == 2 and ray_ex.address == "auto"
    assert make_executor("ray").max_retries == 1                 # the default
    for kwargs, fragment in [(dict(kind="local", address="auto"), "--executor ray only"),
                             (dict(kind="local", max_retries=1), "--executor ray only"),
                             (dict(kind="ray", workers=2), "--workers applies to --executor local"),
                             (dict(kind="ray", max_retries=-1), "0 or more"),
                             (dict(kind="dask"), "choose one of: local, ray"),
                             (dict(kind="local", workers=0), "at least 1")]:
        with pytest.raises(QcardError, match=fragment):
            make_executor(**kwargs)


def test_the_in_process_executor_reports_each_point_through_the_interface(cfg):
    job, tasks = job_and_tasks(cfg)
    seen, lines = [], []
    InProcessExecutor().run(job, tasks, lambda i, o: seen.append((i, o)), lines.append)
    assert [i for i, _ in seen] == [1, 2, 3]
    assert [o.status for _, o in seen] == ["ok"] * 3
    assert all((o.folder / "card.json").is_file() for _, o in seen)
    # the FP32 baseline of the shared model and data: one cache file for the three points
    assert len(list((job.store().cache / "fp32").glob("*.json"))) == 1


def test_the_pool_executor_runs_points_in_worker_processes_through_the_interface(cfg):
    job, tasks = job_and_tasks(cfg)
    seen, lines = [], []
    PoolExecutor(2).run(job, tasks[:2], lambda i, o: seen.append((i, o)), lines.append)
    assert sorted(i for i, _ in seen) == [1, 2] and all(o.status == "ok" for _, o in seen)
    assert any("2 worker processes" in line for line in lines)


class Reversed(Executor):
    """An executor of its own: runs the points last first, to show the runner keeps the config's order."""
    def run(self, job, tasks, report, log):
        res = job.resources(log)
        for i, point in reversed(tasks):
            report(i, job.execute(point, res, log))


def test_the_runner_uses_the_chosen_executor_and_keeps_the_configs_order(cfg, monkeypatch):
    import qcard.executors as executors
    chosen = []
    monkeypatch.setattr(executors, "make_executor", lambda kind, **kw: chosen.append((kind, kw)) or Reversed())
    lines = []
    summary = run(cfg, progress=False, executor="ray", address="auto", log=lines.append)
    assert chosen[0][0] == "ray" and chosen[0][1]["address"] == "auto"
    assert [o.point.index for o in summary.outcomes] == [0, 1, 2]
    ran = [l for l in lines if l.startswith("[")]
    assert ran[0].startswith("[3/3]") and ran[-1].startswith("[1/3]")      # reported as they finished


def test_executor_ray_without_ray_installed_is_one_line_with_the_install_command(cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` now raises ImportError
    code, out = cli("run", cfg, "--executor", "ray")
    assert code == 2 and "Traceback" not in out, out
    assert out.strip().splitlines() == ["error: --executor ray needs Ray, which is not installed: "
                                        "pip install 'qcard[ray]'"]


@pytest.mark.parametrize("address,fragment", [("127.0.0.1:1", "cannot reach the Ray cluster at --address 127.0.0.1:1"),
                                              ("ray://127.0.0.1:1", "cannot reach the Ray cluster"),
                                              ("no-port-here", "is not auto, HOST:PORT or ray://HOST:PORT")])
def test_a_bad_address_exits_2_with_one_line_at_once(cfg, address, fragment):
    t = time.time()
    code, out = cli("run", cfg, "--executor", "ray", "--address", address)
    assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert out.startswith("error: ") and fragment in out, out
    assert time.time() - t < 30         # not ray.init's minutes of retries


def test_options_of_one_executor_with_the_other_exit_2(cfg):
    code, out = cli("run", cfg, "--address", "auto")
    assert code == 2 and "--executor ray only" in out, out
    code, out = cli("run", cfg, "--executor", "ray", "--workers", "2")
    assert code == 2 and "--workers applies to --executor local" in out, out


def test_gpu_points_run_with_cuda_and_cuda_without_gpus_is_refused():
    resources = load_config_resources(gpus=1)
    assert RayExecutor(None, 1, resources).device("auto", lambda d: "cpu") == "cuda"
    cpu_only = RayExecutor(None, 1, load_config_resources(gpus=0))
    assert cpu_only.device("auto", lambda d: "cuda") == "cpu"      # a task without num_gpus sees no GPU
    with pytest.raises(QcardError, match="gpus_per_point"):
        cpu_only.device("cuda", lambda d: "cuda")


def load_config_resources(gpus):
    from qcard.config import ResourcesSpec
    return ResourcesSpec(cpus_per_point=1, gpus_per_point=gpus)


def test_help_and_validate_never_import_ray(cfg, subprocess_env):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom qcard.cli import main\n"
            f"for args in (['--help'], ['run', '--help'], ['validate', {str(cfg)!r}]):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_local_ray_that_qcard_starts_leaves_nothing_in_the_temp_directory(write_config, tmp_path, subprocess_env):
    """Issue 22 item 12: Ray's session folders (logs, sockets) of the local Ray qcard started are removed."""
    import subprocess
    import sys
    import tempfile
    pytest.importorskip("ray")
    temp = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))     # short: Ray's socket paths must stay < 108 bytes
    try:
        cfg = write_config(f"experiment: r\nout: {tmp_path / 'runs'}\nmodels: [qcard:lenet5]\n"
                           "dataset: {ref: qcard:mnist5k, eval_size: 32, batch_size: 32}\ncost: {profiles: [bitops]}\n"
                           "methods: [fp32]\n", "r.yaml")
        r = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--executor", "ray", "--no-progress"],
                           env=dict(subprocess_env, TMPDIR=str(temp), RAY_TMPDIR=str(temp)),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(list((tmp_path / "runs" / "r").glob("*/card.json"))) == 1
        # torch's own caches (torchinductor_USER) are not Ray's
        left = [p.name for p in temp.iterdir() if p.name == "ray" or p.name.startswith(("qcard-", "session_"))]
        assert left == [], f"Ray's session files left in the temp directory: {left}"
    finally:
        import shutil
        shutil.rmtree(temp, ignore_errors=True)
