"""Ordinary mistakes on the command line end in one line and exit code 2, not a traceback.

``with user_errors("IMAGE", debug):`` around a step turns the errors a wrong input causes
(``ValueError``, ``TypeError``, ``KeyError``, ``OSError``, and any exception whose class sets
``option``) into ``error: IMAGE: <message>`` on stderr and exit code 2. An exception's own
``option`` attribute (e.g. ``"--weights"``) names the argument instead of the step's. With
``--debug`` or the environment variable ``XAIBENCH_DEBUG=1`` the exception propagates with
its traceback.

``typed_params`` checks ``-p key=value`` settings against the plugin's signature (unknown
keys, wrong types) before anything runs, so that they never surface as raw TypeErrors.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from xaibench.params import ParamError, checked_params

DEBUG_ENV = "XAIBENCH_DEBUG"
ORDINARY_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)


def debugging(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or ``XAIBENCH_DEBUG`` set to a non-empty
    value other than 0."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def user_errors(argument: str, debug: bool = False) -> Iterator[None]:
    """Report an ordinary error of the enclosed step as one line naming ``argument`` (or the
    exception's own ``option``) and exit with code 2; re-raise it when ``debugging(debug)``."""
    try:
        yield
    except Exception as err:
        option = getattr(err, "option", None)
        if debugging(debug) or not (isinstance(err, ORDINARY_ERRORS) or option):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        hint = f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        typer.echo(f"error: {option or argument}: {message}{hint}", err=True)
        raise typer.Exit(2) from err


def typed_params(
    factory: Callable[..., Any], params: dict[str, Any], option: str, prefix: str = ""
) -> dict:
    """``checked_params`` for the command line: a ``ParamError`` becomes
    ``typer.BadParameter`` naming ``option`` and the key (after ``prefix``, e.g.
    ``"drise."``)."""
    try:
        return checked_params(factory, params)
    except ParamError as err:
        raise typer.BadParameter(f"{option} {prefix}{err}") from err


@contextmanager
def shown_warnings() -> Iterator[None]:
    """Print each warning of the enclosed step as one line ``warning: <message>`` on stderr
    (Python's default shows the source line and location too)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        typer.echo(f"warning: {' '.join(str(message).split())}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def output_folder(path: Path) -> Path:
    """Create the output folder ``path``; a path that is a file, or a folder that cannot be
    created, raises an ``OSError`` saying so."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a folder (or a new path)")
    path.mkdir(parents=True, exist_ok=True)
    return path
