"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN): the framework adapter of the dense and
RoI traces (``detectors/dense.py``, ``detectors/roi.py``).

The post-processing below is torchvision's own (same thresholds, same order of operations,
so the same boxes, scores and labels) with the indices kept: which level, cell, anchor,
class and proposal produced each detection. Labels are torchvision's: background at 0,
objects 1..K, ``class_probs`` column 0 the background (zero for sigmoid heads).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from xaibench.detectors.dense import DenseNetwork, dense_detections
from xaibench.detectors.local_head import GN_TOLERANCE, Branch, LocalConvHead, flatten_tower
from xaibench.detectors.network import Features, NetworkDetector, suppress
from xaibench.detectors.roi import Proposals, RoIAlignSettings, RoINetwork
from xaibench.detectors.training import check_finite
from xaibench.detectors.weights import pretrained, warn_random

from xaibench.geometry import InputGeometry
from xaibench.images import to_rgb_float, to_rgb_uint8
from xaibench.registry import DETECTORS

COCO_CLASS_NAMES: list[str] = [
    str(name) for name in tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
]
PROBE_SIZE = 256
"""Side (px) of the blank input run once at construction to name the feature levels."""


class TorchvisionDetector(NetworkDetector):
    """Common plumbing: input conversion, transform, backbone, level names."""

    stage_module = "backbone.body"
    framework = "torchvision"

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.feature_keys, self.feature_levels = self._name_levels()

    def _num_classes(self) -> int:
        raise NotImplementedError

    def _class_names(self, given: Sequence[str] | None) -> list[str]:
        """K + 1 names with the background first (the model's K + 1 outputs); default COCO's
        for a 91-class model, else ``class<i>``."""
        num_classes = self._num_classes()
        if given is None:
            if num_classes == len(COCO_CLASS_NAMES):
                return list(COCO_CLASS_NAMES)
            return [f"class{i}" for i in range(num_classes)]
        if len(given) != num_classes:
            raise ValueError(
                f"class_names has {len(given)} entries but the model predicts "
                f"{num_classes} classes (index 0 is the background)"
            )
        return list(given)

    def _name_levels(self) -> tuple[list[str], list[str]]:
        """The backbone's output keys and the level names ``p<k>`` (stride 2^k) they get,
        from one blank input: pyramid levels double their stride."""
        blank = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=self.device)
        with torch.no_grad():
            outputs = self._backbone(blank)
        first = round(math.log2(PROBE_SIZE / next(iter(outputs.values())).shape[-2]))
        return list(outputs), [f"p{first + i}" for i in range(len(outputs))]

    def _backbone(self, tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.model.backbone(tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return features

    def _to_tensors(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        out = []
        for i, image in enumerate(images):
            if np.issubdtype(np.asarray(image).dtype, np.floating):  # [0, 1], kept unrounded
                rgb01 = to_rgb_float(image, name=f"images[{i}]")
                out.append(torch.tensor(rgb01).permute(2, 0, 1).to(self.device))
                continue
            rgb = to_rgb_uint8(image, name=f"images[{i}]")
            t = torch.tensor(rgb).permute(2, 0, 1)  # a copy: the array may be read-only
            out.append(t.to(self.device, dtype=torch.float32).div_(255.0))
        return out

    def prepare(self, images: Sequence[np.ndarray]) -> tuple[ImageList, list[InputGeometry]]:
        tensors = self._to_tensors(images)
        image_list, _ = self.model.transform(tensors)
        padded = tuple(image_list.tensors.shape[-2:])
        geometry = [
            InputGeometry(tuple(t.shape[-2:]), tuple(size), padded)
            for t, size in zip(tensors, image_list.image_sizes, strict=True)
        ]
        return image_list, geometry

    def prepare_differentiable(self, images: torch.Tensor, geometry: InputGeometry) -> ImageList:
        """torchvision's transform (normalise, bilinear resize, pad) is differentiable."""
        image_list, _ = self.model.transform(list(images))
        return image_list

    def repeat_input(self, inputs: ImageList, copies: int) -> ImageList:
        return ImageList(inputs.tensors.expand(copies, -1, -1, -1), inputs.image_sizes * copies)

    def features(self, inputs: ImageList) -> Features:
        levels = self._backbone(inputs.tensors).values()
        return OrderedDict(zip(self.feature_levels, levels, strict=True))

    def _keyed(self, features: Features) -> OrderedDict[str, torch.Tensor]:
        """``features`` under the backbone's own keys, as torchvision's heads read them."""
        return OrderedDict(zip(self.feature_keys, features.values(), strict=True))


# ----------------------------------------------------------------------------------
# One-stage: FCOS and RetinaNet
# ----------------------------------------------------------------------------------


def one_stage_local_head(
    model: tvd.FCOS | tvd.RetinaNet,
    gn_tolerance: float = GN_TOLERANCE,
    exact_level_cells: int | None = None,
) -> LocalConvHead:
    """The head of a torchvision FCOS or RetinaNet as a ``LocalConvHead`` over its modules
    (branches ``cls``: ``cls_logits``; ``reg``: ``bbox_reg`` and, for FCOS, ``bbox_ctrness``)."""
    head = model.head
    reg_outputs = {"bbox_reg": head.regression_head.bbox_reg}
    if isinstance(model, tvd.FCOS):
        reg_outputs["bbox_ctrness"] = head.regression_head.bbox_ctrness
    return LocalConvHead(
        {
            "cls": Branch(
                flatten_tower(head.classification_head.conv),
                {"cls_logits": head.classification_head.cls_logits},
            ),
            "reg": Branch(flatten_tower(head.regression_head.conv), reg_outputs),
        },
        gn_tolerance,
        exact_level_cells,
    )


class OneStageDetector(TorchvisionDetector, DenseNetwork):
    """FCOS or RetinaNet. Provenance: level, cell (y, x), anchor, class.

    ``gn_tolerance`` and ``exact_level_cells``: the GroupNorm guard of the fast path on
    GroupNorm heads (FCOS, RetinaNet v2), see ``LocalConvHead``.
    """

    def __init__(
        self,
        model: tvd.FCOS | tvd.RetinaNet,
        *args: Any,
        gn_tolerance: float = GN_TOLERANCE,
        exact_level_cells: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.is_fcos = isinstance(model, tvd.FCOS)
        self.local_head = one_stage_local_head(model, gn_tolerance, exact_level_cells)
        self.num_anchors = model.head.classification_head.num_anchors

    def _num_classes(self) -> int:
        return int(self.model.head.classification_head.num_classes)

    def _split_raw(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-location outputs in torchvision's flat order (N, h*w*A, C) for one level."""
        a = self.num_anchors
        out = {}
        for key, value in raw.items():
            n, c, h, w = value.shape
            out[key] = value.view(n, a, c // a, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c // a)
        return out

    def _scores(self, flat: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class scores (..., K), torchvision's formula."""
        if self.is_fcos:
            return torch.sqrt(
                torch.sigmoid(flat["cls_logits"]) * torch.sigmoid(flat["bbox_ctrness"])
            )
        return torch.sigmoid(flat["cls_logits"])

    def _decode(self, reg: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        if self.is_fcos:
            reg = F.relu(reg)  # FCOSHead applies ReLU to the regression output
            return self.model.box_coder.decode(reg, anchors)
        return self.model.box_coder.decode_single(reg, anchors)

    def anchors(self, inputs: ImageList, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        anchors = self.model.anchor_generator(inputs, levels)[0]
        return list(anchors.split([f.shape[-2] * f.shape[-1] * self.num_anchors for f in levels]))

    def unit_outputs(self, cells, units):
        t = len(units.anchor)
        rows = torch.arange(t, device=units.anchor.device)
        flat = {k: v.view(t, self.num_anchors, -1)[rows, units.anchor] for k, v in cells.items()}
        probs = self._scores(flat)  # (T, K), column 0 the background
        boxes = self._decode(flat["bbox_reg"], units.anchor_boxes)
        return probs[rows, units.class_index], boxes, probs

    def postprocess(self, raw, anchors, geometry, index, nms=True):
        """torchvision's ``postprocess_detections`` for one image, keeping the indices."""
        m = self.model
        boxes, scores, labels, probs, objness, units = [], [], [], [], [], []
        for level, (level_raw, level_anchors) in enumerate(zip(raw, anchors, strict=True)):
            flat = {k: v[index] for k, v in self._split_raw(level_raw).items()}
            class_scores = self._scores(flat)  # (h*w*A, K)
            num_classes = class_scores.shape[-1]
            scores_per_level = class_scores.flatten()
            keep_idxs = scores_per_level > m.score_thresh
            scores_per_level = scores_per_level[keep_idxs]
            topk_idxs = torch.where(keep_idxs)[0]
            num_topk = det_utils._topk_min(topk_idxs, m.topk_candidates, 0)
            scores_per_level, idxs = scores_per_level.topk(num_topk)
            topk_idxs = topk_idxs[idxs]
            anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
            level_boxes = self._decode(flat["bbox_reg"][anchor_idxs], level_anchors[anchor_idxs])
            boxes.append(box_ops.clip_boxes_to_image(level_boxes, geometry.resized))
            scores.append(scores_per_level)
            labels.append(topk_idxs % num_classes)
            probs.append(class_scores[anchor_idxs])
            if self.is_fcos:
                objness.append(torch.sigmoid(flat["bbox_ctrness"][anchor_idxs, 0]))
            width = level_raw["cls_logits"].shape[-1]
            units.append(self.level_units(level, anchor_idxs, width))
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = suppress(boxes, scores, labels, m.nms_thresh, m.detections_per_img, nms)
        return dense_detections(
            geometry.boxes_to_original(boxes[keep]),
            scores[keep],
            labels[keep],
            torch.cat(probs)[keep],
            torch.cat(units)[keep],
            geometry.original,
            torch.cat(objness)[keep] if objness else None,
        )


# ----------------------------------------------------------------------------------
# Two-stage: Faster R-CNN
# ----------------------------------------------------------------------------------


class FasterRCNNDetector(TorchvisionDetector, RoINetwork):
    """Faster R-CNN. Provenance: the RoI (proposal index and box), its FPN level and the
    cell of the RoI centre on that level, and the class; objectness is the RPN score."""

    def _num_classes(self) -> int:
        return int(self.model.roi_heads.box_predictor.cls_score.out_features)

    def proposals(self, inputs: ImageList, features: Features) -> list[Proposals]:
        """The RPN's proposals and their objectness, exactly as ``RegionProposalNetwork``."""
        rpn = self.model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(inputs, feats)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = tvd.rpn.concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(
            proposals, objectness.detach(), inputs.image_sizes, num_anchors_per_level
        )
        return [Proposals(b, s) for b, s in zip(boxes, scores, strict=True)]

    def pool(self, inputs: ImageList, features: Features, rois: list[torch.Tensor]):
        return self.model.roi_heads.box_roi_pool(self._keyed(features), rois, inputs.image_sizes)

    def predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.model.roi_heads
        return heads.box_predictor(heads.box_head(pooled))

    def unit_outputs(self, logits, deltas, rois, class_index):
        rows = torch.arange(len(rois), device=rois.device)
        probs = F.softmax(logits, -1)  # column 0 the background
        boxes = self.model.roi_heads.box_coder.decode_single(
            deltas.view(len(rois), -1, 4)[rows, class_index], rois
        )
        return probs[rows, class_index], boxes, probs

    def _pooled_keys(self) -> list[str]:
        """The feature keys RoIAlign pools from, in the order it sees them."""
        names = self.model.roi_heads.box_roi_pool.featmap_names
        return [k for k in self.feature_keys if k in names]

    def roi_levels(self, rois: torch.Tensor) -> torch.Tensor:
        pool = self.model.roi_heads.box_roi_pool
        keys = torch.tensor([self.feature_keys.index(k) for k in self._pooled_keys()])
        if pool.map_levels is None:  # a single pooled level
            return keys[0].repeat(len(rois)).to(rois.device)
        return keys.to(rois.device)[pool.map_levels([rois])]

    def roi_aligns(self) -> dict[int, RoIAlignSettings]:
        pool = self.model.roi_heads.box_roi_pool
        return {
            self.feature_keys.index(key): RoIAlignSettings(scale, pool.sampling_ratio, False)
            for key, scale in zip(self._pooled_keys(), pool.scales, strict=True)
        }

    def postprocess(self, logits, deltas, proposals, geometry, features, nms=True):
        """torchvision's ``RoIHeads.postprocess_detections`` for one image, keeping indices."""
        heads = self.model.roi_heads
        objectness, proposals = proposals.objectness, proposals.boxes
        num_classes = logits.shape[-1]
        pred_boxes = heads.box_coder.decode(deltas, [proposals])
        probs = F.softmax(logits, -1)
        boxes = box_ops.clip_boxes_to_image(pred_boxes, geometry.resized)
        labels = torch.arange(num_classes, device=logits.device).view(1, -1).expand_as(probs)
        proposal_idx = torch.arange(len(proposals), device=logits.device)[:, None].expand_as(probs)
        boxes, scores = boxes[:, 1:].reshape(-1, 4), probs[:, 1:].reshape(-1)
        labels, proposal_idx = labels[:, 1:].reshape(-1), proposal_idx[:, 1:].reshape(-1)
        inds = torch.where(scores > heads.score_thresh)[0]
        inds = inds[box_ops.remove_small_boxes(boxes[inds], min_size=1e-2)]
        limit = heads.detections_per_img
        inds = inds[suppress(boxes[inds], scores[inds], labels[inds], heads.nms_thresh, limit, nms)]
        proposal_idx = proposal_idx[inds]
        detections = {
            "boxes": geometry.boxes_to_original(boxes[inds]),
            "scores": scores[inds],
            "labels": labels[inds],
            "class_probs": probs[proposal_idx],
            "objectness": objectness[proposal_idx],
        }
        strides = [geometry.padded[0] / f.shape[-2] for f in features.values()]
        return self.roi_detections(
            detections, proposal_idx, proposals[proposal_idx], strides, geometry
        )


# ----------------------------------------------------------------------------------
# Construction and registration
# ----------------------------------------------------------------------------------


def wrap(model: nn.Module, *args: Any, **options: Any) -> TorchvisionDetector:
    """Wrap an already-built torchvision FCOS, RetinaNet or Faster R-CNN (any backbone).
    ``args``: ``NetworkDetector``'s ``class_names`` (K + 1, the background first), ``name``,
    ``device``; ``options``: those by keyword and, for one-stage models, the GroupNorm
    guard's ``gn_tolerance`` and ``exact_level_cells``."""
    if isinstance(model, tvd.FCOS | tvd.RetinaNet):
        return OneStageDetector(model, *args, **options)
    if isinstance(model, tvd.FasterRCNN):
        return FasterRCNNDetector(model, *args, **options)
    raise TypeError(
        f"cannot wrap {type(model).__name__}: expected torchvision FCOS, RetinaNet or FasterRCNN"
    )


WRAPPER_OPTIONS = ("gn_tolerance", "exact_level_cells")


def _builder(factory: Callable[..., nn.Module], name: str) -> Callable[..., TorchvisionDetector]:
    def build(
        weights: str | Path | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        device: torch.device | str | None = None,
        **model_kwargs: Any,
    ) -> TorchvisionDetector:
        """weights: None (random), "DEFAULT" (torchvision's pretrained, needs the internet or
        torch's cache), or a checkpoint path (a state dict, or a dict with "model").
        ``gn_tolerance`` and ``exact_level_cells`` go to the wrapper, the rest to torchvision."""
        options = {k: model_kwargs.pop(k) for k in WRAPPER_OPTIONS if k in model_kwargs}
        kwargs: dict[str, Any] = {"min_size": min_size, "max_size": max_size, **model_kwargs}
        if weights == "DEFAULT":
            model = pretrained(factory, name, **kwargs)
        else:
            if num_classes is None:
                num_classes = len(class_names) if class_names is not None else 91
            model = factory(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
            if weights is not None:
                load_checkpoint(model, Path(weights))
            else:
                warn_random(name)
        return wrap(model, class_names=class_names, name=name, device=device, **options)

    build.__name__ = f"build_{name.replace('-', '_')}"
    return build


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state dict (or a dict holding one under "model") into ``model``."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read weights file {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    check_finite(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"weights file {path} does not fit the model: {err}") from err


for _name, _factory in {
    "fasterrcnn_resnet50_fpn": tvd.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": tvd.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": tvd.fasterrcnn_mobilenet_v3_large_fpn,
    "fcos_resnet50_fpn": tvd.fcos_resnet50_fpn,
    "retinanet_resnet50_fpn": tvd.retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": tvd.retinanet_resnet50_fpn_v2,
}.items():
    DETECTORS.register(_name, _builder(_factory, _name))
