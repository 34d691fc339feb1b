"""One small registry type, one instance per plugin kind.

Plugins register with a decorator (``@METHODS.register("odam")``); third-party packages
register through the entry-point group ``xaibench.<kind>`` and are discovered lazily the
first time a registry is read.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that no plugin of this kind registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Named plugins of one kind (detectors, methods, metrics, nms, recipes, datasets,
    presets)."""

    def __init__(self, kind: str, requires: tuple[Registry[Any], ...] = ()) -> None:
        """``requires``: registries whose plugins register entries here on import (loaded
        first)."""
        self.kind = kind
        self.requires = requires
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(target: T) -> T:
            self._add(name, target)
            return target

        return decorator

    def _add(self, name: str, obj: T) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """The plugin registered as ``name``; an unknown name lists the known ones, the closest
        first."""
        self._load_entry_points()
        if name in self._entries:
            return self._entries[name]
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        by_closeness = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}: "
            f"{', '.join(by_closeness) or '(none)'}"
        )

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the registered class or factory ``name`` with ``kwargs``."""
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} is not callable")
        return factory(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern`` (``"*fcos*"``), sorted."""
        self._load_entry_points()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for registry in self.requires:
            registry._load_entry_points()
        for ep in entry_points(group=f"xaibench.{self.kind}"):
            if ep.name in self._entries:
                continue
            loaded = ep.load()
            # A module entry point registers itself on import; anything else is the plugin.
            if ep.name not in self._entries and not _is_module(loaded):
                self._add(ep.name, loaded)


def plugin_name(label: str) -> str:
    """The registered name behind a label. A plugin listed more than once (a method on two
    layers) gets one label per listing, ``NAME@VARIANT``: ``plugin_name("odam@p3") == "odam"``."""
    name, _, variant = label.partition("@")
    if not name or (label.count("@") and not variant):
        raise ValueError(f"a label is NAME or NAME@VARIANT, got {label!r}")
    return name


def _is_module(obj: object) -> bool:
    return type(obj).__name__ == "module"


DETECTORS: Registry[Callable[..., Any]] = Registry("detectors")
METHODS: Registry[Callable[..., Any]] = Registry("methods")
METRICS: Registry[Callable[..., Any]] = Registry("metrics")
NMS: Registry[Callable[..., Any]] = Registry("nms")
RECIPES: Registry[Callable[..., Any]] = Registry("recipes")
DATASETS: Registry[Callable[..., Any]] = Registry("datasets")
PRESETS: Registry[Any] = Registry("presets", requires=(METRICS, METHODS))
"""Metric-parameter presets (``xaibench.presets.Preset``), e.g. ``paper``; the built-in ones
register when the metric plugins are imported."""

ALL_REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (DETECTORS, METHODS, METRICS, NMS, RECIPES, DATASETS)
}
