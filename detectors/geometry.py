"""``InputGeometry`` lives in the core, ``xaibench.geometry`` (outside detectors use it
without an internal module); this path keeps older imports working."""

from xaibench.geometry import InputGeometry

__all__ = ["InputGeometry"]
