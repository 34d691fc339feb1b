"""The registered detectron2 detectors.

detectron2 is optional: these builders are registered whether or not it is installed, and
import the wrappers (``xaibench.detectors.detectron2``, which imports detectron2) only when
called; without detectron2 they raise an ImportError naming the install script.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import partial
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
    name: str = "detectron2",
) -> Detector:
    """Any detectron2 Faster R-CNN (``GeneralizedRCNN``, standard RoI heads) or RetinaNet,
    built from a config and wrapped (``xaibench.detectors.detectron2.build``).

    ``config``: a yaml path, the name of a config shipped with detectron2
    (``"COCO-Detection/retinanet_R_50_FPN_3x.yaml"``) or a ``CfgNode``; ``weights``: None
    (random initialisation; the config's ``MODEL.WEIGHTS`` is ignored, nothing is downloaded)
    or a checkpoint file (``.pth`` or model-zoo ``.pkl``). ``num_classes`` (without
    background; default the config's, or ``len(class_names)``), ``min_size``/``max_size``
    (test-time resize) and ``score_thresh`` (test score threshold) override the config;
    ``opts`` are further ``KEY VALUE`` overrides."""
    d2 = wrappers()
    from detectron2.modeling import build_model

    cfg = d2.load_config(config, opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = str(device) if device is not None else "cpu"
    if num_classes is None and class_names is not None:
        num_classes = len(class_names) - (class_names[0] == "__background__")
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    if min_size is not None:
        cfg.INPUT.MIN_SIZE_TEST = min_size
    if max_size is not None:
        cfg.INPUT.MAX_SIZE_TEST = max_size
    if score_thresh is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_thresh
    model = build_model(cfg)
    if weights is not None:
        d2.load_weights(model, weights)
    size = {"min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST}
    return d2.wrap(model, class_names, name, device, **size)


for _name, _config in R50_FPN_CONFIGS.items():
    _build = partial(detectron2_detector, _config, name=_name)
    _build.__name__ = f"build_{_name}"
    _build.__doc__ = (
        f"detectron2 ``{_config}`` (80 COCO classes, test size 800 / 1333); ``weights``: None "
        "(random initialisation, nothing is downloaded) or a checkpoint file (e.g. detectron2's "
        "model-zoo ``model_final_*.pkl``); the other arguments override the shipped config."
    )
    DETECTORS.register(_name, _build)
