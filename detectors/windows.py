"""Feature windows, shared by the torchvision and detectron2 traces: crops of a feature level
around each target, RoI-pooled grids, and RoIAlign's backward on crops of a level.

Coordinates: RoIs and boxes are xyxy; ``rois`` in the detector's resized-input pixels, level
RoIs in cells of their level, boxes of ``detections`` in original pixels. Window origins are
(row, col) cells of the level.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from xaibench.detectors.local_head import LevelRecord

from xaibench.detector import FeatureWindows, GradientMode, WhiteBoxTrace
from xaibench.geometry import InputGeometry
from xaibench.types import Detections, Target


class WindowedTrace(WhiteBoxTrace):
    """A trace whose fast paths return windows of its feature layers and whose exact path
    runs one autograd backward per target. Subclasses set ``detector`` (with its
    ``feature_levels``), ``geometry`` and ``detections``, and implement the family-specific
    methods at the end."""

    detector: Any
    geometry: InputGeometry
    detections: Detections
    records: dict[str, list[LevelRecord]] | None = None  # one-stage heads' forward records

    def gradients(
        self,
        targets: Sequence[Target],
        layer: str = "fpn",
        mode: GradientMode = "fast",
        margin: int | Callable[[torch.Tensor], int] = 0,
    ) -> list[FeatureWindows]:
        self._check(targets, mode)
        if layer not in ("fpn", "roi", *self.detector.feature_levels):
            self._module_for(layer)  # a clear error for an unknown layer
        if not targets:
            return []
        if mode == "fast" and self._has_fast_path(layer):
            return self._fast(targets, layer, margin)
        return self._exact(targets, layer)

    def to_image(self, windows: FeatureWindows, maps: torch.Tensor) -> torch.Tensor:
        if windows.roi_boxes is not None:
            return self.geometry.boxes_grid_to_original(maps, windows.roi_boxes)
        return self.geometry.windows_to_original(maps, windows.origin, windows.layer_size)

    def _target_layer(self, target: Target, layer: str) -> str:
        """The layer ``target`` is explained on: its own pyramid level for ``"fpn"``."""
        if layer == "fpn":
            level = int(self.detections.provenance.level[target.index])
            return self.detector.feature_levels[level]
        return layer

    def _layer_gradients(
        self,
        layers: dict[str, torch.Tensor],
        values: torch.Tensor,
        targets: Sequence[Target],
        layer: str,
    ) -> list[FeatureWindows]:
        """The exact reference: one autograd backward of each target's value (``values`` (T,),
        with their graph) to its layer among ``layers`` ({name: (1, C, h, w)})."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault(self._target_layer(t, layer), []).append(i)
        out = []
        for name, rows in groups.items():
            a = layers[name]
            if a.dim() != 4 or a.shape[0] != 1:
                raise ValueError(
                    f"layer {name!r} has shape {tuple(a.shape)}; expected (1, C, h, w)"
                )
            grads = [
                torch.autograd.grad(values[i], a, retain_graph=True, allow_unused=True)[0]
                for i in rows
            ]
            grads = [torch.zeros_like(a) if g is None else g for g in grads]
            out.append(self._windows(name, rows, targets, a.detach()[0], torch.cat(grads)))
        return out

    def _local_head_windows(
        self,
        targets: Sequence[Target],
        layer: str,
        cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        cotangents: dict[str, torch.Tensor],
        levels: Sequence[torch.Tensor],
        margin: int | Callable[[torch.Tensor], int],
    ) -> list[FeatureWindows]:
        """A one-stage head's fast path: given each target's cell ``(level, y, x)`` (T,) and the
        gradient of its value with respect to the raw head outputs at that cell
        (``cotangents`` {output name: (T, C_out)}), its windows on ``layer`` (``"fpn"``: its
        own level) from ``detector.local_head`` over this trace's records; ``levels`` are
        the pyramid levels (1, C, h, w)."""
        level, y, x = cells
        det = self.detector
        if layer == "fpn":
            groups = [(lv, torch.where(level == lv)[0]) for lv in level.unique().tolist()]
        else:  # predictions of other levels have no gradient on this one
            groups = [(det.feature_levels.index(layer), torch.arange(len(targets)))]
        out = []
        for lv, rows in groups:
            own = level[rows] == lv
            ys, xs = torch.where(own, y[rows], 0), torch.where(own, x[rows], 0)
            cot = {n: c[rows] * own[:, None] for n, c in cotangents.items()}
            feat = levels[lv][0]
            pad = self._margin(margin, rows.tolist(), targets, feat)
            parts = det.local_head.level_parts(
                lv, feat, ys, xs, cot, self.records, det.gn_tolerance, det.exact_level_cells, pad
            )
            name = det.feature_levels[lv]
            for part, g, origin, acts in parts:
                out.append(self._windows(name, rows[part].tolist(), targets, feat, g, origin, acts))
        return out

    # family-specific ---------------------------------------------------------------
    @abstractmethod
    def _module_for(self, layer: str) -> nn.Module:
        """The module named by ``layer`` (a backbone stage or ``module:<dotted.name>``);
        ``KeyError`` listing the known layers otherwise."""

    @abstractmethod
    def _has_fast_path(self, layer: str) -> bool:
        """Whether ``layer`` has a structured (fast) path."""

    @abstractmethod
    def _fast(
        self, targets: Sequence[Target], layer: str, margin: int | Callable[[torch.Tensor], int]
    ) -> list[FeatureWindows]:
        """All targets' windows at once on ``layer``."""

    @abstractmethod
    def _exact(self, targets: Sequence[Target], layer: str) -> list[FeatureWindows]:
        """One autograd backward per target (``_layer_gradients``)."""

    def _windows(
        self,
        layer: str,
        rows: list[int],
        targets: Sequence[Target],
        activation: torch.Tensor,
        gradients: torch.Tensor,
        origin: torch.Tensor | None = None,
        windows: torch.Tensor | None = None,
    ) -> FeatureWindows:
        """Windows on a spatial layer ``activation`` (C, h, w) for ``targets[rows]``; without
        ``windows`` the window is the whole layer."""
        layer_size = (int(activation.shape[-2]), int(activation.shape[-1]))
        if windows is None:
            windows = activation[None].expand(len(rows), -1, -1, -1)
            origin = torch.zeros(len(rows), 2, dtype=torch.long)
        return FeatureWindows(
            layer=layer,
            target_index=torch.tensor(rows, dtype=torch.long),
            activations=windows,
            gradients=gradients.detach(),
            origin=origin,
            layer_size=layer_size,
            boxes_on_layer=self.geometry.boxes_to_layer(self._boxes(targets, rows), layer_size),
            layer_activations=activation,
        )

    def _empty_windows(
        self, layer: str, rows: list[int], targets: Sequence[Target], fmap: torch.Tensor
    ) -> FeatureWindows:
        """One-cell windows with zero gradient, for targets that do not depend on ``fmap``."""
        zeros = fmap.new_zeros(len(rows), fmap.shape[0], 1, 1)
        origin = torch.zeros(len(rows), 2, dtype=torch.long)
        return self._windows(layer, rows, targets, fmap, zeros, origin=origin, windows=zeros)

    def _margin(
        self,
        margin: int | Callable[[torch.Tensor], int],
        rows: list[int],
        targets: Sequence[Target],
        fmap: torch.Tensor,
    ) -> int:
        """``margin`` in cells, or computed from the targets' boxes on this layer."""
        if not callable(margin):
            return int(margin)
        layer_size = (int(fmap.shape[-2]), int(fmap.shape[-1]))
        return int(margin(self.geometry.boxes_to_layer(self._boxes(targets, rows), layer_size)))

    def _boxes(self, targets: Sequence[Target], rows: list[int]) -> torch.Tensor:
        """The detected boxes (original pixels) of ``targets[rows]``."""
        det = torch.tensor([targets[i].index for i in rows], dtype=torch.long)
        return self.detections.boxes[det.to(self.detections.boxes.device)]

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

    def _roi_align_windows(
        self,
        layer: str,
        rows: list[int],
        targets: Sequence[Target],
        fmap: torch.Tensor,
        level_rois: torch.Tensor,
        margin: int,
        g_pooled: torch.Tensor,
        sampling_ratio: int,
        aligned: bool,
    ) -> list[FeatureWindows]:
        """Back-propagate the pooled-feature gradients ``g_pooled`` (T, C, k, k) of
        ``targets[rows]`` through RoIAlign (scale 1 on ``level_rois`` (T, 4), level cells)
        onto a window of ``fmap`` (C, h, w) that holds every sample each RoI reads, plus
        ``margin`` cells (so the result is exact).

        Windows lie inside the level (RoIAlign clamps at the level's edges, a window edge
        inside the level would change that) and are grouped by size, so that one batched
        backward serves a group with little padding."""
        spans = _roi_spans(level_rois, margin)
        h, w = fmap.shape[-2:]
        out = []
        for group in _size_groups(spans[:, 2:] - spans[:, :2]):
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
                g_pooled[group], torch.cat((index, rois), 1), windows.shape, sampling_ratio, aligned
            )
            origin = torch.stack((y0, x0), 1).cpu()
            picked = [rows[i] for i in group]
            out.append(self._windows(layer, picked, targets, fmap, grads, origin, windows))
        return out


def roi_align_backward(
    grad: torch.Tensor,
    boxes: torch.Tensor,
    shape: torch.Size,
    sampling_ratio: int,
    aligned: bool = False,
) -> torch.Tensor:
    """Gradient of ``roi_align(x, boxes, grad.shape[-2:], 1.0, sampling_ratio, aligned)`` with
    respect to ``x`` of ``shape`` (N, C, h, w), for the pooled gradient ``grad`` (K, C, k, k)
    and ``boxes`` (K, 5) (batch index, xyxy in cells): torchvision's backward kernel, without
    the forward pass autograd would run first."""
    n, c, h, w = shape
    return torch.ops.torchvision._roi_align_backward(
        grad.contiguous(),
        boxes,
        1.0,
        grad.shape[-2],
        grad.shape[-1],
        n,
        c,
        h,
        w,
        sampling_ratio,
        aligned,
    )


def _roi_spans(level_rois: torch.Tensor, margin: int) -> torch.Tensor:
    """(T, 4) [y0, x0, y1, x1) cells RoIAlign reads for RoIs xyxy in level cells: the
    bilinear neighbours of every sample (aligned or not; RoIs are taken at least one cell
    wide), plus ``margin`` cells on each side."""
    x1, y1, x2, y2 = level_rois.unbind(1)
    x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    start = torch.stack((y1.floor() - 1, x1.floor() - 1), 1) - margin
    end = torch.stack((y2.ceil() + 2, x2.ceil() + 2), 1) + margin
    return torch.cat((start, end), 1).long()


def _size_groups(sizes: torch.Tensor, max_groups: int = 16) -> list[list[int]]:
    """Split rows of (T, 2) window sizes, taken in increasing area, into at most
    ``max_groups`` runs of least total padded volume (count x max h x max w per run)."""
    order = torch.argsort(sizes.prod(1)).cpu().numpy()
    hs, ws = (sizes[order, k].cpu().numpy().astype(np.float64) for k in (0, 1))
    n = len(order)
    upper = np.triu(np.ones((n, n), dtype=bool))  # run [i, j] for j >= i
    run_h = np.maximum.accumulate(np.where(upper, hs[None], 0), axis=1)
    run_w = np.maximum.accumulate(np.where(upper, ws[None], 0), axis=1)
    count = np.arange(n)[None] - np.arange(n)[:, None] + 1
    cost = np.where(upper, count * run_h * run_w, np.inf)  # cost[i, j]: one run over i..j
    best, starts = [cost[0]], [np.zeros(n, dtype=int)]
    for _ in range(1, min(max_groups, n)):
        # the last run starts at i >= 1 after a best split of [0, i - 1]
        total = np.full((n, n), np.inf)
        total[1:] = best[-1][:-1, None] + cost[1:]
        starts.append(np.argmin(total, axis=0))
        best.append(np.minimum(best[-1], total.min(axis=0)))
        starts[-1] = np.where(best[-1] < best[-2], starts[-1], starts[-2])
    groups, end = [], n - 1
    for k in range(len(best) - 1, -1, -1):
        if end < 0:
            break
        first = int(starts[k][end]) if k else 0
        groups.append(order[first : end + 1].tolist())
        end = first - 1
    return groups[::-1]
