"""Metric runners (deletion, insertion, VEA, pointing game, ...), registered in ``METRICS``,
and the built-in metric presets (``PRESETS``)."""

from xaibench.metrics import discrimination, drift, faithfulness, localization, presets, sanity

__all__ = ["discrimination", "drift", "faithfulness", "localization", "presets", "sanity"]
