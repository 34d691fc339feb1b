"""Detector wrappers, NMS strategies and training recipes; importing registers them."""

from xaibench.detectors import torchvision

__all__ = ["torchvision"]
