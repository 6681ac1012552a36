"""Executors: where the points of a run execute. One interface (`Executor`) for the in-process loop,
a pool of local processes (--workers N) and a Ray cluster (--executor ray). The runner builds a
`PointJob` (qcard.runner) and hands it the points; the executor runs each point where it places it
and reports every outcome as it finishes. Ray is imported by the Ray executor only, when it is chosen."""
from __future__ import annotations

from typing import Optional

from ..errors import QcardError
from .base import Executor
from .local import InProcessExecutor, PoolExecutor
from .ray_cluster import DEFAULT_RETRIES, RayExecutor

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "Executor", "InProcessExecutor", "PoolExecutor", "RayExecutor", "make_executor"]


def make_executor(kind: str = "local", *, workers: int = 1, address: Optional[str] = None,
                  max_retries: Optional[int] = None, resources=None) -> Executor:
    """The executor for `qcard run --executor KIND [--workers N] [--address A] [--max-retries N]`.
    Checks the combination of options; imports nothing heavy (Ray is imported when the sweep starts)."""
    if kind not in EXECUTORS:
        raise QcardError(f"unknown executor '{kind}'; choose one of: {', '.join(EXECUTORS)}")
    if int(workers) < 1:
        raise QcardError(f"workers must be at least 1, got {workers}")
    if max_retries is not None and int(max_retries) < 0:
        raise QcardError(f"--max-retries must be 0 or more, got {max_retries}")
    if kind == "local":
        if address is not None or max_retries is not None:
            raise QcardError("--address and --max-retries apply to --executor ray only; "
                             "drop them or add --executor ray")
        return PoolExecutor(int(workers)) if int(workers) > 1 else InProcessExecutor()
    if int(workers) != 1:
        raise QcardError("--workers applies to --executor local; with --executor ray the cluster's CPUs and "
                         "the config's resources: block decide how many points run at once")
    return RayExecutor(address, DEFAULT_RETRIES if max_retries is None else int(max_retries), resources)
