"""The CLI layer: subcommands that live in their own modules, loaded by qcard.cli only when called,
and the one wrapper that turns a user's error into one line and exit code 2."""
from __future__ import annotations

import errno
import functools
import os
import sys

import click

from ..errors import QcardError, RunInterrupted

# what the user can do about an OS error, by errno
_OS_FIXES = {
    errno.EACCES: "check the folder's permissions or choose another with --out / -o",
    errno.EPERM: "check the folder's permissions or choose another with --out / -o",
    errno.EROFS: "the file system is read-only: choose another folder with --out / -o",
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another folder",
    errno.ENAMETOOLONG: "a file name is too long: shorten the experiment name, labels or output path",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: what failed, on which path, and the fix when there is one."""
    what = (exc.strerror or os.strerror(exc.errno)) if exc.errno else str(exc)
    where = f": {exc.filename}" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno)
    return f"{what}{where}" + (f" ({fix})" if fix else "")


def user_errors(fn):
    """Errors caused by input or by the machine (permissions, full disk, long names) become one clear
    line and exit code 2, never a traceback; an interrupted command exits 130 (Ctrl-C) or 128+signal."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QcardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno == errno.EPIPE:     # stdout closed by its reader (`| head`): click exits quietly
                raise
            click.echo(f"error: {os_error_line(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished results are kept; rerun the same command to do the rest", err=True)
            sys.exit(130)
        except RunInterrupted as exc:
            click.echo(f"{exc}: finished results are kept; rerun the same command to do the rest", err=True)
            sys.exit(128 + exc.signum)
    return wrapper


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def echo_document(text: str, markdown: bool) -> None:
    """A document on stdout. Markdown shown on a terminal loses its backslash escapes (`\\|`, `\\*`): a
    person reads it there; piped or redirected to a file it stays Markdown, as `-o`/`--out` write it."""
    if markdown and stdout_is_terminal():
        from ..cards.render import md_plain
        text = md_plain(text)
    click.echo(text, nl=False)
