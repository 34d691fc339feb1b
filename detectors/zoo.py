"""Small detectors built from torchvision parts, and the demo detectors trained on synthetic scenes.

``build_small_fcos`` / ``build_small_frcnn`` return plain torchvision ``FCOS`` / ``FasterRCNN``
models over a small ResNet-like body with an FPN (levels "0", "1", "2", "pool" at strides
8, 16, 32, 64 px). They are sized for images of about 160 x 160 px with objects of 12-64 px.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation

WIDTHS = (16, 32, 64, 96, 128)
"""Channels of the stem (stride 2) and of the four stages (strides 4, 8, 16, 32)."""
FPN_CHANNELS = 64
"""FPN width; a multiple of 32 because FCOS's head uses GroupNorm(32)."""


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """One residual BasicBlock that halves the resolution."""
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
    )
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride=2, downsample=downsample))


def small_backbone(widths: tuple[int, ...] = WIDTHS, fpn_channels: int = FPN_CHANNELS) -> BackboneWithFPN:
    """A five-stage ResNet-like body (strides 2-32) with an FPN on strides 8, 16, 32 (+ pool, 64)."""
    stem, *stages = widths
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=Conv2dNormActivation(3, stem, stride=2))
    for i, (cin, cout) in enumerate(zip(widths[:-1], stages), start=1):
        layers[f"layer{i}"] = _stage(cin, cout)
    return BackboneWithFPN(
        nn.Sequential(layers),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=list(widths[2:]),
        out_channels=fpn_channels,
    )


def build_small_fcos(num_classes: int, image_size: int = 160, head_convs: int = 2) -> FCOS:
    """A small FCOS; ``num_classes`` includes the background (torchvision convention).

    Anchor sizes are half the strides and the centre-sampling radius is doubled, so
    objects up to 32 px go to stride 8 and larger ones to stride 16 with the usual
    1.5-stride sampling radius.
    """
    backbone = small_backbone()
    anchors = AnchorGenerator(((4,), (8,), (16,), (32,)), ((1.0,),) * 4)
    return FCOS(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        anchor_generator=anchors,
        head=FCOSHead(backbone.out_channels, 1, num_classes, num_convs=head_convs),
        center_sampling_radius=3.0,
        score_thresh=0.05,
    )


def build_small_frcnn(num_classes: int, image_size: int = 160, representation: int = 256) -> FasterRCNN:
    """A small Faster R-CNN; ``num_classes`` includes the background (torchvision convention)."""
    backbone = small_backbone()
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    roi_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_batch_size_per_image=128,
    )
