"""The executors of one machine: the driver's own process, and a pool of spawned worker processes."""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Any, Callable, Dict

from .base import Executor, Report, Tasks


class InProcessExecutor(Executor):
    """Every point in the driver's process, one after the other (progress bars allowed)."""

    def run(self, job, tasks: Tasks, report: Report, log: Callable[[str], None]) -> None:
        if not tasks:
            return
        resources = job.resources(log)
        for i, point in tasks:
            report(i, job.execute(point, resources, log))


# ------------------------------------------------------------------ process pool

_WORKER: Dict[str, Any] = {}
PARENT_POLL_S = 0.5     # how often a worker checks that the driver is still alive


def _exit_when_orphaned(parent: int) -> None:
    """A worker whose driver died (SIGKILL, OOM killer) is re-parented; it exits at once instead of
    finishing its point and idling forever. Files it leaves half-written are cleaned by the next run."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _exit_on_term(signum, frame) -> None:
    """The driver stops a worker with SIGTERM: exit now, but let multiprocessing release what the worker
    registered (its semaphores), or the resource tracker reports them as leaked when the driver exits."""
    from multiprocessing import util
    try:
        util._exit_function()
    finally:
        os._exit(128 + signum)


def _worker_init(job, threads: int, parent: int) -> None:
    import signal
    import threading
    import torch
    # Ctrl-C reaches the whole process group: the driver alone handles it and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_term)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="qcard-parent-watch").start()
    torch.set_num_threads(threads)
    log = lambda m: print(m, flush=True)
    _WORKER.update(job=job, resources=job.resources(log), log=log)


def _worker_point(point):
    w = _WORKER
    log = w["log"]
    tagged = lambda m: log(f"  ({point.id[:10]}) {m.strip()}")     # worker lines name their point
    w["resources"].log = tagged
    return w["job"].execute(point, w["resources"], tagged)


def _stop_workers(pool) -> None:
    """Cancel the queued points and end the worker processes now (not after their current point)."""
    import multiprocessing
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for proc in children:
        proc.terminate()
    for proc in children:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    pool.shutdown(wait=True)


class PoolExecutor(Executor):
    """workers > 1: that many spawned processes, each running whole points with its share of the CPU
    threads (finished points are written as they finish, in any order)."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, job, tasks: Tasks, report: Report, log: Callable[[str], None]) -> None:
        workers = min(self.workers, len(tasks))
        if workers <= 1:                    # one point left to run: no process to spawn
            InProcessExecutor().run(job, tasks, report, log)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
        log(f"qcard: {workers} worker processes, {threads} torch thread(s) each")
        ctx = multiprocessing.get_context("spawn")       # fork is unsafe once torch has started threads
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(dataclasses.replace(job, progress=False), threads, os.getpid()))
        try:
            futures = {pool.submit(_worker_point, point): (i, point) for i, point in tasks}
            for fut in as_completed(futures):
                i, point = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as exc:     # the worker process itself died (e.g. out of memory)
                    outcome = job.failed(point, f"worker process failed: {type(exc).__name__}: {exc}",
                                         traceback.format_exc(), log)
                report(i, outcome)
        except BaseException:
            # Ctrl-C, SIGTERM or an error here: finished points are on disk, the partial files of the
            # running ones are cleaned on the next run; no worker may outlive the driver
            _stop_workers(pool)
            raise
        pool.shutdown(wait=True)
