"""Points as Ray tasks (qcard run --executor ray): plain @ray.remote tasks driven by ray.wait.

Each point is one task with the config's resources (cpus_per_point, gpus_per_point). The driver
retries a failed task (its worker died, or the point raised) up to max_retries times, then writes the
failed card exactly as a local run does. Points sharing a model and eval data wait for one FP32 baseline
task. --out must be storage every node sees: each task first checks that it sees the driver's probe file.
Ray's own logs (raylet, workers) stay in Ray's log folder; the driver prints one line per lost node, per
retried point and per finished point (with the lines that point logged), and progress per node id.
Ray is imported here only, when a sweep starts."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import QcardError, RunInterrupted
from ..store import atomic_write_text
from .base import Executor, Report, Tasks

DEFAULT_RETRIES = 1
CONNECT_TIMEOUT_S = 5.0          # a cluster that does not answer within this is reported, not waited for
INSTALL_HINT = "pip install 'qcard[ray]'"
PROBE_PREFIX = ".qcard-driver-"
WAIT_S = 0.5
CANCEL_WAIT_S = 10.0
ERROR_CHARS = 160                # a retry line quotes at most this much of the error
NODE_CHECK_S = 2.0               # how often the driver looks for nodes that left the cluster
# what Ray (2.60) prints or raises when a cluster with token authentication rejects the driver
AUTH_MARKERS = ("InvalidAuthToken", "Unauthenticated", "authentication token")


def import_ray():
    try:
        import ray
    except ImportError:
        raise QcardError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: Optional[str]) -> None:
    """A bad HOST:PORT fails here within CONNECT_TIMEOUT_S (ray.init alone waits minutes, then exits)."""
    if address in (None, "auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise QcardError(f"--address '{address}' is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise QcardError(f"cannot reach the Ray cluster at --address {address} ({exc.strerror or exc}); start "
                         "one with `ray start --head` or check the address") from None


def auth_problem(address: Optional[str]) -> str:
    """The error for a cluster that uses token authentication and did not accept this driver."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        why = "qcard's driver sent no token (RAY_AUTH_MODE is not 'token' in its environment)"
    else:
        why = "the token qcard's driver sent is not the cluster's (or none was found)"
    return (f"the Ray cluster at --address {address} uses token authentication and {why}: run qcard with "
            "RAY_AUTH_MODE=token and the cluster's token, either in RAY_AUTH_TOKEN=<token> or in a file: "
            "~/.ray/auth_token or the one RAY_AUTH_TOKEN_PATH names (print the token on the head node with "
            "`ray get-auth-token`)")


def is_auth_failure(ray, exc: BaseException, stderr_text: str) -> bool:
    auth_error = getattr(getattr(ray, "exceptions", None), "AuthenticationError", ())
    return (isinstance(exc, auth_error) if auth_error else False) or \
        any(m in stderr_text or m in str(exc) for m in AUTH_MARKERS)


@contextmanager
def stderr_captured():
    """Ray's C++ client writes its connection retries to file descriptor 2: keep them in a file while
    ray.init runs (yielded as a one-element list holding the text once the block ends)."""
    text = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text[0] = f.read().decode("utf-8", "replace")


def connect(ray, address: Optional[str], temp_dir: Optional[str] = None) -> bool:
    """Connect to the cluster (or start a local Ray when address is None, its session files in temp_dir);
    True when this call did. Ray's workers and raylets log to Ray's log folder, not to the console."""
    if ray.is_initialized():            # a library user (or a test) connected already
        return False
    import signal
    import threading
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    extra = {"_temp_dir": temp_dir} if address is None and temp_dir else {}
    try:
        # only when joining a cluster: a local Ray's processes, started inside ray.init, would inherit the file
        with stderr_captured() if address is not None else nullcontext([""]) as captured:
            try:
                ray.init(address=address, include_dashboard=False if address is None else None,
                         logging_level="ERROR", configure_logging=True, log_to_driver=False, **extra)
                failure = None
            except (Exception, SystemExit) as exc:      # ray.init exits the process on some failures
                failure = exc
        if failure is None:
            if captured[0].strip():          # not an error: what Ray said while connecting is still shown
                sys.stderr.write(captured[0])
            return True
        if is_auth_failure(ray, failure, captured[0]):
            raise QcardError(auth_problem(address)) from None
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise QcardError(f"cannot connect to the Ray cluster at --address {address or '(local)'}: {first}; "
                         "start one with `ray start --head` or check the address") from None
    finally:
        if main and on_term is not None:
            # ray.init installs a SIGTERM handler that aborts the driver: SIGTERM must cancel the tasks
            signal.signal(signal.SIGTERM, on_term)


@contextmanager
def cluster_messages_to_file(ray, log: Callable[[str], None]):
    """Ray's driver prints its cluster's error messages (`(raylet) Raylet is terminated…`, a worker's dump)
    to the console from a thread of its own: while qcard's sweep runs they go to a file in Ray's log folder
    (the console gets qcard's one-liners instead), named once in the log."""
    try:
        from ray._private import worker as ray_worker
        original = ray_worker.print_to_stdstream
        folder = ray_worker._global_node.get_logs_dir_path()
    except (ImportError, AttributeError):      # another Ray version: its messages stay where Ray puts them
        yield
        return
    path = Path(folder) / f"qcard-driver-{os.getpid()}.log"

    def to_file(data, ignore_prefix: bool = False, *args, **kwargs) -> None:
        with open(path, "a", encoding="utf-8") as f:
            for line in data.get("lines", ()):
                f.write(f"({data.get('pid', '?')}) {line}\n")
    ray_worker.print_to_stdstream = to_file
    log(f"qcard: Ray's own messages go to its log folder: {path}")
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


def worker_pythonpath() -> str:
    """The driver's PYTHONPATH and working folder, so tasks import the user's methods and models as
    the driver does (on a cluster these folders must exist on every node, like --out)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [os.getcwd()]
    return os.pathsep.join(dict.fromkeys(parts))


# ------------------------------------------------------------------ what runs in a Ray worker

_HERE: Dict[str, Any] = {}         # token of the sweep -> its Resources in this worker process


def _node() -> str:
    import ray
    return ray.util.get_node_ip_address()


def _here() -> Dict[str, str]:
    """The node a task runs on: its id (two nodes on one host are two nodes) and IP."""
    import ray
    return {"node": ray.get_runtime_context().get_node_id(), "ip": _node()}


def node_label(node: str, ip: str) -> str:
    return f"node {node[:8]} ({ip})" if node != "?" else "node unknown (its worker died)"


def lost_node_line(node: str, ip: str, running: int) -> str:
    return (f"qcard: lost {node_label(node, ip)}: it left the Ray cluster; the points it ran are retried "
            f"({running} running or queued)")


def died_node(exc: BaseException) -> Optional[Tuple[str, str]]:
    """(node id, IP) of the node a task's NodeDiedError names (Ray says it in the message only)."""
    if type(exc).__name__ != "NodeDiedError":
        return None
    node = re.search(r"node ID: ([0-9a-f]+)", str(exc))
    ip = re.search(r"Node IP: ([^,\s]+)", str(exc))
    return (node.group(1), ip.group(1) if ip else "?") if node else None


def retry_line(point, attempt: int, max_retries: int, error: str) -> str:
    """attempt: 0-based index of the attempt that failed; a point gets max_retries + 1 attempts in all."""
    total = max_retries + 1
    if len(error) > ERROR_CHARS:            # Ray's messages run to paragraphs: the line stays one line
        error = error[:ERROR_CHARS - 1] + "…"
    return (f"qcard: retrying point {point.id[:10]} ({point.model.ref} {point.method_label}): attempt "
            f"{attempt + 1} of {total} failed ({error}); starting attempt {attempt + 2} of {total}")


def _out_problem(root: str, probe: str) -> Optional[str]:
    if not (Path(root) / probe).exists():
        return (f"the Ray worker on node {_node()} does not see the driver's --out folder {root} "
                f"(or cannot read it): --out must be storage every node sees (a shared file system)")
    return None


def _resources_here(job, token: str, threads: int, log):
    import torch
    torch.set_num_threads(threads)
    if _HERE.get("token") != token:      # one sweep at a time per worker: drop an earlier sweep's models
        _HERE.clear()
        _HERE.update(token=token, resources=job.resources(log))
    res = _HERE["resources"]
    res.log = log
    return res


def _log(m: str) -> None:
    print(m, flush=True)


def baseline_task(job, token: str, threads: int, probe: str, point):
    if _out_problem(job.root, probe):
        return None                   # the points of the group report it
    return job.baseline(point, _resources_here(job, token, threads, _log))


def point_task(job, token: str, threads: int, probe: str, point, baseline) -> Dict[str, Any]:
    """One point, run where Ray placed it; its folder is written here (the out folder is shared)."""
    problem = _out_problem(job.root, probe)
    if problem:
        return {**_here(), "problem": problem}
    lines = []                     # the point's own lines travel back with its result (Ray's log keeps them too)

    def tagged(m: str) -> None:
        lines.append(f"  ({point.id[:10]}) {m.strip()}")
        _log(lines[-1])
    res = _resources_here(job, token, threads, tagged)
    if baseline is not None:
        res.baselines[baseline[0]] = baseline[1]
    return {**_here(), "outcome": job.execute(point, res, tagged), "lines": lines}


# ------------------------------------------------------------------ the driver

def raise_interruption(exc: BaseException) -> None:
    """SIGTERM's handler (or Ctrl-C) raised inside a call into Ray, which wrapped it in a SystemError: the
    interruption itself goes on, never swallowed as an error of that call."""
    if isinstance(exc.__cause__, (RunInterrupted, KeyboardInterrupt)):
        raise exc.__cause__ from None


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: Optional[str], max_retries: int, resources):
        import_ray()                      # before any work: without Ray, say how to install it
        check_reachable(address)          # and a cluster that is not there, at once
        self.address, self.max_retries = address, max_retries
        self.cpus = float(getattr(resources, "cpus_per_point", 1.0))
        self.gpus = float(getattr(resources, "gpus_per_point", 0.0))

    def device(self, requested: str, resolve: Callable[[str], str]) -> str:
        """Resolved in the task: a point with GPUs runs on the GPU Ray gives it; one without sees none."""
        if self.gpus > 0:
            return "cuda"
        if requested == "cuda":
            raise QcardError("the config asks for device: cuda but resources.gpus_per_point is 0: with "
                             "--executor ray give each point a GPU (resources: {gpus_per_point: 1})")
        return "cpu"

    def run(self, job, tasks: Tasks, report: Report, log: Callable[[str], None]) -> None:
        if not tasks:
            return
        import dataclasses
        ray = import_ray()
        job = dataclasses.replace(job, progress=False)
        Path(job.root).mkdir(parents=True, exist_ok=True)
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        atomic_write_text(Path(job.root) / probe, "qcard driver: the workers check that they see this file\n")
        started = False
        # a local Ray that qcard starts keeps its session files (logs, sockets) in a folder of qcard's own,
        # removed after the sweep: nothing is left in the temp directory (a cluster keeps its own)
        temp_dir = tempfile.mkdtemp(prefix="qcard-") if self.address is None and not ray.is_initialized() else None
        try:
            started = connect(ray, self.address, temp_dir)
            # Ray's message thread ends with ray.shutdown, inside the block: none of its lines reach the console
            with cluster_messages_to_file(ray, log) if started else nullcontext():
                try:
                    _Sweep(ray, self, job, probe, report, log).run(tasks)
                finally:
                    if started:
                        ray.shutdown()
        finally:
            (Path(job.root) / probe).unlink(missing_ok=True)
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)


class _Sweep:
    """The driver's loop: submit, wait for the next finished task, retry or report, print progress."""

    def __init__(self, ray, ex: RayExecutor, job, probe: str, report: Report, log: Callable[[str], None]):
        self.ray, self.ex, self.job, self.report, self.log = ray, ex, job, report, log
        self.threads = max(1, round(ex.cpus))     # torch threads: as an in-process run with that many
        options = dict(num_cpus=ex.cpus, num_gpus=ex.gpus or None,
                       runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
        self.point_fn = ray.remote(point_task).options(max_retries=0, **options)
        self.baseline_fn = ray.remote(baseline_task).options(max_retries=ex.max_retries, **options)
        self.common = (ray.put(job), uuid.uuid4().hex, self.threads, probe)
        self.pending: Dict[Any, Tuple[int, Any, int]] = {}      # task -> (index, point, attempt)
        self.done: Counter = Counter()
        self.per_node: Dict[str, Counter] = {}          # node id -> statuses of the points it finished
        self.ips: Dict[str, str] = {"?": "?"}
        self.alive: Dict[str, str] = {}                 # node id -> IP, as of the last check
        self.lost: set = set()                          # node ids already reported lost
        self.checked = 0.0

    def run(self, tasks: Tasks) -> None:
        self.log(f"qcard: Ray executor: {len(tasks)} point task(s), {self.ex.cpus:g} CPU(s)"
                 f"{f', {self.ex.gpus:g} GPU(s)' if self.ex.gpus else ''} and {self.threads} torch thread(s) "
                 f"each, up to {self.ex.max_retries} retr{'y' if self.ex.max_retries == 1 else 'ies'}; "
                 f"cluster: {self._cluster()}")
        self.alive, self.checked = self._alive(), time.monotonic()
        baselines: Dict[str, Any] = {}
        try:
            for i, point in tasks:
                group = self.job.baseline_group(point)
                if group not in baselines:     # the first point of a group: one baseline task for all
                    baselines[group] = self.baseline_fn.remote(*self.common, point)
                self._submit(i, point, 0, baselines[group])
            while self.pending:
                # a short timeout: the driver's Python gets control back to handle Ctrl-C and SIGTERM
                ready = self._wait()
                self._check_nodes()
                if ready:
                    self._finished(ready[0])
            self._check_nodes(now=True)        # a node lost near the end is still named
        except BaseException:
            # Ctrl-C, SIGTERM, a broken cluster: cancel what runs; finished cards are on disk and the
            # partial files of the cancelled points are cleaned by the next run
            self._cancel(list(self.pending) + list(baselines.values()))
            raise

    def _cancel(self, tasks) -> None:
        """End the tasks' workers now, and wait (briefly) until they are gone: no point may write its card
        after the driver said it stopped."""
        for task in tasks:
            try:
                self.ray.cancel(task, force=True)
            except Exception:
                pass
        try:
            self.ray.wait(tasks, num_returns=len(tasks), timeout=CANCEL_WAIT_S)
        except BaseException:
            pass

    def _wait(self):
        try:
            return self.ray.wait(list(self.pending), num_returns=1, timeout=WAIT_S)[0]
        except SystemError as exc:
            raise_interruption(exc)
            raise

    def _alive(self) -> Dict[str, str]:
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in self.ray.nodes() if n.get("Alive")}

    def _check_nodes(self, now: bool = False) -> None:
        """One line per node that left the cluster since the last check (preempted, its raylet killed)."""
        if not now and time.monotonic() - self.checked < NODE_CHECK_S:
            return
        try:
            alive = self._alive()
        except Exception as exc:     # the cluster's GCS is briefly unreachable: look again later
            raise_interruption(exc)
            return
        self.checked = time.monotonic()
        for node, ip in self.alive.items():
            if node not in alive:
                self._lost(node, ip)
        self.alive = alive

    def _lost(self, node: str, ip: str) -> None:
        if node not in self.lost:
            self.lost.add(node)
            self.log(lost_node_line(node, ip, len(self.pending)))

    def _cluster(self) -> str:
        res = self.ray.cluster_resources()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s)"

    def _submit(self, i: int, point, attempt: int, baseline=None) -> None:
        self.pending[self.point_fn.remote(*self.common, point, baseline)] = (i, point, attempt)

    def _finished(self, task) -> None:
        i, point, attempt = self.pending.pop(task)
        try:
            result = self.ray.get(task)
        except self.ray.exceptions.RayError as exc:       # the worker died, or the task could not run
            # a lost node is named before its points' retries (Ray's node table may say it later)
            died = died_node(exc)
            if died:
                self._lost(*died)
            self._check_nodes(now=True)
            result = {"node": "?", "error": f"worker process failed: {type(exc).__name__}: "
                                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                      "details": traceback.format_exc()}
        if result.get("problem"):
            raise QcardError(result["problem"])
        for line in result.get("lines", ()):
            self.log(line)
        self.ips.setdefault(result["node"], result.get("ip", "?"))
        outcome = result.get("outcome")
        if outcome is None or outcome.status == "failed":
            error = result.get("error") or outcome.error
            if attempt < self.ex.max_retries:
                self.log(retry_line(point, attempt, self.ex.max_retries, error))
                self._submit(i, point, attempt + 1)
                return
            if outcome is None:
                outcome = self.job.failed(point, error, result["details"], self.log)
        self.report(i, outcome)
        self._progress(result["node"], outcome.status)

    def _progress(self, node: str, status: str) -> None:
        self.done[status] += 1
        self.per_node.setdefault(node, Counter())[status] += 1
        nodes = "; ".join(f"{node_label(n, self.ips[n])}: {c['ok']} ok, {c['failed']} failed"
                          for n, c in sorted(self.per_node.items()))
        skipped = f", {self.done['skipped']} skipped" if self.done["skipped"] else ""   # a retry found its card
        self.log(f"  progress: {self.done['ok']} done{skipped}, {self.done['failed']} failed, {len(self.pending)} "
                 f"running or queued ({nodes})")
