"""The CLI layer: subcommands that live in their own modules, loaded by qcard.cli only when called,
and the one wrapper that turns a user's error into one line and exit code 2."""
from __future__ import annotations

import functools
import sys

import click

from ..errors import QcardError


def user_errors(fn):
    """Errors caused by input become one clear line and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QcardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    return wrapper
