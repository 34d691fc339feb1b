"""Two-stage (RoI) detectors, written once for every framework: Faster R-CNN of torchvision and
of detectron2.

Each prediction depends on its own RoI's pooled features. The framework adapter
(``RoINetwork``) supplies the proposals, RoI pooling, the box head, how one RoI's outputs
become a class's score and box, the post-processing with provenance (proposal index and box,
level, cell of the RoI centre, class), the level each RoI is pooled from and the RoIAlign
settings of each level. The trace (``RoINetworkTrace``) explains any unit from those; its fast path
back-propagates all targets through the box head in one pass (one row per target), then each
RoI's gradient through RoIAlign on a window of its level (exact).

Coordinates: RoIs xyxy in resized-input pixels; level RoIs in cells of their level.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from xaibench.detectors.network import Features, NetworkDetector, NetworkTrace
from xaibench.detectors.windows import roi_align_backward, roi_spans, size_groups

from xaibench.detector import FeatureWindows
from xaibench.geometry import InputGeometry
from xaibench.types import Detections, Provenance, Target


@dataclass
class Proposals:
    """One image's proposals: ``boxes`` (R, 4) xyxy resized-input pixels and ``objectness``
    (R,) in [0, 1]."""

    boxes: torch.Tensor
    objectness: torch.Tensor


class RoIAlignSettings(NamedTuple):
    """How a level is pooled: RoIAlign with this scale (cells per resized pixel), sampling
    ratio and pixel alignment."""

    spatial_scale: float
    sampling_ratio: int
    aligned: bool


class RoINetwork(NetworkDetector):
    """The adapter of a two-stage detector (on top of ``NetworkDetector``'s)."""

    @abstractmethod
    def proposals(self, inputs: Any, features: Features) -> list[Proposals]:
        """The proposal stage's output, one ``Proposals`` per image."""

    @abstractmethod
    def pool(self, inputs: Any, features: Features, rois: list[torch.Tensor]) -> torch.Tensor:
        """Pooled features (R, C, k, k) of each image's RoIs (``rois[i]`` (R_i, 4), resized
        pixels, on image i of ``features``)."""

    @abstractmethod
    def predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box head: class logits and box deltas of each pooled RoI."""

    @abstractmethod
    def unit_outputs(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        rois: torch.Tensor,
        class_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable score (T,) and decoded box (T, 4, resized pixels) of class
        ``class_index`` (``Provenance.class_index``, T) from row t's box-head outputs, and its
        class probabilities (T, K + 1, the columns of ``Detections.class_probs``)."""

    @abstractmethod
    def postprocess(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        proposals: Proposals,
        geometry: InputGeometry,
        features: Features,
        nms: bool = True,
    ) -> Detections:
        """The framework's post-processing of one image's box-head outputs, keeping each
        detection's provenance (``proposal`` indexes ``proposals``; ``nms=False``: every
        candidate above the score threshold)."""

    @abstractmethod
    def roi_levels(self, rois: torch.Tensor) -> torch.Tensor:
        """Index into ``feature_levels`` of the level each RoI (R, 4) is pooled from."""

    @abstractmethod
    def roi_aligns(self) -> dict[int, RoIAlignSettings] | None:
        """Each pooled level's (index into ``feature_levels``) RoIAlign settings; None if a
        level is pooled otherwise (the levels then have no fast path)."""

    def detect_from_features(
        self, inputs: Any, features: Features, geometry: list[InputGeometry], nms: bool = True
    ) -> list[Detections]:
        proposals = self.proposals(inputs, features)
        logits, deltas = self.predict(self.pool(inputs, features, [p.boxes for p in proposals]))
        counts = [len(p.boxes) for p in proposals]
        return [
            self.postprocess(lg, dl, p, g, features, nms)
            for lg, dl, p, g in zip(
                logits.split(counts), deltas.split(counts), proposals, geometry, strict=True
            )
        ]

    def trace(self, image: np.ndarray) -> RoINetworkTrace:
        return RoINetworkTrace(self, image)

    def roi_detections(
        self,
        detections: dict[str, torch.Tensor],
        proposal: torch.Tensor,
        rois: torch.Tensor,
        strides: Sequence[float],
        geometry: InputGeometry,
    ) -> Detections:
        """Detections from ``detections`` (``boxes`` in original pixels, ``scores``,
        ``labels``, which are also the class index, ``class_probs``, ``objectness``) with the
        provenance of their RoIs ``rois`` (N, 4, resized pixels; ``proposal`` (N,) their
        indices): the pooled level, and the cell of the RoI centre at that level's stride
        (``strides``: resized pixels per cell, per level)."""
        level = self.roi_levels(rois)
        stride = torch.tensor(strides, device=rois.device)[level]
        centre = (rois[:, :2] + rois[:, 2:]) / 2
        cells = torch.div(centre, stride[:, None], rounding_mode="floor").long()
        labels = detections["labels"]
        provenance = Provenance(
            level=level,
            y=cells[:, 1],
            x=cells[:, 0],
            anchor=torch.zeros_like(labels),
            class_index=labels,
            proposal=proposal,
            proposal_box=geometry.boxes_to_original(rois),
        )
        return Detections(**detections, provenance=provenance, image_size=geometry.original)

    def trace_candidates(self, image: np.ndarray) -> RoINetworkTrace:
        return RoINetworkTrace(self, image, nms=False)

    def trace_units(self, image: np.ndarray, units: Detections) -> RoINetworkTrace:
        """Re-read ``units`` on ``image`` with the current parameters: their own proposal boxes
        (``provenance.proposal_box``) and classes, not this run's proposals."""
        return RoINetworkTrace(self, image, units=units)


class RoINetworkTrace(NetworkTrace):
    """A two-stage detector's trace (see the module docstring). ``rois`` (N, 4): each
    detection's RoI in resized-input pixels."""

    detector: RoINetwork

    def __init__(
        self,
        detector: RoINetwork,
        image: np.ndarray,
        units: Detections | None = None,
        nms: bool = True,
    ) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            if units is None:
                (proposals,) = detector.proposals(self.image_list, self.features)
                pooled = detector.pool(self.image_list, self.features, [proposals.boxes])
                logits, deltas = detector.predict(pooled)
                self.detections = detector.postprocess(
                    logits, deltas, proposals, self.geometry, self.features, nms
                )
                self.rois = proposals.boxes[self.detections.provenance.proposal]
            else:
                box = units.provenance.proposal_box
                if box is None:
                    raise ValueError("units.provenance.proposal_box is missing: not RoI units")
                self.detections = units
                sy, sx = self.geometry.scale()
                box = box.to(self.detector.device)
                self.rois = box / box.new_tensor([sx, sy, sx, sy])

    def layer_names(self) -> list[str]:
        return [*super().layer_names(), "roi"]

    def _has_fast_path(self, layer: str) -> bool:
        return layer == "roi" or (self._is_level(layer) and self.detector.roi_aligns() is not None)

    def _target_rois(self, targets: Sequence[Target]) -> torch.Tensor:
        """Each target's RoI in resized-input pixels (T, 4)."""
        return self.rois[[t.index for t in targets]]

    def _outputs_values(self, logits, deltas, rois, targets: Sequence[Target]) -> torch.Tensor:
        """Target values from per-target box-head outputs (row t explains target t)."""
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        cls = self.detections.provenance.class_index[det.to(self.detections.labels.device)]
        return self._unit_targets(targets, *self.detector.unit_outputs(logits, deltas, rois, cls))

    def _values(self, features, targets, batch=None):
        rois = self._target_rois(targets)
        if batch is None:
            pooled = self.detector.pool(self.image_list, features, [rois])
        else:  # one image per target: pool each RoI from its own image
            images = next(iter(features.values())).shape[0]
            per_image: list[list[int]] = [[] for _ in range(images)]
            for t, b in enumerate(batch):
                per_image[b].append(t)
            order = [t for rows in per_image for t in rows]
            inputs = self.detector.repeat_input(self.image_list, images)
            pooled_sorted = self.detector.pool(inputs, features, [rois[r] for r in per_image])
            pooled = torch.empty_like(pooled_sorted)
            pooled[order] = pooled_sorted
        logits, deltas = self.detector.predict(pooled)
        return self._outputs_values(logits, deltas, rois, targets)

    def _pooled_leaf(self, rois: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pooled = self.detector.pool(self.image_list, self.features, [rois])
        return pooled.requires_grad_(True)

    def _exact(self, targets, layer):
        if layer != "roi":
            return super()._exact(targets, layer)
        rois = self._target_rois(targets)
        pooled = self._pooled_leaf(rois)
        with torch.enable_grad():
            logits, deltas = self.detector.predict(pooled)
            values = self._outputs_values(logits, deltas, rois, targets)
            grads = [
                torch.autograd.grad(values[i], pooled, retain_graph=True)[0][i]
                for i in range(len(targets))
            ]
        return [self._roi_windows(targets, rois, pooled.detach(), torch.stack(grads))]

    def _fast(self, targets, layer, margin):
        rois = self._target_rois(targets)
        pooled = self._pooled_leaf(rois)
        with torch.enable_grad():
            logits, deltas = self.detector.predict(pooled)
            values = self._outputs_values(logits, deltas, rois, targets)
            (g_pooled,) = torch.autograd.grad(values.sum(), pooled)
        if layer == "roi":
            return [self._roi_windows(targets, rois, pooled.detach(), g_pooled)]
        return self._level_windows(targets, layer, rois, g_pooled, margin)

    def _roi_windows(
        self,
        targets: Sequence[Target],
        rois: torch.Tensor,
        pooled: torch.Tensor,
        grads: torch.Tensor,
    ) -> FeatureWindows:
        """Each target's RoI-pooled grid (T, C, k, k) and its gradient, spread over its RoI
        (``rois`` (T, 4), resized-input pixels)."""
        k = pooled.shape[-1]
        boxes = self._boxes(targets, list(range(len(targets))))
        roi_boxes = self.geometry.boxes_to_original(rois)
        # predicted box in the RoI grid's cells, for size-adaptive smoothing
        scale = (k / (roi_boxes[:, 2:] - roi_boxes[:, :2]).clamp(min=1e-6)).repeat(1, 2)
        on_grid = (boxes - roi_boxes[:, :2].repeat(1, 2)) * scale
        return FeatureWindows(
            layer="roi",
            target_index=torch.arange(len(targets)),
            activations=pooled,
            gradients=grads,
            origin=torch.zeros(len(targets), 2, dtype=torch.long),
            layer_size=(k, k),
            boxes_on_layer=on_grid,
            roi_boxes=roi_boxes,
        )

    def _level_windows(self, targets, layer, rois, g_pooled, margin) -> list[FeatureWindows]:
        """Back-propagate each RoI's pooled-feature gradient through RoIAlign on windows of
        its level."""
        det = self.detector
        aligns = det.roi_aligns()
        level = det.roi_levels(rois)
        names = det.feature_levels
        lvs = level.unique().tolist() if layer == "fpn" else [names.index(layer)]
        out = []
        for lv in lvs:
            fmap = self.features[names[lv]][0]
            rows = torch.where(level == lv)[0].tolist()
            others = [i for i in range(len(targets)) if int(level[i]) != lv]
            if layer != "fpn" and others:  # pooled from another level: no gradient here
                out.append(self._empty_windows(names[lv], others, targets, fmap))
            if not rows:
                continue
            align = aligns[lv]
            out += self._roi_align_windows(
                names[lv],
                rows,
                targets,
                fmap,
                rois[rows] * align.spatial_scale,
                self._margin(margin, rows, targets, fmap),
                g_pooled[rows],
                align,
            )
        return out

    def _roi_align_windows(
        self,
        layer: str,
        rows: list[int],
        targets: Sequence[Target],
        fmap: torch.Tensor,
        level_rois: torch.Tensor,
        margin: int,
        g_pooled: torch.Tensor,
        align: RoIAlignSettings,
    ) -> list[FeatureWindows]:
        """Back-propagate the pooled-feature gradients ``g_pooled`` (T, C, k, k) of
        ``targets[rows]`` through RoIAlign (scale 1 on ``level_rois`` (T, 4), level cells)
        onto a window of ``fmap`` (C, h, w) that holds every sample each RoI reads, plus
        ``margin`` cells (so the result is exact).

        Windows lie inside the level (RoIAlign clamps at the level's edges, a window edge
        inside the level would change that) and are grouped by size, so that one batched
        backward serves a group with little padding."""
        spans = roi_spans(level_rois, margin)
        h, w = fmap.shape[-2:]
        out = []
        for group in size_groups(spans[:, 2:] - spans[:, :2]):
            part = spans[group]
            hh = min(int((part[:, 2] - part[:, 0]).max()), h)
            ww = min(int((part[:, 3] - part[:, 1]).max()), w)
            y0 = part[:, 0].clamp(min=0).clamp(max=h - hh)
            x0 = part[:, 1].clamp(min=0).clamp(max=w - ww)
            ys = (y0[:, None] + torch.arange(hh, device=y0.device))[:, :, None]
            xs = (x0[:, None] + torch.arange(ww, device=x0.device))[:, None, :]
            windows = fmap[:, ys, xs].transpose(0, 1).contiguous()  # (T, C, hh, ww)
            rois = level_rois[group] - torch.stack((x0, y0, x0, y0), 1).to(level_rois)
            index = torch.arange(len(group), device=rois.device)[:, None].to(rois)
            grads = roi_align_backward(
                g_pooled[group],
                torch.cat((index, rois), 1),
                windows.shape,
                align.sampling_ratio,
                align.aligned,
            )
            origin = torch.stack((y0, x0), 1).cpu()
            picked = [rows[i] for i in group]
            out.append(self._windows(layer, picked, targets, fmap, grads, origin, windows))
        return out
