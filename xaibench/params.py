"""Plugin settings checked against the plugin's signature before anything runs: an unknown
key (where the plugin takes no ``**kwargs``) or a value of the wrong type is a ``ParamError``
naming the key and what was expected, never a raw ``TypeError`` from inside the plugin."""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import TypeAdapter, ValidationError


class ParamError(ValueError):
    """A setting ``key`` that the plugin does not take, or whose value has the wrong type;
    the message starts with the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def checked_params(factory: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the signature of ``factory`` (a class or function), values
    converted to the annotated type (``5`` for a float parameter becomes ``5.0``). Parameters
    whose annotation pydantic cannot check (tensors, modules) are passed through."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(target)
    accepted = {n: p for n, p in signature.parameters.items() if n != "self"}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    try:  # a partial's parameters are its function's
        hints = typing.get_type_hints(target.func if isinstance(target, partial) else target)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    out = dict(params)
    for key, value in params.items():
        if key not in accepted:
            if open_ended:
                continue
            known = ", ".join(n for n, p in accepted.items() if p.kind is not p.VAR_POSITIONAL)
            raise ParamError(
                key, f"{key}: not a setting of {_name(factory)}; expected one of {known}"
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
            raise ParamError(key, f"{key}={value!r}: expected {expected} ({reason})") from err
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


def _name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__name__", type(factory).__name__)
