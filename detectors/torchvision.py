"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN) behind the harness's two views.

The post-processing below is torchvision's own (same thresholds, same order of operations,
so the same boxes, scores and labels) with the indices kept: which level, cell, anchor,
class and proposal produced each detection.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
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
from xaibench.detectors.local_head import (
    GN_TOLERANCE,
    Branch,
    LocalConvHead,
    flatten_tower,
)
from xaibench.detectors.training import check_finite
from xaibench.detectors.weights import pretrained, warn_random
from xaibench.detectors.windows import WindowedTrace

from xaibench.detector import Detector, FeatureWindows
from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.geometry import InputGeometry
from xaibench.images import to_rgb_float, to_rgb_uint8
from xaibench.registry import DETECTORS
from xaibench.targets import UnitOutputs, target_values
from xaibench.types import ATTRIBUTES, Detections, Provenance, Target

COCO_CLASS_NAMES: list[str] = [
    str(name) for name in tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
]


class TorchvisionDetector(Detector):
    """Common plumbing: input conversion, transform, backbone, geometry, black-box batching."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str] | None = None,
        name: str = "torchvision",
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model.to(self.device)
        self.name = name
        num_classes = self._num_classes()
        if class_names is None:
            class_names = (
                COCO_CLASS_NAMES
                if num_classes == len(COCO_CLASS_NAMES)
                else [f"class{i}" for i in range(num_classes)]
            )
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but the model predicts "
                f"{num_classes} classes (index 0 is the background)"
            )
        self.class_names = list(class_names)
        self.feature_levels: list[str] = []

    # -- subclasses -----------------------------------------------------------------
    def _num_classes(self) -> int:
        raise NotImplementedError

    def _detect_batch(self, images: ImageList, geometry: list[InputGeometry], nms: bool):
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
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

    def _prepare(self, images: Sequence[np.ndarray]) -> tuple[ImageList, list[InputGeometry]]:
        tensors = self._to_tensors(images)
        image_list, _ = self.model.transform(tensors)
        padded = tuple(image_list.tensors.shape[-2:])
        geometry = [
            InputGeometry(tuple(t.shape[-2:]), tuple(size), padded)
            for t, size in zip(tensors, image_list.image_sizes, strict=True)
        ]
        return image_list, geometry

    def _features(self, image_list: ImageList) -> OrderedDict[str, torch.Tensor]:
        features = self.model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        # pyramid levels double their stride: name them p<k> from the finest one's stride
        padded_h = image_list.tensors.shape[-2]
        first = round(math.log2(padded_h / next(iter(features.values())).shape[-2]))
        self.feature_levels = [f"p{first + i}" for i in range(len(features))]
        return features

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[Detections] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            image_list, geometry = self._prepare(chunk)
            results.extend(self._detect_batch(image_list, geometry, nms))
        return results


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _masked(level: torch.Tensor, masks: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """A level (1, C, h, w) times each of ``masks`` (B, h_m, w_m) placed on it -> (B, C, h, w)."""
    return level * masks_to_layer(masks, geometry, tuple(level.shape[-2:]))[:, None].to(level)


def _masking_hook(masks: torch.Tensor, geometry: InputGeometry) -> Callable[..., Any]:
    """A forward hook multiplying a module's output (B, C, h, w), or each map of a dict of
    them, by ``masks`` (B, h_m, w_m) over the original image placed on its cells."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return _masked(output, masks, geometry)
        if isinstance(output, dict):
            return type(output)((k, _masked(v, masks, geometry)) for k, v in output.items())
        raise TypeError(f"cannot mask a module output of type {type(output).__name__}")

    return hook


# ----------------------------------------------------------------------------------
# One-stage: FCOS and RetinaNet
# ----------------------------------------------------------------------------------


def one_stage_local_head(model: tvd.FCOS | tvd.RetinaNet) -> LocalConvHead:
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
        }
    )


class OneStageDetector(TorchvisionDetector):
    """FCOS or RetinaNet. Provenance: level, cell (y, x), anchor, class.

    GroupNorm heads (FCOS, RetinaNet v2) on the fast path (see ``local_head``): a target
    whose windowed gradient leaves out more than ``gn_tolerance`` (relative norm, on a level
    of 64 x 64 cells; ``local_head.level_tolerance`` scales it to other sizes) of the
    GroupNorm statistics term is back-propagated exactly, as is every target on a level of at
    most ``exact_level_cells`` cells (``None``: no more cells than one window).
    """

    def __init__(
        self,
        model: tvd.FCOS | tvd.RetinaNet,
        gn_tolerance: float = GN_TOLERANCE,
        exact_level_cells: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.gn_tolerance = gn_tolerance
        self.exact_level_cells = exact_level_cells
        self.is_fcos = isinstance(model, tvd.FCOS)
        self.local_head = one_stage_local_head(model)
        self.num_anchors = model.head.classification_head.num_anchors

    def _num_classes(self) -> int:
        return int(self.model.head.classification_head.num_classes)

    # raw head outputs, one (N, C_out, h, w) map per output and level
    def _head(self, features: list[torch.Tensor], record: bool) -> list[dict[str, torch.Tensor]]:
        self.local_head.records = {name: [] for name in self.local_head.branches}
        return [self.local_head.forward_level(f, record) for f in features]

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

    def _detect_batch(self, image_list, geometry, nms):
        features = list(self._features(image_list).values())
        raw = self._head(features, record=False)
        anchors = self.model.anchor_generator(image_list, features)
        return [
            self._postprocess(raw, anchors[i], geometry[i], i, nms) for i in range(len(geometry))
        ]

    def _postprocess(
        self,
        raw: list[dict[str, torch.Tensor]],
        anchors: torch.Tensor,
        geometry: InputGeometry,
        index: int,
        nms: bool = True,
    ) -> Detections:
        """torchvision's ``postprocess_detections`` for one image, keeping the indices."""
        m = self.model
        image_shape = geometry.resized
        sizes = [
            r["cls_logits"].shape[-2] * r["cls_logits"].shape[-1] * self.num_anchors for r in raw
        ]
        anchors_per_level = anchors.split(sizes)
        boxes, scores, labels, probs, objness, prov = [], [], [], [], [], []
        for level, (level_raw, level_anchors) in enumerate(
            zip(raw, anchors_per_level, strict=True)
        ):
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
            labels_per_level = topk_idxs % num_classes
            boxes_per_level = self._decode(
                flat["bbox_reg"][anchor_idxs], level_anchors[anchor_idxs]
            )
            boxes_per_level = box_ops.clip_boxes_to_image(boxes_per_level, image_shape)
            w = level_raw["cls_logits"].shape[-1]
            cell = torch.div(anchor_idxs, self.num_anchors, rounding_mode="floor")
            boxes.append(boxes_per_level)
            scores.append(scores_per_level)
            labels.append(labels_per_level)
            probs.append(class_scores[anchor_idxs])
            if self.is_fcos:
                objness.append(torch.sigmoid(flat["bbox_ctrness"][anchor_idxs, 0]))
            prov.append(
                (
                    torch.full_like(anchor_idxs, level),
                    torch.div(cell, w, rounding_mode="floor"),
                    cell % w,
                    anchor_idxs % self.num_anchors,
                    labels_per_level,
                )
            )
        image_boxes = torch.cat(boxes)
        image_scores = torch.cat(scores)
        image_labels = torch.cat(labels)
        if nms:
            keep = box_ops.batched_nms(image_boxes, image_scores, image_labels, m.nms_thresh)
            keep = keep[: m.detections_per_img]
        else:
            keep = torch.arange(len(image_scores), device=image_scores.device)
        level, y, x, anchor, cls = (torch.cat(p)[keep] for p in zip(*prov, strict=True))
        return Detections(
            boxes=geometry.boxes_to_original(image_boxes[keep]),
            scores=image_scores[keep],
            labels=image_labels[keep],
            class_probs=torch.cat(probs)[keep],
            objectness=torch.cat(objness)[keep] if objness else None,
            provenance=Provenance(level=level, y=y, x=x, anchor=anchor, class_index=cls),
            image_size=geometry.original,
        )

    def trace(self, image: np.ndarray) -> OneStageTrace:
        return OneStageTrace(self, image)


class _BaseTrace(WindowedTrace):
    """Shared by both families: input preparation, layer lookup, the autograd graph the exact
    reference differentiates, and feature-space masking (the windows, dispatch and placing in
    the original image come from ``WindowedTrace``)."""

    def __init__(self, detector: TorchvisionDetector, image: np.ndarray) -> None:
        self.detector = detector
        with torch.no_grad():
            self.image_list, (self.geometry,) = detector._prepare([image])
        self.image_size = self.geometry.original

    # names -----------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        body = getattr(self.detector.model.backbone, "body", None)
        stages = [f"backbone.{n}" for n, _ in body.named_children()] if body is not None else []
        return ["fpn", *self.detector.feature_levels, *stages]

    def _module_for(self, layer: str) -> nn.Module:
        model = self.detector.model
        if layer.startswith("module:"):
            path = layer.removeprefix("module:")
        elif layer.startswith("backbone."):
            path = "backbone.body." + layer.removeprefix("backbone.")
        else:
            raise KeyError(
                f"unknown layer {layer!r}; known: {', '.join(self.layer_names())}, "
                "or 'module:<dotted.name>'"
            )
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise KeyError(f"layer {layer!r}: the model has no module {path!r}") from err

    # exact reference ---------------------------------------------------------------
    def _graph_forward(self, hook_layer: str | None) -> tuple[dict[str, torch.Tensor], Any]:
        """Forward with the autograd graph; returns named layer tensors and the head state."""
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if hook_layer is not None:

            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                t = output if isinstance(output, torch.Tensor) else None
                if t is None and isinstance(output, dict):
                    t = next(iter(output.values()))
                if t is None:
                    raise TypeError(f"layer {hook_layer!r} does not output a tensor")
                captured[hook_layer] = t

            handle = self._module_for(hook_layer).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                features = self.detector._features(self.image_list)
                state = self._graph_state(features)
        finally:
            if handle is not None:
                handle.remove()
        for name, f in zip(self.detector.feature_levels, features.values(), strict=True):
            captured[name] = f
        return captured, state

    def _exact(self, targets: Sequence[Target], layer: str) -> list[FeatureWindows]:
        hook = None if layer == "fpn" or layer in self.detector.feature_levels else layer
        tensors, state = self._graph_forward(hook)
        return self._layer_gradients(tensors, self._graph_values(state, targets), targets, layer)

    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        self._check(targets)
        with torch.no_grad():
            features = self.detector._features(self.image_list)
            state = self._graph_state(features)
            return self._graph_values(state, targets)

    # feature-space perturbation and fixed output units (D-RISE in feature space, BBAM) ----
    @torch.no_grad()
    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = "fpn", batch_size: int = 8
    ) -> list[Detections]:
        """Pyramid levels (``fpn`` = all of them, or one ``p<k>``) are masked on this trace's
        features and only the heads re-run; a backbone stage or ``module:<name>`` is masked by
        a forward hook and the whole network re-runs on the batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if layer == "roi":
            raise KeyError("feature masks apply to spatial layers, not 'roi'")
        masks = check_masks(masks).to(self.detector.device)
        levels = self.detector.feature_levels
        module = None if layer == "fpn" or layer in levels else self._module_for(layer)
        base = list(self._level_features())
        out: list[Detections] = []
        for start in range(0, masks.shape[0], batch_size):
            chunk = masks[start : start + batch_size]
            b = chunk.shape[0]
            image_list = ImageList(
                self.image_list.tensors.expand(b, -1, -1, -1), self.image_list.image_sizes * b
            )
            if module is not None:
                handle = module.register_forward_hook(_masking_hook(chunk, self.geometry))
                try:
                    out.extend(self.detector._detect_batch(image_list, [self.geometry] * b, True))
                finally:
                    handle.remove()
                continue
            feats = [
                _masked(f, chunk, self.geometry)
                if layer in ("fpn", name)
                else f.expand(b, -1, -1, -1)
                for name, f in zip(levels, base, strict=True)
            ]
            out.extend(self._detect_from_levels(feats, image_list))
        return out

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector's own transform, backbone and head on ``images``, read at the units
        (one-stage: level, cell, anchor, class; Faster R-CNN: the fixed proposal and class)."""
        indices = self._check_unit_images(images, indices)
        image_list, _ = self.detector.model.transform(list(images.to(self.detector.device)))
        features = self.detector._features(image_list)
        values = self._unit_values(features, indices)  # (5, B)
        return values[0], values[1:].T * values.new_tensor([-1.0, -1.0, 1.0, 1.0])

    # family-specific -------------------------------------------------------------
    def _graph_state(self, features: OrderedDict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def _graph_values(self, state: Any, targets: Sequence[Target]) -> torch.Tensor:
        raise NotImplementedError


class OneStageTrace(_BaseTrace):
    """FCOS / RetinaNet trace. Fast path on the FPN levels: each prediction depends on a
    small window of its level, back-propagated for all predictions at once."""

    detector: OneStageDetector

    def __init__(self, detector: OneStageDetector, image: np.ndarray) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            self.features = list(detector._features(self.image_list).values())
            self.raw = detector._head(self.features, record=True)
            self.records = detector.local_head.records
            self.anchors = detector.model.anchor_generator(self.image_list, self.features)[0]
            self.detections = detector._postprocess(self.raw, self.anchors, self.geometry, 0)
        sizes = [f.shape[-2] * f.shape[-1] * detector.num_anchors for f in self.features]
        self.anchor_offsets = torch.tensor([0, *sizes]).cumsum(0)

    def _has_fast_path(self, layer: str) -> bool:
        return layer == "fpn" or layer in self.detector.feature_levels

    def _target_info(self, targets: Sequence[Target]):
        p = self.detections.provenance
        det = torch.tensor([t.index for t in targets], dtype=torch.long, device=p.level.device)
        return p.level[det], p.y[det], p.x[det], p.anchor[det], p.class_index[det]

    def _values_from_cells(
        self,
        cells: dict[str, torch.Tensor],
        targets: Sequence[Target],
        level: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor,
        anchor: torch.Tensor,
        cls: torch.Tensor,
    ) -> torch.Tensor:
        """Target values from each target's raw head outputs at its cell ({name: (T, C_out)})."""
        det = self.detector
        a = det.num_anchors
        rows = torch.arange(len(targets), device=level.device)
        flat = {
            name: v.view(len(targets), a, -1)[rows, anchor] for name, v in cells.items()
        }  # (T, C_out / A)
        class_scores = det._scores(flat)  # (T, K)
        w = torch.tensor([self.features[int(lv)].shape[-1] for lv in level], device=level.device)
        anchor_index = self.anchor_offsets.to(level.device)[level] + (y * w + x) * a + anchor
        boxes = det._decode(flat["bbox_reg"], self.anchors[anchor_index])
        box = self.geometry.boxes_to_original(boxes)
        return target_values(targets, UnitOutputs(class_scores[rows, cls], box, class_scores))

    def _graph_state(self, features):
        return list(features.values()), self.detector._head(list(features.values()), record=False)

    def _graph_values(self, state, targets):
        _, raw = state
        level, y, x, anchor, cls = self._target_info(targets)
        cells = self._cells(raw, level, y, x)
        return self._values_from_cells(cells, targets, level, y, x, anchor, cls)

    def _cells(self, raw, level, y, x) -> dict[str, torch.Tensor]:
        names = raw[0].keys()
        return {
            name: torch.stack(
                [
                    raw[int(lv)][name][0, :, int(yy), int(xx)]
                    for lv, yy, xx in zip(level, y, x, strict=True)
                ]
            )
            for name in names
        }

    def _fast(self, targets, layer, margin):
        level, y, x, anchor, cls = self._target_info(targets)
        cells = {
            k: v.detach().requires_grad_(True)
            for k, v in self._cells(self.raw, level, y, x).items()
        }
        with torch.enable_grad():
            values = self._values_from_cells(cells, targets, level, y, x, anchor, cls)
            names = list(cells)
            grads = torch.autograd.grad(values.sum(), [cells[n] for n in names], allow_unused=True)
        cot = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
        return self._local_head_windows(targets, layer, (level, y, x), cot, self.features, margin)

    def _level_features(self) -> list[torch.Tensor]:
        return self.features

    def _detect_from_levels(self, feats: list[torch.Tensor], image_list: ImageList):
        """Detections of each image of a batch of (perturbed) pyramid levels (B, C, h, w)."""
        raw = self.detector._head(feats, record=False)
        return [
            self.detector._postprocess(raw, self.anchors, self.geometry, i)
            for i in range(feats[0].shape[0])
        ]

    def _unit_values(self, features, indices: list[int]) -> torch.Tensor:
        """(5, B) score, -x1, -y1, x2, y2 of detection ``indices[b]``'s cell on image b.
        The head runs only on the levels that hold those cells."""
        targets = [Target(i, a) for a in ATTRIBUTES for i in indices]
        level, y, x, anchor, cls = self._target_info(targets)
        feats = list(features.values())
        head = self.detector.local_head
        raw = {lv: head.forward_level(feats[lv], record=False) for lv in level.unique().tolist()}
        batch = torch.arange(len(indices)).repeat(len(ATTRIBUTES)).tolist()
        cells = {
            name: torch.stack(
                [
                    raw[int(lv)][name][b, :, int(yy), int(xx)]
                    for b, lv, yy, xx in zip(batch, level, y, x, strict=True)
                ]
            )
            for name in next(iter(raw.values()))
        }
        values = self._values_from_cells(cells, targets, level, y, x, anchor, cls)
        return values.view(len(ATTRIBUTES), len(indices))


# ----------------------------------------------------------------------------------
# Two-stage: Faster R-CNN
# ----------------------------------------------------------------------------------


class FasterRCNNDetector(TorchvisionDetector):
    """Faster R-CNN. Provenance: the RoI (proposal index and box), its FPN level and the
    cell of the RoI centre on that level, and the class; objectness is the RPN score."""

    def __init__(self, model: tvd.FasterRCNN, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)

    def _num_classes(self) -> int:
        return int(self.model.roi_heads.box_predictor.cls_score.out_features)

    def _proposals(self, image_list: ImageList, features: OrderedDict[str, torch.Tensor]):
        """The RPN's proposals and their objectness, exactly as ``RegionProposalNetwork``."""
        rpn = self.model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(image_list, feats)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = tvd.rpn.concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(
            proposals, objectness.detach(), image_list.image_sizes, num_anchors_per_level
        )

    def _box_outputs(self, features, proposals: list[torch.Tensor], image_sizes):
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(features, proposals, image_sizes)
        return pooled, *self._predict(pooled)

    def _predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.model.roi_heads
        return heads.box_predictor(heads.box_head(pooled))

    def _pooled_keys(self) -> list[str]:
        """The feature keys RoIAlign pools from, in the order it sees them."""
        names = self.model.roi_heads.box_roi_pool.featmap_names
        return [k for k in self._feature_keys if k in names]

    def _roi_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """Index into ``feature_levels`` of the level each RoI (resized pixels) is pooled from."""
        pool = self.model.roi_heads.box_roi_pool
        keys = torch.tensor([self._feature_keys.index(k) for k in self._pooled_keys()])
        if pool.map_levels is None:  # a single pooled level
            return keys[0].repeat(len(boxes)).to(boxes.device)
        return keys.to(boxes.device)[pool.map_levels([boxes])]

    def _features(self, image_list):
        features = super()._features(image_list)
        self._feature_keys = list(features.keys())
        return features

    def _detect_batch(self, image_list, geometry, nms):
        features = self._features(image_list)
        proposals, objectness = self._proposals(image_list, features)
        _, logits, regression = self._box_outputs(features, proposals, image_list.image_sizes)
        counts = [len(p) for p in proposals]
        return [
            self._postprocess(lg, r, p, o, g, features, nms)
            for lg, r, p, o, g in zip(
                logits.split(counts),
                regression.split(counts),
                proposals,
                objectness,
                geometry,
                strict=True,
            )
        ]

    def _postprocess(
        self,
        logits: torch.Tensor,
        regression: torch.Tensor,
        proposals: torch.Tensor,
        objectness: torch.Tensor,
        geometry: InputGeometry,
        features: OrderedDict[str, torch.Tensor],
        nms: bool = True,
    ) -> Detections:
        """torchvision's ``RoIHeads.postprocess_detections`` for one image, keeping indices."""
        heads = self.model.roi_heads
        num_classes = logits.shape[-1]
        pred_boxes = heads.box_coder.decode(regression, [proposals])
        probs = F.softmax(logits, -1)
        boxes = box_ops.clip_boxes_to_image(pred_boxes, geometry.resized)
        labels = torch.arange(num_classes, device=logits.device).view(1, -1).expand_as(probs)
        proposal_idx = torch.arange(len(proposals), device=logits.device)[:, None].expand_as(probs)
        boxes, scores = boxes[:, 1:].reshape(-1, 4), probs[:, 1:].reshape(-1)
        labels, proposal_idx = labels[:, 1:].reshape(-1), proposal_idx[:, 1:].reshape(-1)
        inds = torch.where(scores > heads.score_thresh)[0]
        keep = box_ops.remove_small_boxes(boxes[inds], min_size=1e-2)
        inds = inds[keep]
        if nms:
            keep = box_ops.batched_nms(boxes[inds], scores[inds], labels[inds], heads.nms_thresh)
            inds = inds[keep[: heads.detections_per_img]]
        boxes, scores, labels, proposal_idx = (
            boxes[inds],
            scores[inds],
            labels[inds],
            proposal_idx[inds],
        )
        rois = proposals[proposal_idx]
        level = self._roi_levels(rois)
        feats = list(features.values())
        stride = torch.tensor(
            [geometry.padded[0] / feats[int(lv)].shape[-2] for lv in level], device=rois.device
        )
        centre = (rois[:, :2] + rois[:, 2:]) / 2
        cells = torch.div(centre, stride[:, None], rounding_mode="floor").long()
        return Detections(
            boxes=geometry.boxes_to_original(boxes),
            scores=scores,
            labels=labels,
            class_probs=probs[proposal_idx],
            objectness=objectness[proposal_idx],
            provenance=Provenance(
                level=level,
                y=cells[:, 1],
                x=cells[:, 0],
                anchor=torch.zeros_like(labels),
                class_index=labels,
                proposal=proposal_idx,
                proposal_box=geometry.boxes_to_original(rois),
            ),
            image_size=geometry.original,
        )

    def trace(self, image: np.ndarray) -> FasterRCNNTrace:
        return FasterRCNNTrace(self, image)

    def trace_units(self, image: np.ndarray, units: Detections) -> FasterRCNNTrace:
        """A trace whose targets are ``units`` (detections of an earlier trace of ``image``):
        each is re-read from its own RoI (``provenance.proposal_box``) and class with the
        current parameters, whatever the RPN proposes now."""
        trace = FasterRCNNTrace(self, image)
        boxes = units.provenance.proposal_box
        if boxes is None:
            raise ValueError("units.provenance.proposal_box is missing: not Faster R-CNN units")
        sy, sx = trace.geometry.scale()
        trace.proposals = boxes.to(trace.proposals) / boxes.new_tensor([sx, sy, sx, sy])
        provenance = replace(units.provenance, proposal=torch.arange(len(units)))
        trace.detections = replace(units, provenance=provenance)
        return trace


class FasterRCNNTrace(_BaseTrace):
    """Faster R-CNN trace. Each prediction depends on its own RoI's pooled features: the fast
    path back-propagates all targets through the box head in one pass (one row per target),
    and for the FPN level through each RoI's RoIAlign on a crop around the RoI."""

    detector: FasterRCNNDetector

    def __init__(self, detector: FasterRCNNDetector, image: np.ndarray) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            self.features = detector._features(self.image_list)
            (proposals,), (objectness,) = detector._proposals(self.image_list, self.features)
            _, logits, regression = detector._box_outputs(
                self.features, [proposals], self.image_list.image_sizes
            )
            self.proposals = proposals
            self.detections = detector._postprocess(
                logits, regression, proposals, objectness, self.geometry, self.features
            )

    def layer_names(self) -> list[str]:
        return [*super().layer_names(), "roi"]

    def _has_fast_path(self, layer: str) -> bool:
        return layer in ("fpn", "roi") or layer in self.detector.feature_levels

    def _rois(self, targets: Sequence[Target]) -> torch.Tensor:
        """Each target's RoI in resized-input pixels (T, 4)."""
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        return self.proposals[self.detections.provenance.proposal[det]]

    def _values_from_outputs(self, logits, regression, rois, targets) -> torch.Tensor:
        """Target values from per-target box-head outputs (row t explains target t)."""
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        cls = self.detections.provenance.class_index[det]
        rows = torch.arange(len(targets))
        probs = F.softmax(logits, -1)
        heads = self.detector.model.roi_heads
        deltas = regression.view(len(targets), -1, 4)[rows, cls]
        boxes = heads.box_coder.decode_single(deltas, rois)
        box = self.geometry.boxes_to_original(boxes)
        return target_values(targets, UnitOutputs(probs[rows, cls], box, probs))

    def _graph_state(self, features):
        return features

    def _graph_values(self, features, targets):
        rois = self._rois(targets)
        _, logits, regression = self.detector._box_outputs(
            features, [rois], self.image_list.image_sizes
        )
        return self._values_from_outputs(logits, regression, rois, targets)

    def _level_features(self) -> list[torch.Tensor]:
        return list(self.features.values())

    def _detect_from_levels(self, feats: list[torch.Tensor], image_list: ImageList):
        """RPN, box head and post-processing on a batch of (perturbed) levels (B, C, h, w)."""
        det = self.detector
        features = OrderedDict(zip(det._feature_keys, feats, strict=True))
        proposals, objectness = det._proposals(image_list, features)
        _, logits, regression = det._box_outputs(features, proposals, image_list.image_sizes)
        counts = [len(p) for p in proposals]
        return [
            det._postprocess(lg, r, p, o, self.geometry, features)
            for lg, r, p, o in zip(
                logits.split(counts), regression.split(counts), proposals, objectness, strict=True
            )
        ]

    def _unit_values(self, features, indices: list[int]) -> torch.Tensor:
        """(5, B) score, -x1, -y1, x2, y2 of detection ``indices[b]``'s proposal on image b."""
        b = len(indices)
        targets = [Target(i, a) for a in ATTRIBUTES for i in indices]
        rois = self._rois(targets)
        pooled = self.detector.model.roi_heads.box_roi_pool(
            features, [rois[j : j + 1] for j in range(b)], self.image_list.image_sizes * b
        )
        logits, regression = self.detector._predict(pooled)
        repeat = len(ATTRIBUTES)
        values = self._values_from_outputs(
            logits.repeat(repeat, 1), regression.repeat(repeat, 1), rois, targets
        )
        return values.view(repeat, b)

    def _exact(self, targets, layer):
        if layer != "roi":
            return super()._exact(targets, layer)
        rois = self._rois(targets)
        with torch.enable_grad():
            features = self.detector._features(self.image_list)
            pooled = self.detector.model.roi_heads.box_roi_pool(
                features, [rois], self.image_list.image_sizes
            )
            logits, regression = self.detector._predict(pooled)
            values = self._values_from_outputs(logits, regression, rois, targets)
            grads = [
                torch.autograd.grad(values[i], pooled, retain_graph=True)[0][i]
                for i in range(len(targets))
            ]
        return [self._roi_windows(targets, rois, pooled.detach(), torch.stack(grads))]

    def _fast(self, targets, layer, margin):
        rois = self._rois(targets)
        pool = self.detector.model.roi_heads.box_roi_pool
        with torch.no_grad():
            pooled = pool(self.features, [rois], self.image_list.image_sizes)
        pooled = pooled.requires_grad_(True)
        with torch.enable_grad():
            logits, regression = self.detector._predict(pooled)
            values = self._values_from_outputs(logits, regression, rois, targets)
            (g_pooled,) = torch.autograd.grad(values.sum(), pooled)
        if layer == "roi":
            return [self._roi_windows(targets, rois, pooled.detach(), g_pooled)]
        return self._level_windows(targets, layer, rois, g_pooled, margin)

    def _level_windows(self, targets, layer, rois, g_pooled, margin) -> list[FeatureWindows]:
        """Back-propagate each RoI's pooled-feature gradient through RoIAlign on windows of
        its level (``WindowedTrace._roi_align_windows``: exact)."""
        pool = self.detector.model.roi_heads.box_roi_pool
        level = self.detector._roi_levels(rois)
        names = self.detector.feature_levels
        feats = list(self.features.values())
        out = []
        lvs = level.unique().tolist() if layer == "fpn" else [names.index(layer)]
        for lv in lvs:
            fmap = feats[lv][0]
            rows = torch.where(level == lv)[0].tolist()
            if layer != "fpn":  # targets pooled from another level have no gradient here
                others = [i for i in range(len(targets)) if int(level[i]) != lv]
                if others:
                    out.append(self._empty_windows(names[lv], others, targets, fmap))
            if not rows:
                continue
            key = self.detector._feature_keys[lv]
            scale = pool.scales[self.detector._pooled_keys().index(key)]
            pad = self._margin(margin, rows, targets, fmap)
            out += self._roi_align_windows(
                names[lv],
                rows,
                targets,
                fmap,
                rois[rows] * scale,
                pad,
                g_pooled[rows],
                pool.sampling_ratio,
                aligned=False,
            )
        return out


# ----------------------------------------------------------------------------------
# Construction and registration
# ----------------------------------------------------------------------------------


def wrap(
    model: nn.Module,
    class_names: Sequence[str] | None = None,
    name: str = "torchvision",
    device: torch.device | str | None = None,
    **options: Any,
) -> TorchvisionDetector:
    """Wrap an already-built torchvision FCOS, RetinaNet or Faster R-CNN (any backbone);
    ``options`` go to the wrapper (``gn_tolerance``, ``exact_level_cells``: one-stage only)."""
    common = {"class_names": class_names, "name": name, "device": device, **options}
    if isinstance(model, tvd.FCOS | tvd.RetinaNet):
        return OneStageDetector(model, **common)
    if isinstance(model, tvd.FasterRCNN):
        return FasterRCNNDetector(model, **common)
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
