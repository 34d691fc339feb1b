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

import inspect
import json
import os
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from pydantic import TypeAdapter, ValidationError

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
    """``params`` checked against the signature of ``factory`` (a class or function): an
    unknown key (where it takes no ``**kwargs``) or a value of the wrong type raises
    ``typer.BadParameter`` naming ``option``, the key (after ``prefix``, e.g. ``"drise."``)
    and what was expected; values come back
    converted to the annotated type (``5`` for a float parameter becomes ``5.0``). Parameters
    whose annotation pydantic cannot check (tensors, modules) are passed through."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(target)
    accepted = {n: p for n, p in signature.parameters.items() if n != "self"}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    out = dict(params)
    for key, value in params.items():
        if key not in accepted:
            if open_ended:
                continue
            known = ", ".join(n for n, p in accepted.items() if p.kind is not p.VAR_POSITIONAL)
            raise typer.BadParameter(
                f"{option} {prefix}{key}: not a setting of {_name(factory)}; expected one of "
                f"{known}"
            )
        if key not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # not a type pydantic validates: leave it to the plugin
            continue
        try:
            out[key] = _validate(adapter, value)
        except ValidationError as err:
            hint = hints[key]
            expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            reason = err.errors()[0]["msg"]
            raise typer.BadParameter(
                f"{option} {prefix}{key}={value!r}: expected {expected} ({reason})"
            ) from err
    return out


def _validate(adapter: TypeAdapter, value: Any) -> Any:
    """The value as the annotation wants it; a value that JSON read as a number or a boolean
    (``layer=0``) is tried as its text too, where the annotation wants a string."""
    try:
        return adapter.validate_python(value)
    except ValidationError:
        if isinstance(value, str) or value is None:
            raise
        return adapter.validate_python(json.dumps(value))


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


def _name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__name__", type(factory).__name__)
