"""White-box traces of the detectron2 wrappers (``detectors/detectron2.py``).

The FPN levels of the image are computed once; gradients on them start from those levels
(leaves), so only the heads run again. Backbone stages and ``module:<name>`` layers re-run the
network with the layer's output made a leaf. ``mode="exact"`` is one autograd backward per
target; the fast paths use each family's structure (Faster R-CNN: one pass through the box
head, then RoIAlign on windows; RetinaNet: windowed head backprop, ``local_head``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import ROIAlign
from detectron2.structures import Boxes, ImageList
from torch import nn
from xaibench.detectors.windows import WindowedTrace

from xaibench.detector import FeatureWindows
from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.geometry import InputGeometry
from xaibench.targets import UnitOutputs, target_values
from xaibench.types import ATTRIBUTES, Detections, Target

if TYPE_CHECKING:
    from xaibench.detectors.detectron2 import (
        Detectron2Detector,
        Detectron2RCNN,
        Detectron2RetinaNet,
    )


class Detectron2Trace(WindowedTrace):
    """Shared by both families: layers, the leaves the exact (per-target autograd) reference
    differentiates, and feature-space masking (the windows, dispatch and placing in the
    original image come from ``WindowedTrace``).

    The FPN levels of the image are computed once; gradients on them start from those levels
    (leaves), so only the heads run again. Backbone stages and ``module:<name>`` layers re-run
    the network with the layer's output made a leaf.
    """

    detector: Detectron2Detector

    def __init__(self, detector: Detectron2Detector, image: np.ndarray) -> None:
        self.detector = detector
        with torch.no_grad():
            self.image_list, (self.geometry,) = detector._prepare([image])
            self.features = detector._features(self.image_list.tensor)
        self.image_size = self.geometry.original

    # names -----------------------------------------------------------------------
    def _stage_owner(self) -> tuple[nn.Module, str]:
        backbone = self.detector.model.backbone
        body = getattr(backbone, "bottom_up", None)
        return (body, "backbone.bottom_up.") if body is not None else (backbone, "backbone.")

    def layer_names(self) -> list[str]:
        body, _ = self._stage_owner()
        stages = [f"backbone.{n}" for n, _ in body.named_children()]
        return ["fpn", *self.detector.feature_levels, *stages]

    def _module_for(self, layer: str) -> nn.Module:
        if layer.startswith("module:"):
            path = layer.removeprefix("module:")
        elif layer.startswith("backbone."):
            path = self._stage_owner()[1] + layer.removeprefix("backbone.")
        else:
            raise KeyError(
                f"unknown layer {layer!r}; known: {', '.join(self.layer_names())}, "
                "or 'module:<dotted.name>'"
            )
        try:
            return self.detector.model.get_submodule(path)
        except AttributeError as err:
            raise KeyError(
                f"layer {layer!r}: the model has no module {path!r}; known: "
                f"{', '.join(self.layer_names())}, or 'module:<dotted.name>'"
            ) from err

    def _is_level(self, layer: str) -> bool:
        return layer == "fpn" or layer in self.detector.feature_levels

    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        self._check(targets)
        with torch.no_grad():
            return self._values(self.features, targets)

    # exact reference ---------------------------------------------------------------
    def _exact(self, targets: Sequence[Target], layer: str) -> list[FeatureWindows]:
        with torch.enable_grad():
            if self._is_level(layer):
                leaves = {k: v.detach().requires_grad_(True) for k, v in self.features.items()}
                values = self._values(leaves, targets)
            else:
                leaves, values = self._values_from_hooked(layer, targets)
            return self._layer_gradients(leaves, values, targets, layer)

    def _values_from_hooked(self, layer: str, targets: Sequence[Target]):
        """Re-run the network with ``layer``'s output (or its first map) replaced by a leaf;
        returns ({layer: leaf}, target values)."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                captured[layer] = output.detach().requires_grad_(True)
                return captured[layer]
            if isinstance(output, dict) and output:
                key = next(iter(output))
                captured[layer] = output[key].detach().requires_grad_(True)
                return {**output, key: captured[layer]}
            raise TypeError(f"layer {layer!r} does not output a tensor")

        handle = self._module_for(layer).register_forward_hook(hook)
        try:
            features = self.detector._features(self.image_list.tensor)
        finally:
            handle.remove()
        if layer not in captured:
            raise ValueError(f"layer {layer!r} is not used by the backbone")
        return captured, self._values(features, targets)

    # feature-space perturbation and fixed output units ---------------------------------
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
        all_levels = list(self.features)
        if layer not in ("fpn", *all_levels):
            module = self._module_for(layer)
        masks = check_masks(masks).to(self.detector.device)
        out: list[Detections] = []
        for start in range(0, masks.shape[0], batch_size):
            chunk = masks[start : start + batch_size]
            b = chunk.shape[0]
            tensor = self.image_list.tensor.expand(b, -1, -1, -1)
            image_list = ImageList(tensor, self.image_list.image_sizes * b)
            if layer in ("fpn", *all_levels):
                features = {
                    name: _masked(f, chunk, self.geometry)
                    if layer in ("fpn", name)
                    else f.expand(b, -1, -1, -1)
                    for name, f in self.features.items()
                }
            else:
                handle = module.register_forward_hook(_masking_hook(chunk, self.geometry))
                try:
                    features = self.detector._features(tensor)
                finally:
                    handle.remove()
            geometry = [self.geometry] * b
            out.extend(self.detector._detect_from_features(image_list, features, geometry, True))
        return out

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable score and box of fixed units on ``images``. The input transform is
        detectron2's, made differentiable: bilinear resize (torch, where detectron2 resizes
        uint8 images with PIL), pixel format, normalisation and padding."""
        indices = self._check_unit_images(images, indices)
        model = self.detector.model
        x = images.to(self.detector.device).float() * 255.0
        if self.detector.input_format == "BGR":
            x = x.flip(1)
        if self.geometry.resized != self.image_size:
            x = F.interpolate(x, size=self.geometry.resized, mode="bilinear", align_corners=False)
        x = (x - model.pixel_mean) / model.pixel_std
        pad_h, pad_w = self.geometry.padded[0] - x.shape[-2], self.geometry.padded[1] - x.shape[-1]
        features = self.detector._features(F.pad(x, (0, pad_w, 0, pad_h)))
        targets = [Target(i, a) for a in ATTRIBUTES for i in indices]
        values = self._values(features, targets, batch=list(range(len(indices))) * 5)
        values = values.view(len(ATTRIBUTES), len(indices))
        return values[0], values[1:].T * values.new_tensor([-1.0, -1.0, 1.0, 1.0])

    # family-specific ----------------------------------------------------------------
    def _values(
        self,
        features: dict[str, torch.Tensor],
        targets: Sequence[Target],
        batch: list[int] | None = None,
    ) -> torch.Tensor:
        """Target values (T,) computed from pyramid ``features`` (row ``batch[t]`` of them for
        target t; row 0 for all by default)."""
        raise NotImplementedError


def _masked(level: torch.Tensor, masks: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """A level (1, C, h, w) times each of ``masks`` (B, h_m, w_m) placed on it -> (B, C, h, w)."""
    return level * masks_to_layer(masks, geometry, tuple(level.shape[-2:]))[:, None].to(level)


def _masking_hook(masks: torch.Tensor, geometry: InputGeometry) -> Callable[..., Any]:
    """A forward hook multiplying a module's output (B, C, h, w), or each map of a dict of
    them, by ``masks`` placed on its cells."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return _masked(output, masks, geometry)
        if isinstance(output, dict):
            return type(output)((k, _masked(v, masks, geometry)) for k, v in output.items())
        raise TypeError(f"cannot mask a module output of type {type(output).__name__}")

    return hook


class RCNNTrace(Detectron2Trace):
    """Faster R-CNN trace. A prediction depends on its own RoI's pooled features: the fast
    path back-propagates all targets through the box head in one pass (one row per target),
    then each RoI's gradient through RoIAlign on a window of its level."""

    detector: Detectron2RCNN

    def __init__(
        self, detector: Detectron2RCNN, image: np.ndarray, units: Detections | None = None
    ) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            if units is None:
                (proposals,) = detector._proposals(self.image_list, self.features)
                rois = proposals.proposal_boxes.tensor
                logits, deltas = detector._predict(detector._pool(self.features, [rois]))
                self.detections = detector._postprocess(logits, deltas, proposals, self.geometry)
                self.rois = rois[self.detections.provenance.proposal]
            else:
                self.detections = units
                sy, sx = self.geometry.scale()
                box = units.provenance.proposal_box
                self.rois = box / box.new_tensor([sx, sy, sx, sy])

    def layer_names(self) -> list[str]:
        return [*super().layer_names(), "roi"]

    def _has_fast_path(self, layer: str) -> bool:
        pooler = self.detector.model.roi_heads.box_pooler
        aligns = all(isinstance(p, ROIAlign) for p in pooler.level_poolers)
        return layer == "roi" or (self._is_level(layer) and aligns)

    def _target_rois(self, targets: Sequence[Target]) -> torch.Tensor:
        """Each target's RoI in resized-input pixels (T, 4)."""
        return self.rois[[t.index for t in targets]]

    def _values_from_outputs(self, logits, deltas, rois, targets) -> torch.Tensor:
        """Target values from per-target box-head outputs (row t explains target t)."""
        det = [t.index for t in targets]
        cls = self.detections.labels[det] - 1
        rows = torch.arange(len(targets))
        probs = self.detector._probs(logits)  # background last
        boxes = self.detector.model.roi_heads.box_predictor.box2box_transform.apply_deltas(
            deltas, rois
        ).view(len(targets), -1, 4)
        boxes = boxes[rows, cls] if boxes.shape[1] > 1 else boxes[:, 0]
        outputs = UnitOutputs(
            probs[rows, cls],
            self.geometry.boxes_to_original(boxes),
            torch.cat((probs[:, -1:], probs[:, :-1]), 1),  # background first, as Detections
        )
        return target_values(targets, outputs)

    def _values(self, features, targets, batch=None):
        rois = self._target_rois(targets)
        if batch is None:
            pooled = self.detector._pool(features, [rois])
        else:  # one image per target: pool each RoI from its own image
            per_image: list[list[int]] = [
                [] for _ in range(features[self.detector.box_in_features[0]].shape[0])
            ]
            for t, b in enumerate(batch):
                per_image[b].append(t)
            order = [t for rows in per_image for t in rows]
            pooled_sorted = self.detector._pool(features, [rois[rows] for rows in per_image])
            pooled = torch.empty_like(pooled_sorted)
            pooled[order] = pooled_sorted
        logits, deltas = self.detector._predict(pooled)
        return self._values_from_outputs(logits, deltas, rois, targets)

    def _exact(self, targets, layer):
        if layer != "roi":
            return super()._exact(targets, layer)
        rois = self._target_rois(targets)
        with torch.no_grad():
            pooled = self.detector._pool(self.features, [rois])
        pooled.requires_grad_(True)
        with torch.enable_grad():
            logits, deltas = self.detector._predict(pooled)
            values = self._values_from_outputs(logits, deltas, rois, targets)
            grads = [
                torch.autograd.grad(values[i], pooled, retain_graph=True)[0][i]
                for i in range(len(targets))
            ]
        return [self._roi_windows(targets, rois, pooled.detach(), torch.stack(grads))]

    def _fast(self, targets, layer, margin):
        rois = self._target_rois(targets)
        with torch.no_grad():
            pooled = self.detector._pool(self.features, [rois])
        pooled.requires_grad_(True)
        with torch.enable_grad():
            logits, deltas = self.detector._predict(pooled)
            values = self._values_from_outputs(logits, deltas, rois, targets)
            (g_pooled,) = torch.autograd.grad(values.sum(), pooled)
        if layer == "roi":
            return [self._roi_windows(targets, rois, pooled.detach(), g_pooled)]
        return self._level_windows(targets, layer, rois, g_pooled, margin)

    def _level_windows(self, targets, layer, rois, g_pooled, margin) -> list[FeatureWindows]:
        """Back-propagate each RoI's pooled-feature gradient through RoIAlign on windows of
        its level (``WindowedTrace._roi_align_windows``: exact)."""
        det = self.detector
        poolers = det.model.roi_heads.box_pooler.level_poolers
        level = det._pooled_level_index(rois.device)[det._roi_levels(rois)]
        names = (
            [layer] if layer != "fpn" else [det.feature_levels[int(lv)] for lv in level.unique()]
        )
        out = []
        for name in names:
            lv = det.feature_levels.index(name)
            fmap = self.features[name][0]
            rows = torch.where(level == lv)[0].tolist()
            others = [i for i in range(len(targets)) if int(level[i]) != lv]
            if layer != "fpn" and others:  # pooled from another level: no gradient here
                out.append(self._empty_windows(name, others, targets, fmap))
            if not rows:
                continue
            pooler = poolers[det.box_in_features.index(name)]
            pad = self._margin(margin, rows, targets, fmap)
            out += self._roi_align_windows(
                name,
                rows,
                targets,
                fmap,
                rois[rows] * pooler.spatial_scale,
                pad,
                g_pooled[rows],
                pooler.sampling_ratio,
                pooler.aligned,
            )
        return out


class RetinaNetTrace(Detectron2Trace):
    """RetinaNet trace. Fast path on the FPN levels: each prediction depends on a small
    window of its level, back-propagated for all predictions at once (``local_head``)."""

    detector: Detectron2RetinaNet

    def __init__(self, detector: Detectron2RetinaNet, image: np.ndarray) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            self.levels = [self.features[f] for f in detector.feature_levels]
            self.raw = detector._head(self.levels, record=True)
            self.records = detector.local_head.records if detector.local_head else None
            self.anchors = [b.tensor for b in detector.model.anchor_generator(self.levels)]
            scores, deltas, widths = detector._flatten(self.raw)
            self.detections = detector._postprocess(
                [s[0] for s in scores],
                [d[0] for d in deltas],
                widths,
                [Boxes(a) for a in self.anchors],
                self.geometry,
            )

    def _has_fast_path(self, layer: str) -> bool:
        return self.detector.local_head is not None and self._is_level(layer)

    def _target_info(self, targets: Sequence[Target]):
        p = self.detections.provenance
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        return p.level[det], p.y[det], p.x[det], p.anchor[det], p.class_index[det] - 1

    def _values_from_cells(self, cells, targets, level, anchor, cls, anchor_boxes) -> torch.Tensor:
        """Target values from each target's raw head outputs at its cell ({name: (T, C_out)})."""
        t, a = len(targets), self.detector.num_anchors
        rows = torch.arange(t)
        probs = cells["cls_score"].view(t, a, -1)[rows, anchor].sigmoid()  # (T, K)
        deltas = cells["bbox_pred"].view(t, a, 4)[rows, anchor]
        boxes = self.detector.model.box2box_transform.apply_deltas(deltas, anchor_boxes)
        outputs = UnitOutputs(
            probs[rows, cls],
            self.geometry.boxes_to_original(boxes),
            F.pad(probs, (1, 0)),  # column 0: the background (none for a sigmoid head)
        )
        return target_values(targets, outputs)

    def _anchor_boxes(self, level, y, x, anchor) -> torch.Tensor:
        a = self.detector.num_anchors
        return torch.stack(
            [
                self.anchors[int(lv)][
                    (int(yy) * self.levels[int(lv)].shape[-1] + int(xx)) * a + int(an)
                ]
                for lv, yy, xx, an in zip(level, y, x, anchor, strict=True)
            ]
        ).reshape(-1, 4)

    @staticmethod
    def _cells(raw, level, y, x, batch: list[int]) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack(
                [
                    raw[int(lv)][name][b, :, int(yy), int(xx)]
                    for b, lv, yy, xx in zip(batch, level, y, x, strict=True)
                ]
            )
            for name in ("cls_score", "bbox_pred")
        }

    def _values(self, features, targets, batch=None):
        level, y, x, anchor, cls = self._target_info(targets)
        raw = self.detector._head([features[f] for f in self.detector.feature_levels])
        batch = batch if batch is not None else [0] * len(targets)
        cells = self._cells(raw, level, y, x, batch)
        return self._values_from_cells(
            cells, targets, level, anchor, cls, self._anchor_boxes(level, y, x, anchor)
        )

    def _fast(self, targets, layer, margin):
        level, y, x, anchor, cls = self._target_info(targets)
        cells = {
            k: v.detach().requires_grad_(True)
            for k, v in self._cells(self.raw, level, y, x, [0] * len(targets)).items()
        }
        with torch.enable_grad():
            values = self._values_from_cells(
                cells, targets, level, anchor, cls, self._anchor_boxes(level, y, x, anchor)
            )
            names = list(cells)
            grads = torch.autograd.grad(values.sum(), [cells[n] for n in names], allow_unused=True)
        cot = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
        return self._local_head_windows(targets, layer, (level, y, x), cot, self.levels, margin)
