"""detectron2 detectors (Faster R-CNN ``GeneralizedRCNN``, ``RetinaNet``) behind the harness's
two views.

Input: detectron2's own test-time transform (``ResizeShortestEdge`` to ``INPUT.MIN_SIZE_TEST``
/ ``MAX_SIZE_TEST``, the model's pixel format, normalisation, padding to the backbone's size
divisibility), so detections equal ``DefaultPredictor``'s. Post-processing is detectron2's
(``fast_rcnn_inference_single_image``, which returns the proposal indices, and RetinaNet's
per-level decoding re-written to keep the anchor indices), followed by its own
``detector_postprocess`` (rescale to the original image, clip, drop empty boxes) carrying the
provenance along.

Labels: detectron2's class ``k`` (0-based, background last for softmax heads) is label
``k + 1`` here, ``class_names[0]`` is the background and ``class_probs`` put the background
in column 0 (zero for RetinaNet's sigmoid head), as for the torchvision wrappers and the COCO
loaders (labels 1..K).

Importing this module needs detectron2 (``python scripts/install_detectron2.py``); the
registered builders in ``detectors/detectron2_builders.py`` import it on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from xaibench.detectors.dense import DenseNetwork, RawOutputs, dense_detections
from xaibench.detectors.detectron2_builders import detectron2_detector as build
from xaibench.detectors.local_head import GN_TOLERANCE, Branch, LocalConvHead, flatten_tower
from xaibench.detectors.network import Features, NetworkDetector, suppress
from xaibench.detectors.roi import Proposals, RoIAlignSettings, RoINetwork

from xaibench.geometry import InputGeometry
from xaibench.images import to_rgb_float, to_rgb_uint8

INSTALL_HINT = (
    "detectron2 is not installed in this environment; install it with "
    "`python scripts/install_detectron2.py` (run by `make test`), see the README"
)

try:
    with warnings.catch_warnings():  # detectron2 scripts some functions with torch.jit on import
        warnings.simplefilter("ignore", FutureWarning)
        from detectron2.data import transforms as d2_transforms
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
        from detectron2.layers import FrozenBatchNorm2d, ROIAlign
        from detectron2.modeling import GeneralizedRCNN, RetinaNet
        from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
        from detectron2.modeling.poolers import assign_boxes_to_levels
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
        from detectron2.structures import Boxes, ImageList, Instances
        from detectron2.utils.events import EventStorage
        from xaibench.detectors.detectron2_config import (
            config_file,
            load_config,
            load_weights,
            small_config,
        )
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"{INSTALL_HINT} ({err})") from err

__all__ = [
    "COCO_THING_CLASSES",
    "Detectron2Detector",
    "Detectron2RCNN",
    "Detectron2RetinaNet",
    "TrainingAdapter",
    "build",
    "calibrate_frozen_batchnorm",
    "config_file",
    "load_config",
    "load_weights",
    "small_config",
    "wrap",
]

COCO_THING_CLASSES: list[str] = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
"""The 80 classes of detectron2's COCO models, in the order of their class indices."""

# ----------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------


class Detectron2Detector(NetworkDetector):
    """Common plumbing: detectron2's test-time input transform, backbone and geometry."""

    framework = "detectron2"

    def __init__(
        self, model: nn.Module, *args: Any, min_size: int = 800, max_size: int = 1333, **kwargs: Any
    ) -> None:
        """``min_size``/``max_size``: the test-time resize (``INPUT.MIN_SIZE_TEST``,
        ``INPUT.MAX_SIZE_TEST``); ``args``/``kwargs``: ``NetworkDetector``'s."""
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        super().__init__(model, *args, **kwargs)
        self.input_format = model.input_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"model.input_format must be RGB or BGR, got {self.input_format!r}")
        self.resize = d2_transforms.ResizeShortestEdge([min_size, min_size], max_size)
        shapes = model.backbone.output_shape()
        self.strides = {name: shapes[name].stride for name in shapes}
        self.feature_levels = self._levels(sorted(shapes, key=lambda n: shapes[n].stride))
        has_bottom_up = getattr(model.backbone, "bottom_up", None) is not None
        self.stage_module = "backbone.bottom_up" if has_bottom_up else "backbone"

    def _num_classes(self) -> int:
        raise NotImplementedError

    def _class_names(self, given: Sequence[str] | None) -> list[str]:
        """K names (detectron2's classes) or K + 1 with the background first; default COCO's
        80 for an 80-class model, else ``class<i>``."""
        k = self._num_classes()
        names = list(given) if given is not None else None
        if names is not None and len(names) == k:  # detectron2's own list, without background
            names = ["__background__", *names]
        if names is None and k == len(COCO_THING_CLASSES):
            names = ["__background__", *COCO_THING_CLASSES]
        if names is None:
            names = ["__background__", *(f"class{i}" for i in range(1, k + 1))]
        if len(names) != k + 1:
            raise ValueError(
                f"class_names has {len(given or [])} entries; the model predicts {k} "
                f"classes (give {k} names, or {k + 1} with the background first)"
            )
        return names

    def _levels(self, outputs: list[str]) -> list[str]:
        """The feature levels that ``Provenance.level`` indexes."""
        return outputs

    def _inputs(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """detectron2 input dicts, exactly as ``DefaultPredictor`` builds them."""
        inputs = []
        for i, image in enumerate(images):
            if np.issubdtype(np.asarray(image).dtype, np.floating):
                # [0, 1] kept unrounded: detectron2 resizes float images with torch, not PIL
                rgb = to_rgb_float(image, name=f"images[{i}]") * np.float32(255.0)
            else:
                rgb = to_rgb_uint8(image, name=f"images[{i}]")
            pixels = rgb[:, :, ::-1] if self.input_format == "BGR" else rgb
            resized = self.resize.get_transform(pixels).apply_image(pixels)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": rgb.shape[0], "width": rgb.shape[1]})
        return inputs

    def prepare(self, images: Sequence[np.ndarray]) -> tuple[ImageList, list[InputGeometry]]:
        inputs = self._inputs(images)
        image_list = self.model.preprocess_image(inputs)
        padded = tuple(image_list.tensor.shape[-2:])
        geometry = [
            InputGeometry((x["height"], x["width"]), tuple(size), padded)
            for x, size in zip(inputs, image_list.image_sizes, strict=True)
        ]
        return image_list, geometry

    def prepare_differentiable(self, images: torch.Tensor, geometry: InputGeometry) -> ImageList:
        """detectron2's input transform made differentiable: bilinear resize (torch, where
        detectron2 resizes uint8 images with PIL), pixel format, normalisation and padding."""
        model = self.model
        x = images.float() * 255.0
        if self.input_format == "BGR":
            x = x.flip(1)
        if geometry.resized != geometry.original:
            x = F.interpolate(x, size=geometry.resized, mode="bilinear", align_corners=False)
        x = (x - model.pixel_mean) / model.pixel_std
        pad_h, pad_w = geometry.padded[0] - x.shape[-2], geometry.padded[1] - x.shape[-1]
        return ImageList(F.pad(x, (0, pad_w, 0, pad_h)), [geometry.resized] * len(images))

    def repeat_input(self, inputs: ImageList, copies: int) -> ImageList:
        return ImageList(inputs.tensor.expand(copies, -1, -1, -1), inputs.image_sizes * copies)

    def features(self, inputs: ImageList) -> Features:
        return self.model.backbone(inputs.tensor)

    def _finish(self, result: Instances, geometry: InputGeometry) -> Instances:
        """detectron2's ``detector_postprocess``: boxes to the original image, clipped, empty
        ones dropped (with every field, provenance included)."""
        return detector_postprocess(result, *geometry.original)


class Detectron2RCNN(Detectron2Detector, RoINetwork):
    """Faster R-CNN (``GeneralizedRCNN`` with standard RoI heads). Provenance: the proposal
    (index and box), its pooled FPN level, the cell of its centre there, and the class;
    objectness is the RPN's (sigmoid of its logit)."""

    def __init__(self, model: GeneralizedRCNN, *args: Any, **kwargs: Any) -> None:
        heads = model.roi_heads
        if not all(hasattr(heads, a) for a in ("box_pooler", "box_head", "box_predictor")):
            raise TypeError(
                f"cannot wrap RoI heads {type(heads).__name__}: expected detectron2's "
                "StandardROIHeads (box_pooler, box_head, box_predictor)"
            )
        if model.proposal_generator is None:
            raise TypeError("cannot wrap a GeneralizedRCNN without a proposal generator (RPN)")
        super().__init__(model, *args, **kwargs)
        self.box_in_features = list(heads.box_in_features)

    def _num_classes(self) -> int:
        return int(self.model.roi_heads.num_classes)

    def proposals(self, inputs: ImageList, features: Features) -> list[Proposals]:
        proposals, _ = self.model.proposal_generator(inputs, features, None)
        return [
            Proposals(p.proposal_boxes.tensor, p.objectness_logits.sigmoid()) for p in proposals
        ]

    def pool(self, inputs: ImageList, features: Features, rois: list[torch.Tensor]) -> torch.Tensor:
        pooler = self.model.roi_heads.box_pooler
        return pooler([features[f] for f in self.box_in_features], [Boxes(r) for r in rois])

    def predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.model.roi_heads
        return heads.box_predictor(heads.box_head(pooled))

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, K+1) class probabilities, background last, as ``predict_probs``."""
        if getattr(self.model.roi_heads.box_predictor, "use_sigmoid_ce", False):
            return logits.sigmoid()
        return F.softmax(logits, dim=-1)

    def unit_outputs(self, logits, deltas, rois, class_index):
        rows = torch.arange(len(rois), device=rois.device)
        cls = class_index - 1  # detectron2's class
        boxes = self.model.roi_heads.box_predictor.box2box_transform.apply_deltas(deltas, rois)
        boxes = boxes.view(len(rois), -1, 4)
        boxes = boxes[rows, cls] if boxes.shape[1] > 1 else boxes[:, 0]
        probs = self._probs(logits)  # background last
        return probs[rows, cls], boxes, torch.cat((probs[:, -1:], probs[:, :-1]), 1)

    def roi_levels(self, rois: torch.Tensor) -> torch.Tensor:
        pooler = self.model.roi_heads.box_pooler
        index = [self.feature_levels.index(name) for name in self.box_in_features]
        index = torch.tensor(index, dtype=torch.long, device=rois.device)
        if len(pooler.level_poolers) == 1:
            return index[torch.zeros(len(rois), dtype=torch.long, device=rois.device)]
        pooled = assign_boxes_to_levels(
            [Boxes(rois)],
            pooler.min_level,
            pooler.max_level,
            pooler.canonical_box_size,
            pooler.canonical_level,
        )
        return index[pooled]

    def roi_aligns(self) -> dict[int, RoIAlignSettings] | None:
        poolers = self.model.roi_heads.box_pooler.level_poolers
        if not all(isinstance(p, ROIAlign) for p in poolers):
            return None
        return {
            self.feature_levels.index(name): RoIAlignSettings(
                p.spatial_scale, p.sampling_ratio, p.aligned
            )
            for name, p in zip(self.box_in_features, poolers, strict=True)
        }

    def postprocess(self, logits, deltas, proposals, geometry, features, nms=True):
        """``FastRCNNOutputLayers.inference`` and ``detector_postprocess`` for one image,
        keeping the proposal index of each detection (``nms=False``: all candidates above the
        score threshold, by descending score)."""
        predictor = self.model.roi_heads.box_predictor
        rois = proposals.boxes
        boxes = predictor.box2box_transform.apply_deltas(deltas, rois)
        probs = self._probs(logits)
        valid = torch.where(torch.isfinite(boxes).all(1) & torch.isfinite(probs).all(1))[0]
        result, kept = fast_rcnn_inference_single_image(
            boxes,
            probs,
            geometry.resized,
            predictor.test_score_thresh,
            predictor.test_nms_thresh if nms else 1.0,
            predictor.test_topk_per_image if nms else -1,
        )
        result.proposal = valid[kept]  # kept indexes the finite rows
        result = self._finish(result, geometry)
        proposal = result.proposal
        p = probs[proposal]
        detections = {
            "boxes": result.pred_boxes.tensor,
            "scores": result.scores,
            "labels": result.pred_classes + 1,
            "class_probs": torch.cat((p[:, -1:], p[:, :-1]), 1),
            "objectness": proposals.objectness[proposal],
        }
        strides = [float(self.strides[name]) for name in self.feature_levels]
        return self.roi_detections(detections, proposal, rois[proposal], strides, geometry)


class Detectron2RetinaNet(Detectron2Detector, DenseNetwork):
    """RetinaNet. Provenance: level (``head_in_features``), cell, anchor and class.

    ``gn_tolerance`` and ``exact_level_cells``: the GroupNorm guard when the head uses
    GroupNorm (``LocalConvHead``)."""

    def __init__(
        self,
        model: RetinaNet,
        *args: Any,
        gn_tolerance: float = GN_TOLERANCE,
        exact_level_cells: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        head = model.head
        self.num_anchors = int(model.anchor_generator.num_cell_anchors[0])
        try:
            self.local_head: LocalConvHead | None = LocalConvHead(
                {
                    "cls": Branch(flatten_tower(head.cls_subnet), {"cls_score": head.cls_score}),
                    "reg": Branch(flatten_tower(head.bbox_subnet), {"bbox_pred": head.bbox_pred}),
                },
                gn_tolerance,
                exact_level_cells,
            )
        except NotImplementedError:  # e.g. per-level BatchNorm: gradients take the exact path
            self.local_head = None

    def _num_classes(self) -> int:
        return int(self.model.num_classes)

    def _levels(self, outputs: list[str]) -> list[str]:
        return list(self.model.head_in_features)

    def head_outputs(self, levels: list[torch.Tensor]) -> RawOutputs:
        """Raw head outputs per level: ``cls_score`` (N, A*K, h, w), ``bbox_pred`` (N, A*4,
        h, w)."""
        logits, deltas = self.model.head(levels)
        return [{"cls_score": c, "bbox_pred": b} for c, b in zip(logits, deltas, strict=True)]

    def anchors(self, inputs: ImageList, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [b.tensor for b in self.model.anchor_generator(levels)]

    def unit_outputs(self, cells, units):
        t, a, anchor = len(units.anchor), self.num_anchors, units.anchor
        rows = torch.arange(t, device=anchor.device)
        probs = cells["cls_score"].view(t, a, -1)[rows, anchor].sigmoid()  # (T, K)
        deltas = cells["bbox_pred"].view(t, a, 4)[rows, anchor]
        boxes = self.model.box2box_transform.apply_deltas(deltas, units.anchor_boxes)
        return probs[rows, units.class_index - 1], boxes, F.pad(probs, (1, 0))  # no background

    def postprocess(self, raw, anchors, geometry, index, nms=True):
        """RetinaNet's ``inference_single_image`` (per-level threshold and top-k, decoding,
        class-wise NMS) and ``detector_postprocess`` for image ``index``, keeping level,
        anchor and class of each detection."""
        m = self.model
        one = [{k: v[index : index + 1] for k, v in r.items()} for r in raw]
        scores = [permute_to_N_HWA_K(r["cls_score"], m.num_classes)[0].sigmoid() for r in one]
        deltas = [permute_to_N_HWA_K(r["bbox_pred"], 4)[0] for r in one]
        widths = [int(r["cls_score"].shape[-1]) for r in one]
        boxes, kept_scores, classes, probs, units = [], [], [], [], []
        for level, (class_scores, level_deltas, width, level_anchors) in enumerate(
            zip(scores, deltas, widths, anchors, strict=True)
        ):
            keep = class_scores > m.test_score_thresh
            level_scores = class_scores[keep]
            candidates = torch.nonzero(keep)
            level_scores, order = level_scores.topk(
                min(candidates.shape[0], m.test_topk_candidates)
            )
            anchor_idxs, class_idxs = candidates[order].unbind(dim=1)
            boxes.append(
                m.box2box_transform.apply_deltas(
                    level_deltas[anchor_idxs], level_anchors[anchor_idxs]
                )
            )
            kept_scores.append(level_scores)
            classes.append(class_idxs)
            probs.append(class_scores[anchor_idxs])
            units.append(self.level_units(level, anchor_idxs, width))
        all_boxes, all_scores = torch.cat(boxes), torch.cat(kept_scores)
        all_classes = torch.cat(classes)
        limit = m.max_detections_per_image
        keep = suppress(all_boxes, all_scores, all_classes, m.test_nms_thresh, limit, nms)
        result = Instances(
            geometry.resized,
            pred_boxes=Boxes(all_boxes[keep]),
            scores=all_scores[keep],
            pred_classes=all_classes[keep],
            probs=torch.cat(probs)[keep],
            units=torch.cat(units)[keep],
        )
        result = self._finish(result, geometry)
        return dense_detections(
            result.pred_boxes.tensor,
            result.scores,
            result.pred_classes + 1,
            F.pad(result.probs, (1, 0)),
            result.units,
            geometry.original,
        )


# ----------------------------------------------------------------------------------
# Construction and training
# ----------------------------------------------------------------------------------


def wrap(model: nn.Module, *args: Any, **options: Any) -> Detectron2Detector:
    """Wrap an already-built detectron2 ``GeneralizedRCNN`` (standard RoI heads) or
    ``RetinaNet``. ``args``: ``NetworkDetector``'s ``class_names`` (K names, or K + 1 with
    the background first), ``name``, ``device``; ``options``: those by keyword,
    ``min_size``/``max_size`` (the test-time resize,
    ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``) and, for RetinaNet, the GroupNorm guard's
    ``gn_tolerance`` and ``exact_level_cells``."""
    if isinstance(model, RetinaNet):
        return Detectron2RetinaNet(model, *args, **options)
    if isinstance(model, GeneralizedRCNN):
        return Detectron2RCNN(model, *args, **options)
    raise TypeError(
        f"cannot wrap {type(model).__name__}: expected detectron2 GeneralizedRCNN or RetinaNet"
    )


class TrainingAdapter(nn.Module):
    """A detectron2 model behind the torchvision training interface of the ``baseline``
    recipe: ``adapter(images, targets)`` returns detectron2's loss dict.

    images: float (3, H, W) RGB in [0, 1], fed at their own size (no resize); targets:
    ``boxes`` (N, 4) xyxy pixels and ``labels`` (N,) in 1..K (detectron2's class = label - 1).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        num_classes = _num_classes(self.model)
        inputs = []
        for i, (image, target) in enumerate(zip(images, targets, strict=True)):
            labels = target["labels"]
            if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
                raise ValueError(
                    f"targets[{i}]['labels'] must lie in 1..{num_classes}, got {labels.tolist()}"
                )
            pixels = image * 255.0
            if self.model.input_format == "BGR":
                pixels = pixels.flip(0)
            instances = Instances(
                tuple(image.shape[-2:]), gt_boxes=Boxes(target["boxes"]), gt_classes=labels - 1
            )
            inputs.append({"image": pixels, "instances": instances})
        with EventStorage():  # detectron2's losses log statistics to the current storage
            return self.model(inputs)


def _num_classes(model: nn.Module) -> int:
    if isinstance(model, RetinaNet):
        return int(model.num_classes)
    return int(model.roi_heads.num_classes)


def calibrate_frozen_batchnorm(detector: Detectron2Detector, images: Sequence[np.ndarray]) -> int:
    """Set the statistics of every ``FrozenBatchNorm2d`` of the detector's model to the mean and
    variance of its input over ``images`` (uint8 RGB, through the detector's transform), so
    that a randomly initialised network keeps activations of unit scale (detectron2's ResNets
    use frozen statistics, which a random initialisation leaves at mean 0, variance 1, and
    activations grow layer after layer).
    One forward pass: each layer takes its statistics just before it runs, so later layers see
    already normalised inputs. Returns the number of layers set."""
    frozen = [m for m in detector.model.modules() if isinstance(m, FrozenBatchNorm2d)]

    def take_statistics(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(take_statistics) for m in frozen]
    try:
        with torch.no_grad():
            image_list, _ = detector.prepare(images)
            detector.features(image_list)
    finally:
        for h in handles:
            h.remove()
    return len(frozen)
