"""Detector wrappers, NMS strategies and training recipes; importing registers them.

The detectron2 builders register without importing detectron2 (an optional dependency).
"""

from xaibench.detectors import (
    detectron2_builders,
    evidence,
    featurenms,
    nms,
    odam_train,
    torchvision,
    training,
    zoo,
)

__all__ = [
    "detectron2_builders",
    "evidence",
    "featurenms",
    "nms",
    "odam_train",
    "torchvision",
    "training",
    "zoo",
]
