"""Metric runners (deletion, insertion, VEA, pointing game, ...), registered in ``METRICS``."""

from xaibench.metrics import discrimination, drift, faithfulness, localization, sanity

__all__ = ["discrimination", "drift", "faithfulness", "localization", "sanity"]
