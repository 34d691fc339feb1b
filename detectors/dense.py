"""One-stage (dense) detectors, written once for every framework: FCOS and RetinaNet of
torchvision, RetinaNet of detectron2.

A dense head predicts, at every cell of every feature level, a few anchors' class scores and
box deltas. The framework adapter (``DenseNetwork``) supplies the head's modules as a
``LocalConvHead`` (or its plain forward), the anchors, how one unit's raw outputs become its
score and box, and the post-processing with provenance (level, cell, anchor, class). The trace
(``DenseNetworkTrace``) explains any unit from those; its fast path back-propagates all targets at
once on windows of their levels (``detectors/local_head.py``, which also owns the GroupNorm
guard), or, for a plain head that declares its ``window``, on crops the head re-runs on (the
outside adapter, ``xaibench.adapter.DenseDetector``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from xaibench.detectors.local_head import CellTargets, HeadRecords, LocalConvHead
from xaibench.detectors.network import Features, NetworkDetector, NetworkTrace

from xaibench.detector import FeatureWindows
from xaibench.geometry import InputGeometry
from xaibench.types import Detections, Provenance, Target

RawOutputs = list[dict[str, torch.Tensor]]
"""Per level, the head's raw output maps {name: (N, A * C_out, h, w)}."""


class DenseUnits(NamedTuple):
    """Output units of a dense head, (T,) each, as ``Provenance`` names them: ``level``
    (index into ``feature_levels``), cell ``y``/``x`` on it, ``anchor`` and ``class_index``;
    and each unit's ``anchor_boxes`` (T, 4) xyxy in resized-input pixels."""

    level: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    anchor: torch.Tensor
    class_index: torch.Tensor
    anchor_boxes: torch.Tensor

    def take(self, rows: list[int]) -> DenseUnits:
        return DenseUnits(*(u[rows] for u in self))


class DenseNetwork(NetworkDetector):
    """The adapter of a one-stage detector (on top of ``NetworkDetector``'s).

    Provenance of a detection: ``level`` (index into ``feature_levels``), cell ``y``/``x`` on
    it, ``anchor`` (0..A-1) and ``class_index`` (the label; ``unit_outputs`` maps it to the
    head's channel)."""

    num_anchors: int
    local_head: LocalConvHead | None
    """The head's branches as a ``LocalConvHead`` (fast path), or None."""
    window: int | None = None
    """Without a local head: R (cells) where the plain head's output at a cell depends only on
    the (2R+1)^2 cells of its level around it and running the head on a crop gives the same
    outputs at the crop's inner cells (stride-1 convolutions with zero "same" padding,
    point-wise layers, no normalisation over space); the fast path then re-runs the head on
    crops. None: exact path only."""

    @abstractmethod
    def anchors(self, inputs: Any, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level, the anchors (or points) of the first image, (h * w * A, 4) xyxy in
        resized-input pixels, in the order (cell row, cell col, anchor)."""

    @abstractmethod
    def unit_outputs(
        self, cells: dict[str, torch.Tensor], units: DenseUnits
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable score (T,), decoded box (T, 4, resized-input pixels) and class
        probabilities (T, K + 1, the columns of ``Detections.class_probs``) of each of the
        ``units`` from its cell's raw outputs ({name: (T, A * C_out)})."""

    @abstractmethod
    def postprocess(
        self,
        raw: RawOutputs,
        anchors: list[torch.Tensor],
        geometry: InputGeometry,
        index: int,
        nms: bool = True,
    ) -> Detections:
        """The framework's post-processing of image ``index`` of ``raw``, keeping each
        detection's provenance (``nms=False``: every candidate, before suppression)."""

    def head_outputs(self, levels: list[torch.Tensor]) -> RawOutputs:
        """The head's plain forward, for heads that ``LocalConvHead`` cannot hold."""
        raise NotImplementedError(f"{type(self).__name__} has no local head and no plain head")

    def head(
        self, levels: list[torch.Tensor], record: bool = False
    ) -> tuple[RawOutputs, HeadRecords | None]:
        """Raw outputs per level and, with ``record`` and a local head, its records."""
        if self.local_head is None:
            return self.head_outputs(levels), None
        return self.local_head.forward(levels, record)

    @property
    def gn_tolerance(self) -> float:
        """The local head's GroupNorm tolerance (``LocalConvHead``)."""
        if self.local_head is None:
            raise AttributeError(f"{type(self).__name__} has no local head")
        return self.local_head.gn_tolerance

    @gn_tolerance.setter
    def gn_tolerance(self, value: float) -> None:
        if self.local_head is None:
            raise AttributeError(f"{type(self).__name__} has no local head")
        self.local_head.gn_tolerance = value

    def detect_from_features(
        self, inputs: Any, features: Features, geometry: list[InputGeometry], nms: bool = True
    ) -> list[Detections]:
        levels = [features[name] for name in self.feature_levels]
        raw, _ = self.head(levels)
        anchors = self.anchors(inputs, levels)
        return [self.postprocess(raw, anchors, g, i, nms) for i, g in enumerate(geometry)]

    def trace(self, image: np.ndarray) -> DenseNetworkTrace:
        return DenseNetworkTrace(self, image)

    def level_units(self, level: int, anchor_idxs: torch.Tensor, width: int) -> torch.Tensor:
        """Provenance (n, 4: level, y, x, anchor) of flat indices into one level's anchors,
        laid out (cell row, cell col, anchor) on a level ``width`` cells wide."""
        a = self.num_anchors
        cell = torch.div(anchor_idxs, a, rounding_mode="floor")
        row = torch.div(cell, width, rounding_mode="floor")
        return torch.stack((torch.full_like(cell, level), row, cell % width, anchor_idxs % a), 1)

    def trace_candidates(self, image: np.ndarray) -> DenseNetworkTrace:
        return DenseNetworkTrace(self, image, nms=False)


def dense_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_probs: torch.Tensor,
    units: torch.Tensor,
    image_size: tuple[int, int],
    objectness: torch.Tensor | None = None,
) -> Detections:
    """Detections (``boxes`` original pixels) of the units ``units`` (N, 4: level, y, x,
    anchor; ``DenseNetwork.level_units``), each of its label's class channel."""
    level, y, x, anchor = units.unbind(1)
    return Detections(
        boxes=boxes,
        scores=scores,
        labels=labels,
        class_probs=class_probs,
        objectness=objectness,
        provenance=Provenance(level=level, y=y, x=x, anchor=anchor, class_index=labels),
        image_size=image_size,
    )


class DenseNetworkTrace(NetworkTrace):
    """A one-stage detector's trace. Fast path on the FPN levels: each prediction depends on a
    small window of its level, back-propagated for all predictions at once."""

    detector: DenseNetwork

    def __init__(self, detector: DenseNetwork, image: np.ndarray, nms: bool = True) -> None:
        super().__init__(detector, image)
        with torch.no_grad():
            self.levels = [self.features[name] for name in detector.feature_levels]
            self.raw, self.records = detector.head(self.levels, record=True)
            self.anchors = detector.anchors(self.image_list, self.levels)
            self.detections = detector.postprocess(self.raw, self.anchors, self.geometry, 0, nms)

    def _has_fast_path(self, layer: str) -> bool:
        windowed = self.detector.local_head is not None or self.detector.window is not None
        return windowed and self._is_level(layer)

    def _units(self, targets: Sequence[Target]) -> DenseUnits:
        """Each target's output unit."""
        p = self.detections.provenance
        det = torch.tensor([t.index for t in targets], dtype=torch.long, device=p.level.device)
        level, y, x, anchor = p.level[det], p.y[det], p.x[det], p.anchor[det]
        boxes = self._anchor_boxes(level, y, x, anchor)
        return DenseUnits(level, y, x, anchor, p.class_index[det], boxes)

    def _anchor_boxes(self, level, y, x, anchor) -> torch.Tensor:
        """(T, 4) anchor box of each unit, resized-input pixels."""
        a = self.detector.num_anchors
        sizes = torch.tensor([0] + [len(anchors) for anchors in self.anchors[:-1]])
        starts = sizes.cumsum(0).to(level.device)
        widths = torch.tensor([f.shape[-1] for f in self.levels], device=level.device)
        index = starts[level] + (y * widths[level] + x) * a + anchor
        return torch.cat(self.anchors)[index.to(self.anchors[0].device)]

    @staticmethod
    def _cells(
        raw: dict[int, dict[str, torch.Tensor]], level, y, x, batch: list[int]
    ) -> dict[str, torch.Tensor]:
        """Each unit's raw outputs at its cell, {name: (T, A * C_out)} (row ``batch[t]``):
        one indexing per level and output."""
        b = torch.as_tensor(batch, dtype=torch.long, device=level.device)
        levels = level.unique().tolist()
        rows = [torch.where(level == lv)[0] for lv in levels]
        order = torch.argsort(torch.cat(rows))  # from level groups back to target order
        out = {}
        for name in next(iter(raw.values())):
            picked = [
                raw[lv][name][b[r], :, y[r], x[r]] for lv, r in zip(levels, rows, strict=True)
            ]
            out[name] = torch.cat(picked)[order]
        return out

    def _unit_values(self, cells, targets: Sequence[Target], units: DenseUnits) -> torch.Tensor:
        return self._unit_targets(targets, *self.detector.unit_outputs(cells, units))

    def _values(self, features, targets, batch=None):
        units = self._units(targets)
        levels = [features[name] for name in self.detector.feature_levels]
        head = self.detector.local_head
        if head is None:
            raw = dict(enumerate(self.detector.head(levels)[0]))
        else:  # the head runs only on the levels that hold the units
            raw = {lv: head.forward_level(levels[lv])[0] for lv in units[0].unique().tolist()}
        cells = self._cells(raw, *units[:3], batch if batch is not None else [0] * len(targets))
        return self._unit_values(cells, targets, units)

    def _fast(self, targets, layer, margin):
        if self.detector.local_head is None:
            return self._crop_windows(targets, layer, margin)
        units = self._units(targets)
        level, y, x = units[:3]
        recorded = self._cells(dict(enumerate(self.raw)), level, y, x, [0] * len(targets))
        cells = {k: v.detach().requires_grad_(True) for k, v in recorded.items()}
        with torch.enable_grad():
            values = self._unit_values(cells, targets, units)
            names = list(cells)
            grads = torch.autograd.grad(values.sum(), [cells[n] for n in names], allow_unused=True)
        cot = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
        return self._local_head_windows(targets, layer, (level, y, x), cot, margin)

    def _local_head_windows(
        self,
        targets: Sequence[Target],
        layer: str,
        cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        cotangents: dict[str, torch.Tensor],
        margin: int | Callable[[torch.Tensor], int],
    ) -> list[FeatureWindows]:
        """Given each target's cell ``(level, y, x)`` (T,) and the gradient of its value with
        respect to the raw head outputs there (``cotangents`` {name: (T, C_out)}), its windows
        on ``layer`` (``"fpn"``: its own level) from the local head over this trace's
        records."""
        level, y, x = cells
        names = self.detector.feature_levels
        if layer == "fpn":
            groups = [(lv, torch.where(level == lv)[0]) for lv in level.unique().tolist()]
        else:  # predictions of other levels have no gradient on this one
            groups = [(names.index(layer), torch.arange(len(targets)))]
        out = []
        for lv, rows in groups:
            own = level[rows] == lv
            ys, xs = torch.where(own, y[rows], 0), torch.where(own, x[rows], 0)
            cot = {n: c[rows] * own[:, None] for n, c in cotangents.items()}
            feat = self.levels[lv][0]
            pad = self._margin(margin, rows.tolist(), targets, feat)
            cell_targets = CellTargets(ys, xs, cot)
            parts = self.detector.local_head.level_parts(self.records[lv], feat, cell_targets, pad)
            for part in parts:
                picked = rows[part.rows].tolist()
                out.append(
                    self._windows(
                        names[lv],
                        picked,
                        targets,
                        feat,
                        part.gradients,
                        part.origin,
                        part.activations,
                    )
                )
        return out

    def _crop_windows(
        self,
        targets: Sequence[Target],
        layer: str,
        margin: int | Callable[[torch.Tensor], int],
    ) -> list[FeatureWindows]:
        """The fast path of a plain head with a ``window`` R: per level, the head re-run on a
        crop of (2(R + margin) + 1)^2 cells around each target's cell (kept inside the level),
        all its targets in one backward pass; targets of other levels than ``layer`` get zero
        gradient on it."""
        units = self._units(targets)
        names = self.detector.feature_levels
        out = []
        for lv in units.level.unique().tolist():
            rows = torch.where(units.level == lv)[0].tolist()
            if layer not in ("fpn", names[lv]):
                out.append(self._empty_windows(layer, rows, targets, self.features[layer][0]))
                continue
            feat, own = self.levels[lv][0], units.take(rows)
            h, w = feat.shape[-2:]
            reach = int(self.detector.window) + self._margin(margin, rows, targets, feat)
            kh, kw = min(2 * reach + 1, h), min(2 * reach + 1, w)
            yy, xx = own.y.to(feat.device), own.x.to(feat.device)
            y0, x0 = (yy - reach).clamp(min=0, max=h - kh), (xx - reach).clamp(min=0, max=w - kw)
            ys = (y0[:, None] + torch.arange(kh, device=feat.device))[:, :, None]
            xs = (x0[:, None] + torch.arange(kw, device=feat.device))[:, None, :]
            crops = feat[:, ys, xs].transpose(0, 1).contiguous().requires_grad_(True)
            with torch.enable_grad():
                (raw,), _ = self.detector.head([crops])  # crop t: target t's window
                t = torch.arange(len(rows), device=feat.device)
                cells = {k: v[t, :, yy - y0, xx - x0] for k, v in raw.items()}
                values = self._unit_values(cells, [targets[i] for i in rows], own)
                (grads,) = torch.autograd.grad(values.sum(), crops)
            origin = torch.stack((y0, x0), 1).cpu()
            out.append(self._windows(names[lv], rows, targets, feat, grads, origin, crops.detach()))
        return out
