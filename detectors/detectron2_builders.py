"""The registered detectron2 detectors.

detectron2 is optional: these builders are registered whether or not it is installed, and
import the wrappers (``xaibench.detectors.detectron2``, which imports detectron2) only when
called; without detectron2 they raise an ImportError naming the install script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from xaibench.detector import Detector
from xaibench.registry import DETECTORS

R50_FPN_CONFIGS: dict[str, str] = {
    "detectron2_faster_rcnn_R_50_FPN": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "detectron2_retinanet_R_50_FPN": "COCO-Detection/retinanet_R_50_FPN_3x.yaml",
}
"""Registered name -> config shipped with detectron2 (read from the package's files)."""


def wrappers() -> ModuleType:
    """``xaibench.detectors.detectron2``; an ImportError naming the install script if
    detectron2 is missing."""
    return importlib.import_module("xaibench.detectors.detectron2")


@DETECTORS.register("detectron2")
def detectron2_detector(
    config: str | Path | Any,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    score_thresh: float | None = None,
    device: str | None = None,
    opts: Sequence[str] = (),
) -> Detector:
    """Any detectron2 Faster R-CNN (``GeneralizedRCNN``, standard RoI heads) or RetinaNet:
    ``config`` is a yaml path, the name of a config shipped with detectron2
    (``"COCO-Detection/retinanet_R_50_FPN_3x.yaml"``) or a ``CfgNode``; ``weights`` a
    checkpoint file (``.pth`` or model-zoo ``.pkl``) or None (random). The other arguments
    override the config (see ``xaibench.detectors.detectron2.build``)."""
    return wrappers().build(
        config,
        weights=weights,
        num_classes=num_classes,
        class_names=class_names,
        min_size=min_size,
        max_size=max_size,
        score_thresh=score_thresh,
        device=device,
        opts=opts,
        name="detectron2",
    )


def _r50_builder(name: str, config: str) -> Callable[..., Detector]:
    def build(
        weights: str | Path | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        score_thresh: float | None = None,
        device: str | None = None,
        opts: Sequence[str] = (),
    ) -> Detector:
        """weights: None (random initialisation, nothing is downloaded) or a checkpoint file
        (e.g. detectron2's model-zoo ``model_final_*.pkl``); the other arguments override the
        shipped config (80 COCO classes, test size 800 / 1333)."""
        return wrappers().build(
            config,
            weights=weights,
            num_classes=num_classes,
            class_names=class_names,
            min_size=min_size,
            max_size=max_size,
            score_thresh=score_thresh,
            device=device,
            opts=opts,
            name=name,
        )

    build.__name__ = f"build_{name}"
    build.__doc__ = f"detectron2 ``{config}``. " + (build.__doc__ or "")
    return build


for _name, _config in R50_FPN_CONFIGS.items():
    DETECTORS.register(_name, _r50_builder(_name, _config))
