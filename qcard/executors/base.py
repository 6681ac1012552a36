"""The executor interface."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

# (index of the point in the config's order, 1-based; the point)
Tasks = List[Tuple[int, Any]]
Report = Callable[[int, Any], None]


class Executor:
    """Runs the points of a job and calls report(index, outcome) once per point as it finishes.

    The job (qcard.runner.PointJob) is picklable: an executor may run its points in other processes or on
    other machines. It offers: resources(log) (models and data loaded once per process), execute(point,
    resources, log) (run one point and write its folder), failed(point, error, details) (write a failed
    card for a point whose process died), baseline(point, resources) and baseline_group(point) (the FP32
    baseline a group of points shares)."""

    name = "local"

    def device(self, requested: str, resolve: Callable[[str], str]) -> str:
        """The device the job's points run on; local executors resolve it here, on the driver."""
        return resolve(requested)

    def run(self, job, tasks: Tasks, report: Report, log: Callable[[str], None]) -> None:
        raise NotImplementedError
