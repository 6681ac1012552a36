"""qcard: quantization benchmarking that writes a quantization card for every result.

Python API (heavy modules load on first use, so `import qcard` is cheap):
    qcard.load_config(path) -> Experiment
    qcard.run(config_or_path, out=None, force=False, workers=1, executor="local", address=None,
              max_retries=None) -> RunSummary
    qcard.zoo.load_model(ref, ...), qcard.data.load_dataset(ref, split, ...)
"""
from __future__ import annotations

from .version import __version__


def load_config(path):
    from .config import load_config as _load
    return _load(path)


def run(config, *, out=None, force=False, only=None, progress=None, workers=1, executor="local", address=None,
        max_retries=None):
    from .runner import run as _run
    return _run(config, out=out, force=force, only=only, progress=progress, workers=workers,
                executor=executor, address=address, max_retries=max_retries)


def __getattr__(name):
    if name in ("zoo", "data", "cards", "cost", "quant", "methods"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qcard' has no attribute '{name}'")
