"""The DataLoaders of one point: how many worker processes, pinned memory, workers kept between passes.

    loaders = PointLoaders("auto", device="cuda")
    for x, y in loaders.get(evaluation, batch_size=256): ...     # FP32 eval
    for x, y in loaders.get(evaluation, batch_size=256): ...     # quantized eval: the same workers
    loaders.close()                                              # at the end of the point

`num_workers: auto` resolves per dataset: datasets that read and decode files per item (an image folder of
JPEGs, CIFAR's arrays) get min(cpu_share() - 1, 8) workers, the point's CPU share being its torch threads (all
cores in a plain run, cores / N under `--workers N`, `cpus_per_point` on Ray); datasets already held in memory as one tensor
(qcard:mnist5k, qcard:digits, synthetic noise) get 0, because a worker would only copy what the main process
already has. Results never depend on the worker count: eval order is the dataset's order, shuffled loaders
take their order and worker seeds from their own seeded generator, and a pass draws from the global RNG
exactly once whatever the workers (as a fresh DataLoader always did), so the methods' random streams do not
move either.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..errors import DatasetError

AUTO = "auto"
MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_share() -> int:
    """The cores this point may use: torch's threads, which `--workers N` and Ray set to the point's share
    (capped by the cores this process may run on)."""
    return max(1, min(usable_cores(), torch.get_num_threads()))


def decodes_per_item(dataset: Any) -> bool:
    """Whether reading an item does real work (file reads, decoding, resizing) that workers can overlap.
    A subset asks the dataset it selects from; a dataset says so with `decodes_per_item = True`."""
    while hasattr(dataset, "base") and not getattr(dataset, "decodes_per_item", False):
        dataset = dataset.base
    return bool(getattr(dataset, "decodes_per_item", False))


def resolve_num_workers(setting: Union[int, str, None], dataset: Any) -> int:
    """The worker count a loader of `dataset` runs with for the config's `num_workers` (an int or "auto")."""
    if setting is None or setting == AUTO:
        return min(cpu_share() - 1, MAX_AUTO_WORKERS) if decodes_per_item(dataset) else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise DatasetError(f"dataset.num_workers must be a non-negative integer or 'auto', got {setting!r}")
    return int(setting)


class PointLoaders:
    """Makes (and for passes in dataset order, keeps) the DataLoaders of one point.

    A loader in dataset order (evaluation, calibration) with workers is kept for the whole point with
    persistent workers, so the FP32 eval, the calibration passes and every quantized eval of the same data
    and batch size fork their workers once. Shuffled (training) loaders are made fresh each time: their
    worker seeds are drawn per epoch from the loader's generator, and keeping workers would change that
    stream, and so the training, with the worker count."""

    def __init__(self, num_workers: Union[int, str, None] = AUTO, device: str = "cpu"):
        self.setting = AUTO if num_workers is None else num_workers
        self.device = str(device)
        self.pin_memory = self.device.startswith("cuda")
        self._kept: Dict[Tuple[int, int], Tuple[Any, torch.utils.data.DataLoader]] = {}
        self.forks = 0                          # worker start-ups (persistent loaders count once)

    def workers_for(self, dataset: Any) -> int:
        return resolve_num_workers(self.setting, dataset)

    def _make(self, dataset, batch_size: int, workers: int, *, shuffle: bool, generator, persistent: bool,
              sampler: Any = None):
        kwargs: Dict[str, Any] = {"sampler": sampler} if sampler is not None else {}
        if workers > 0:
            kwargs.update(persistent_workers=persistent, prefetch_factor=2)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                           num_workers=workers, pin_memory=self.pin_memory, **kwargs)

    def get(self, dataset, batch_size: int, *, shuffle: bool = False, generator: Optional[torch.Generator] = None,
            sampler: Any = None):
        """A loader of `dataset`. In dataset order with workers: the point's kept loader for (dataset, batch).
        `sampler` (a shuffling sampler that shares `generator`, e.g. one a resumed run can start mid-epoch)
        stands for shuffle=True."""
        workers = self.workers_for(dataset)
        if shuffle or sampler is not None or workers == 0:
            if workers:
                self.forks += 1
            # generator None: the DataLoader draws its seed from the global RNG, as it always did
            return self._make(dataset, batch_size, workers, shuffle=shuffle and sampler is None, generator=generator,
                              persistent=False, sampler=sampler)
        key = (id(dataset), int(batch_size))
        kept = self._kept.get(key)
        if kept is None or kept[0] is not dataset:
            # its own generator: a kept loader must not draw from the global RNG on its first pass only
            loader = self._make(dataset, batch_size, workers, shuffle=False,
                                generator=torch.Generator().manual_seed(0), persistent=True)
            self._kept[key] = (dataset, loader)
            self.forks += 1
        if generator is None:
            # what a fresh loader without a generator draws from the global RNG, drawn here on every pass
            torch.empty((), dtype=torch.int64).random_()
        return self._kept[key][1]

    def describe(self, dataset: Any = None) -> Dict[str, Any]:
        """What the card's provenance records: the setting, the resolved count, pinning, persistence."""
        out: Dict[str, Any] = {"setting": self.setting, "pin_memory": self.pin_memory,
                               "persistent_workers": True, "cores": cpu_share()}
        if dataset is not None:
            out["num_workers"] = self.workers_for(dataset)
        return out

    def close(self) -> None:
        """Stop the kept loaders' workers now (not whenever the garbage collector gets to them)."""
        kept, self._kept = self._kept, {}
        for _, loader in kept.values():
            iterator = getattr(loader, "_iterator", None)
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            loader._iterator = None

    def __enter__(self) -> "PointLoaders":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
