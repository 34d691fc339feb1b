"""Explanation methods, one module each; importing this package registers them in ``METHODS``."""

from xaibench.methods import odam

__all__ = ["odam"]
