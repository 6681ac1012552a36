"""Where a card came from: versions, git state, hardware, command, times."""
from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
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


def gpu_name() -> Optional[str]:
    if "torch" not in sys.modules:
        return None
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
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


def collect(*, seed: Optional[int], deterministic: bool, config_sha256: Optional[str]) -> Dict[str, Any]:
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
        "gpu": gpu_name(),
        "torch_threads": torch_threads(),
        "seed": seed,
        "deterministic": deterministic,
        "config_sha256": config_sha256,
        "command": command_line(),
    }
