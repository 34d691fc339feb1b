"""Explanation methods, one module each; importing this package registers them in ``METHODS``."""

from xaibench.methods import bbam, drise, gradcam, odam

__all__ = ["bbam", "drise", "gradcam", "odam"]
