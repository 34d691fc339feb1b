"""xaibench: a benchmark and evaluation harness for explanation methods of object detectors."""

from xaibench.registry import DATASETS, DETECTORS, METHODS, METRICS, NMS, RECIPES, Registry
from xaibench.types import Detections, Instance, Provenance, Saliency, Sample, Target

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "DETECTORS",
    "METHODS",
    "METRICS",
    "NMS",
    "RECIPES",
    "Detections",
    "Instance",
    "Provenance",
    "Registry",
    "Saliency",
    "Sample",
    "Target",
]
