"""Issue 24 item 6: qcard on a real two-node Ray cluster started the README's way (`ray start --head`, then
`ray start --address …`), with token authentication: the driver's auth failure is one clear error, Ray's
own logs stay out of the console, a lost node and each retried point are one line, progress is per node id.

The cluster tests are slow (two `ray start`s, ~10 s; a sweep; a driver refused by the cluster waits ~20 s
for Ray's connection retries). The cluster gets its own ports, temp folder and HOME (so no ~/.ray/auth_token
of the user's is read), and teardown ends exactly the processes it started (found by its temp folder, and
their children): `ray stop --force` would end every Ray on the machine, other users' included."""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from qcard.executors import ray_cluster as rc

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# the `ray` command of the Python that runs the tests (its venv's), else the one on PATH
RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else \
    (shutil.which("ray") or "ray")


# ------------------------------------------------------------------ the driver's lines (fast)

def fake_point():
    return SimpleNamespace(id="0123456789abcdef", model=SimpleNamespace(ref="qcard:lenet5"), method_label="ptq")


def test_a_retried_point_is_one_line_naming_the_point_and_its_attempts():
    line = rc.retry_line(fake_point(), 0, 2, "worker process failed: WorkerCrashedError: died")
    assert "\n" not in line
    assert line == ("qcard: retrying point 0123456789 (qcard:lenet5 ptq): attempt 1 of 3 failed "
                    "(worker process failed: WorkerCrashedError: died); starting attempt 2 of 3")
    assert "attempt 2 of 2 failed" in rc.retry_line(fake_point(), 1, 1, "x")


def test_a_lost_node_is_one_line_with_its_short_id_and_ip():
    line = rc.lost_node_line("a1b2c3d4e5f6" * 4, "10.0.0.7", 3)
    assert "\n" not in line and line.startswith("qcard: lost node a1b2c3d4 (10.0.0.7)")
    assert "3 running or queued" in line
    # two nodes on one host are two labels
    assert rc.node_label("aaaaaaaa11", "10.0.0.7") != rc.node_label("bbbbbbbb22", "10.0.0.7")


def test_a_node_died_error_names_the_node_and_long_errors_are_cut():
    NodeDiedError = type("NodeDiedError", (Exception,), {})
    exc = NodeDiedError("Task failed because the node it was running on is dead or unavailable. Node IP: "
                        "192.0.2.2, node ID: bcb662ba190113de. This can happen if the node was preempted")
    assert rc.died_node(exc) == ("bcb662ba190113de", "192.0.2.2")
    assert rc.died_node(RuntimeError(str(exc))) is None
    line = rc.retry_line(fake_point(), 0, 1, "worker process failed: " + str(exc) * 5)
    assert len(line) < rc.ERROR_CHARS + 150 and "…" in line


def test_the_driver_reports_each_node_that_left_once():
    lines = []
    sweep = rc._Sweep.__new__(rc._Sweep)
    nodes = [{"NodeID": "n1" * 10, "NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeID": "n2" * 10, "NodeManagerAddress": "10.0.0.1", "Alive": True}]
    sweep.ray = SimpleNamespace(nodes=lambda: nodes)
    sweep.log, sweep.pending, sweep.checked, sweep.lost = lines.append, {"t": 1}, 0.0, set()
    sweep.alive = sweep._alive()
    nodes[1] = dict(nodes[1], Alive=False)
    sweep._check_nodes(now=True)
    sweep._check_nodes(now=True)
    sweep._lost("n2" * 10, "10.0.0.1")          # also named by its tasks' NodeDiedError: still one line
    assert lines == [rc.lost_node_line("n2" * 10, "10.0.0.1", 1)]


def test_an_interruption_inside_the_node_check_is_not_swallowed():
    from qcard.errors import RunInterrupted
    sweep = rc._Sweep.__new__(rc._Sweep)

    def nodes():
        try:
            raise RunInterrupted(15)
        except RunInterrupted as exc:        # as Ray's Cython wraps what a signal handler raised in it
            raise SystemError("error return without exception set") from exc
    sweep.ray, sweep.checked, sweep.alive = SimpleNamespace(nodes=nodes), 0.0, {}
    with pytest.raises(RunInterrupted):
        sweep._check_nodes(now=True)
    sweep.ray = SimpleNamespace(nodes=lambda: (_ for _ in ()).throw(ConnectionError("GCS busy")))
    sweep._check_nodes(now=True)             # a GCS that does not answer: looked at again later
    assert sweep.alive == {}


def test_auth_failures_are_told_apart_from_other_connection_failures(monkeypatch):
    fake_ray = SimpleNamespace(exceptions=SimpleNamespace(AuthenticationError=type("AuthenticationError",
                                                                                     (Exception,), {})))
    spam = ("[W gcs_client.cc:210] Failed to get cluster ID from GCS server: Unauthenticated: RPC error: "
            "InvalidAuthToken: Authentication token is missing or incorrect\n")
    failed = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    assert rc.is_auth_failure(fake_ray, failed, spam)
    assert rc.is_auth_failure(fake_ray, fake_ray.exceptions.AuthenticationError("no token"), "")
    assert not rc.is_auth_failure(fake_ray, failed, "[W] GCS unavailable\n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    text = rc.auth_problem("10.0.0.1:6379")
    for needed in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "~/.ray/auth_token", "RAY_AUTH_TOKEN_PATH",
                   "sent no token"):
        assert needed in text, needed
    assert "ray start --head" not in text
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "is not the cluster's" in rc.auth_problem("10.0.0.1:6379")


def test_what_is_written_to_file_descriptor_2_is_captured_and_then_restored(capfd):
    with rc.stderr_captured() as captured:
        os.write(2, b"from C++\n")
    os.write(2, b"after\n")
    assert captured == ["from C++\n"]
    assert capfd.readouterr().err == "after\n"


# ------------------------------------------------------------------ a real two-node cluster (slow)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(env, temp, *args):
    done = subprocess.run([RAY, "start", *args, "--num-cpus", "1", "--temp-dir", temp, "--disable-usage-stats",
                           "--dashboard-agent-listen-port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def processes_of(temp: str):
    """pid -> command line of the processes whose command line names the cluster's temp folder, and of
    their children (Ray's workers rename themselves `ray::…`)."""
    found, parents = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if temp in cmd:
            found[int(d.name)] = cmd
    for pid, ppid in parents.items():
        if ppid in found and pid not in found:
            found[pid] = "child"
    return found


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def token_cluster():
    temp = tempfile.mkdtemp(prefix="qct", dir="/tmp")      # short: Ray's socket paths must fit 107 chars
    home = Path(temp) / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    cluster_env = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port = free_port()
    second_listen = None
    try:
        said = ray_start(cluster_env, temp + "/ray", "--head", "--port", str(port), "--include-dashboard", "false",
                  "--dashboard-port", str(free_port()))
        address = re.search(r"--address='([^']+)'", said).group(1)      # HOST:PORT as the head prints it
        before = set(processes_of(temp))
        ray_start(cluster_env, temp + "/ray", "--address", address)
        second = [(pid, cmd) for pid, cmd in processes_of(temp).items() if pid not in before and "raylet/raylet" in cmd]
        assert len(second) == 1, second
        second_node = re.search(r"--node_id=([0-9a-f]+)", second[0][1]).group(1)
        yield SimpleNamespace(address=address, base=base, token=token, temp=temp,
                              second_raylet=second[0][0], second_node=second_node)
    finally:
        for _ in range(3):            # the raylets restart nothing once their parents are gone; be sure
            kill(processes_of(temp))
            time.sleep(0.5)
        shutil.rmtree(temp, ignore_errors=True)


def sweep_config(write_config, tmp_path, n, delay):
    tags = ", ".join(str(k) for k in range(n))
    (tmp_path / "started").mkdir()
    return write_config(
        f"experiment: c\nout: {tmp_path / 'runs'}\nmodels: [qcard:mlp]\n"
        "dataset: {ref: qcard:mnist5k, eval_size: 100, batch_size: 100, calibration: {size: 16}}\n"
        "cost: {profiles: [bitops]}\n"
        f"methods:\n  - {{name: ray_methods:Hold, params: {{folder: '{tmp_path / 'started'}', delay: {delay}, "
        f"tag: [{tags}]}}}}\n", "c.yaml")


def driver(cfg, cluster, env, *extra):
    return subprocess.Popen([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--no-progress", "--executor",
                             "ray", "--address", cluster.address, *extra], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


NODE = re.compile(r"node ([0-9a-f]{8}) \(")


@pytest.mark.slow
def test_a_driver_without_the_token_gets_one_clear_error(token_cluster, write_config, tmp_path):
    proc = driver(sweep_config(write_config, tmp_path, 1, 0), token_cluster, token_cluster.base)
    text = proc.communicate(timeout=180)[0]
    assert proc.returncode == 2, text
    assert "uses token authentication" in text and "RAY_AUTH_MODE=token" in text, text
    assert "InvalidAuthToken" not in text and "ray start --head" not in text, text
    assert len(text.strip().splitlines()) <= 3, text


@pytest.mark.slow
def test_a_sweep_on_two_nodes_survives_a_lost_node_and_says_so(token_cluster, write_config, tmp_path):
    env = dict(token_cluster.base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_cluster.token)
    n = 12
    proc = driver(sweep_config(write_config, tmp_path, n, 2.5), token_cluster, env, "--max-retries", "2")
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip("\n") for l in proc.stdout), daemon=True)
    reader.start()
    killed = None
    second = token_cluster.second_node
    finished = re.compile(rf"node {second[:8]} \([^)]*\): (\d+) ok, (\d+) failed")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and killed is None:
        # kill the second node while it runs a point, once it has finished one: it has started more points
        # than the driver has seen it finish (its next point may start before the driver prints the last)
        done = [finished.search(l) for l in list(lines) if "progress: " in l]
        done = [int(m.group(1)) + int(m.group(2)) for m in done if m]
        started = [p for p in (tmp_path / "started").iterdir() if p.name.startswith(second + ".")]
        if done and done[-1] >= 1 and len(started) > done[-1]:
            os.kill(token_cluster.second_raylet, signal.SIGKILL)
            killed = second
        time.sleep(0.05)
    assert proc.wait(timeout=300) == 0, "\n".join(lines)
    reader.join(10)
    text = "\n".join(lines)
    assert killed, text
    progress = [l for l in lines if "progress: " in l]
    assert {m for l in progress for m in NODE.findall(l)} >= {killed[:8]} and \
        len({m for l in progress for m in NODE.findall(l)}) == 2, text       # one host, two node ids
    # a point whose node died is rerun, or skipped when the dying worker had written its card already
    assert re.search(r"progress: \d+ done(, \d+ skipped)?, 0 failed, 0 running", progress[-1]), text
    assert re.search(r"qcard: \d+ ran, \d+ skipped, 0 failed", lines[-1]), text
    lost = [l for l in lines if l.startswith("qcard: lost node ")]
    assert len(lost) == 1 and lost[0].startswith(f"qcard: lost node {killed[:8]} ("), text
    retried = [l for l in lines if l.startswith("qcard: retrying point ")]
    assert 1 <= len(retried) <= n and all("attempt 1 of 3 failed" in l for l in retried), text
    assert "(raylet)" not in text and "InvalidAuthToken" not in text and "Traceback" not in text, text
    assert len(list((tmp_path / "runs" / "c").glob("*/card.json"))) == n
