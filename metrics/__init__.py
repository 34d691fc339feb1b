"""Metric runners (deletion, insertion, VEA, pointing game, ...), registered in ``METRICS``."""
