"""Detector wrappers, NMS strategies and training recipes; importing registers them."""

from xaibench.detectors import torchvision, training, zoo

__all__ = ["torchvision", "training", "zoo"]
