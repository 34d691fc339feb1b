"""Presets: named bundles of metric (and method) parameters that select a set of conventions.

A suite's ``preset: NAME`` (or ``--preset NAME`` on ``xaibench run`` and ``xaibench
evaluate``) merges the preset's parameters into every metric and method entry of the suite
whose registered name the preset lists; parameters the entry sets itself win. The merged
parameters are what the suite runs with, so they enter every unit's config and hash, and the
conventions they choose are stored with every result row (``results.convention``).

Plugins register presets in ``PRESETS`` (``xaibench.registry``, ``PRESETS.register(name,
Preset(...))``); the built-in ones live with the metrics (``xaibench.metrics.presets``:
``paper``, the official ODAM evaluation conventions). ``xaibench.suite.apply_preset`` merges
a suite's preset; an unknown name fails there, listing the known presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Preset:
    """``metrics`` / ``methods``: registered name -> parameters to merge in; ``description``
    says in one line what the preset selects."""

    name: str
    description: str
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    methods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def merge(
        self, kind: Literal["metrics", "methods"], name: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``params`` of the ``kind`` plugin registered as ``name`` over the preset's."""
        table = self.metrics if kind == "metrics" else self.methods
        return {**table.get(name, {}), **params}
