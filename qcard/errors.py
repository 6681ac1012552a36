"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a choice is close to value, else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class QcardError(Exception):
    """Base of errors caused by user input (config, references, files)."""


class ConfigError(QcardError):
    """A config file is malformed; the message names the file and key path."""


class UnknownNameError(QcardError, KeyError):
    """A name that is not in a registry; the message lists the choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = ""):
        choices = sorted(choices)
        msg = f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choices: {', '.join(choices)}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.kind, self.name, self.choices = kind, name, choices

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelLoadError(QcardError):
    """A model reference or its weights could not be loaded."""


class DatasetError(QcardError):
    """A dataset reference could not be loaded."""


class RunInterrupted(BaseException):
    """A run stopped by a signal (SIGTERM from timeout, Slurm, kill). A BaseException like
    KeyboardInterrupt, so that no `except Exception` records it as a failed point."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
