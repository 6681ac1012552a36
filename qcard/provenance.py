"""Where a card came from: versions, git state, hardware, command, times."""
from __future__ import annotations

import datetime as _dt
import platform
import shlex
import os
import subprocess
import sys
import threading
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from .version import __version__


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_state() -> tuple:
    """(commit, dirty) of the qcard source tree, or (None, None) when not installed from git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: Optional[str] = None) -> Optional[str]:
    """The name of the GPU `device` names ("cuda", "cuda:1"); None for a CPU device. Without a device: the
    first GPU, where one is available."""
    if "torch" not in sys.modules or (device is not None and not str(device).startswith("cuda")):
        return None
    import torch
    if torch.cuda.is_available():
        index = str(device).partition(":")[2] if device else ""
        return torch.cuda.get_device_name(int(index) if index.isdigit() else 0)
    return None


def torch_threads() -> Optional[int]:
    """The intra-op thread count torch runs with: CPU reductions (and so the last digits of a
    result) depend on it. None when torch was not used."""
    if "torch" not in sys.modules:
        return None
    import torch
    return int(torch.get_num_threads())


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("qcard", "__main__.py")):
        argv[0] = "qcard"
    return " ".join(shlex.quote(a) for a in argv)


def collect(*, seed: Optional[int], deterministic: bool, config_sha256: Optional[str],
            device: Optional[str] = None) -> Dict[str, Any]:
    """The card's provenance block. `gpu` names the GPU the point ran on (None when it ran on the CPU, even on
    a machine that has one)."""
    commit, dirty = git_state()
    return {
        "qcard_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "gpu": gpu_name(device),
        "torch_threads": torch_threads(),
        "seed": seed,
        "deterministic": deterministic,
        "config_sha256": config_sha256,
        "command": command_line(),
    }


# --------------------------------------------------------------------------- memory of one point

MEMORY_SAMPLE_S = 0.05
MEMORY_HOW = ("resident set size of the process running the point (qcard's own process, not its data-loader "
              "workers), sampled every 50 ms from /proc/self/statm while the point ran; it includes what the "
              "process held before the point started (rss_start_mb)")


def rss_bytes() -> Optional[int]:
    """The resident set size of this process now, or None where the platform does not say."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:       # psutil missing or refused: no figure rather than a wrong one
        return None


class PeakMemory:
    """Peak memory while a block runs: the process's resident memory (a sampling thread, since ru_maxrss is
    the maximum since the process started, not since this point did) and, on CUDA, the peak of
    torch.cuda.max_memory_allocated (reset when the block starts).

        with PeakMemory() as mem:
            run the point
        prov["memory"] = mem.record()
    """

    def __init__(self, interval_s: float = MEMORY_SAMPLE_S):
        self.interval_s = interval_s
        self.start = self.peak = None
        self.gpu_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        rss = rss_bytes()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @staticmethod
    def _cuda_in_use() -> bool:
        # CUDA first used inside the block: its peak since initialization is the block's peak
        torch = sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())

    def __enter__(self) -> "PeakMemory":
        self.start = rss_bytes()
        self.peak = self.start
        if self._cuda_in_use():
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="qcard-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._cuda_in_use():
            self.gpu_peak = int(sys.modules["torch"].cuda.max_memory_allocated())

    def record(self) -> Optional[Dict[str, Any]]:
        """The card's provenance.memory, in MB (10^6 bytes), or None where nothing could be measured: the
        peaks so far (inside the block) or of the whole block (after it)."""
        if self._thread is not None and self._thread.is_alive():
            self._sample()
            if self._cuda_in_use():
                self.gpu_peak = int(sys.modules["torch"].cuda.max_memory_allocated())
        if self.peak is None and self.gpu_peak is None:
            return None
        mb = (lambda b: None if b is None else round(b / 1e6, 1))
        return {"peak_rss_mb": mb(self.peak), "rss_start_mb": mb(self.start), "peak_gpu_mb": mb(self.gpu_peak),
                "how": MEMORY_HOW + ("; GPU: torch.cuda.max_memory_allocated, reset when the point started"
                                     if self.gpu_peak is not None else "")}
