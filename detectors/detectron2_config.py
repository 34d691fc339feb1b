"""detectron2 configs and weights: yaml files read from the detectron2 package by path (never
through ``detectron2.model_zoo``, which needs pkg_resources), checkpoints loaded strictly, and
small configs for 160 px synthetic scenes (a small ResNet-FPN built from detectron2's own
blocks, registered in its ``BACKBONE_REGISTRY``), used by the tests and trainable with the
``baseline`` recipe through ``TrainingAdapter``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import detectron2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem
from torch import nn


def config_file(name: str) -> Path:
    """A yaml config shipped inside the detectron2 package (``model_zoo/configs/<name>``),
    found by path: ``detectron2.model_zoo`` itself needs pkg_resources and is never imported."""
    root = Path(detectron2.__file__).parent / "model_zoo" / "configs"
    path = root / name
    if not path.is_file():
        shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
        raise FileNotFoundError(
            f"no detectron2 config {name!r} in {root}; shipped configs include: "
            + ", ".join(s for s in shipped if "Detection/" in s)
        )
    return path


def load_config(config: str | Path | CfgNode, opts: Sequence[str] = ()) -> CfgNode:
    """A detectron2 ``CfgNode`` from a yaml file (a path, or the name of a config shipped with
    detectron2 such as ``"COCO-Detection/retinanet_R_50_FPN_3x.yaml"``; ``_BASE_`` files are
    read by detectron2 itself) or a copy of a given ``CfgNode``; ``opts`` are ``KEY VALUE``
    overrides as detectron2's ``merge_from_list`` takes them."""
    if isinstance(config, CfgNode):
        cfg = config.clone()
    else:
        path = Path(config)
        if not path.is_file():
            path = config_file(str(config))
        cfg = get_cfg()
        cfg.merge_from_file(str(path))
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


class _StrictCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, raising ``ValueError`` where it would only log parameters
    that are missing from the file or do not fit the model."""

    def _log_incompatible_keys(self, incompatible: Any) -> None:
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing {', '.join(incompatible.missing_keys[:5])}")
        if incompatible.incorrect_shapes:
            wrong = ", ".join(key for key, *_ in incompatible.incorrect_shapes[:5])
            problems.append(f"wrong shape {wrong}")
        if problems:
            raise _WeightsMismatch("; ".join(problems))


class _WeightsMismatch(ValueError):
    pass


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a detectron2 checkpoint (``.pth`` from its training, or a model-zoo ``.pkl``) with
    detectron2's checkpointer; a file that does not fit the model is an error, not a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        _StrictCheckpointer(model).load(str(path))
    except _WeightsMismatch as err:
        raise ValueError(f"weights file {path} does not fit the model: {err}") from err
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read weights file {path}: {err}") from err


@BACKBONE_REGISTRY.register()
def build_xaibench_small_resnet_fpn_backbone(cfg: CfgNode, input_shape: Any) -> FPN:
    """A small ResNet-FPN from detectron2's own blocks (``small_config``): a stem of
    ``RESNETS.STEM_OUT_CHANNELS`` (stride 4), one ``BasicBlock`` per stage res2..res5 with
    ``RESNETS.RES2_OUT_CHANNELS`` channels doubling per stage, ``RESNETS.NORM``, and an FPN
    over ``FPN.IN_FEATURES`` with a max-pooled extra level."""
    norm = cfg.MODEL.RESNETS.NORM
    stem = BasicStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = (
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
    )
    stages = []
    for i in range(4):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                1,
                in_channels=in_channels,
                out_channels=out_channels,
                stride_per_block=[1 if i == 0 else 2],
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    bottom_up = ResNet(stem, stages, out_features=cfg.MODEL.FPN.IN_FEATURES)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        top_block=LastLevelMaxPool(),
    )


def small_config(architecture: str, num_classes: int, image_size: int = 160) -> CfgNode:
    """A small ``"faster_rcnn"`` (from ``Base-RCNN-FPN.yaml``) or ``"retinanet"`` (from
    ``Base-RetinaNet.yaml``) with the small backbone (BatchNorm, FPN of 64 channels on strides
    8-64) and anchors and head sizes for ``image_size`` px images of 12-80 px objects, tested
    at ``image_size``; ``num_classes`` excludes the background (detectron2's convention)."""
    levels = ["p3", "p4", "p5", "p6"]
    common = [
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_xaibench_small_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS", 64,
        "INPUT.MIN_SIZE_TEST", image_size,
        "INPUT.MAX_SIZE_TEST", image_size,
    ]  # fmt: skip
    if architecture == "faster_rcnn":
        cfg = load_config("Base-RCNN-FPN.yaml", common)
        cfg.merge_from_list(
            [
                "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128]],
                "MODEL.RPN.IN_FEATURES", levels,
                "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 600,
                "MODEL.RPN.POST_NMS_TOPK_TRAIN", 300,
                "MODEL.RPN.PRE_NMS_TOPK_TEST", 300,
                "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
                "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 128,
                "MODEL.ROI_HEADS.IN_FEATURES", levels[:3],
                "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
                "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
                "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2,
            ]
        )  # fmt: skip
        return cfg
    if architecture == "retinanet":
        cfg = load_config("Base-RetinaNet.yaml", common)
        sizes = [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in (12, 24, 48, 96)]
        cfg.merge_from_list(
            [
                "MODEL.ANCHOR_GENERATOR.SIZES", sizes,
                "MODEL.RETINANET.IN_FEATURES", levels,
                "MODEL.RETINANET.NUM_CLASSES", num_classes,
                "MODEL.RETINANET.NUM_CONVS", 2,
                "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 200,
            ]
        )  # fmt: skip
        return cfg
    raise ValueError(f"architecture must be 'faster_rcnn' or 'retinanet', got {architecture!r}")
