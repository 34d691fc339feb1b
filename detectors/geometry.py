"""``InputGeometry`` lives in the core (``xaibench.geometry``) so that outside detectors use it
without an internal module; the wrappers here import it by this path too."""

from xaibench.geometry import InputGeometry

__all__ = ["InputGeometry"]
