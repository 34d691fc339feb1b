"""Which predictions of an image to explain and score, and the ground truth each one explains.

``paper`` is the ODAM paper's protocol (Sec. 4.2): class-wise NMS at IoU 0.5, the 100 best,
score > 0.1, then one-to-one matching to same-class ground truth with IoU > 0.9, greedy by
descending score; only matched predictions are kept. ``all`` keeps every detection and
``top-k`` the k best; both are matched the same way but keep unmatched predictions too.
Crowd (ignore) instances are never matched. Boxes are xyxy in original-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import batched_nms, box_iou

from xaibench.explain import select_detections
from xaibench.types import Detections, Instance

SelectionMode = Literal["paper", "all", "top-k"]
Matching = Literal["greedy", "optimal"]
SELECTION_MODES: tuple[str, ...] = ("paper", "all", "top-k")


@dataclass(frozen=True)
class SelectedInstance:
    """A prediction to explain: its row in the image's ``Detections``, the index of the
    ground-truth instance it matched (None: unmatched) and their IoU (NaN: unmatched)."""

    detection: int
    gt: int | None
    iou: float


def paper_candidates(
    detections: Detections,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    score_thresh: float = 0.1,
) -> list[int]:
    """Rows kept by class-wise NMS at ``nms_iou``, then the ``max_detections`` best, then
    score > ``score_thresh``; by descending score."""
    if len(detections) == 0:
        return []
    keep = batched_nms(
        detections.boxes.float().cpu(),
        detections.scores.float().cpu(),
        detections.labels.cpu(),
        nms_iou,
    )  # sorted by descending score
    keep = keep[:max_detections]
    # compared in the scores' own precision, so that a float32 0.1 is not > 0.1
    return keep[detections.scores.cpu()[keep] > score_thresh].tolist()


def match_to_ground_truth(
    detections: Detections,
    rows: Sequence[int],
    instances: Sequence[Instance],
    iou_thresh: float = 0.9,
    matching: Matching = "greedy",
) -> list[tuple[int | None, float]]:
    """One-to-one matching of the detections ``rows`` to same-class, non-crowd instances with
    IoU > ``iou_thresh``. ``greedy``: in the order of ``rows`` (pass them by descending
    score), each takes the free instance it overlaps most; ``optimal``: the assignment with
    the largest total IoU (Hungarian). Returns (instance index or None, IoU) per row."""
    if matching not in ("greedy", "optimal"):
        raise ValueError(f"matching must be 'greedy' or 'optimal', got {matching!r}")
    out: list[tuple[int | None, float]] = [(None, float("nan"))] * len(rows)
    candidates = [i for i, inst in enumerate(instances) if not inst.ignore]
    if not rows or not candidates:
        return out
    gt_boxes = torch.tensor(np.array([instances[i].box for i in candidates]), dtype=torch.float32)
    det_boxes = detections.boxes[list(rows)].float().cpu()
    iou = box_iou(det_boxes, gt_boxes).numpy()
    same = detections.labels[list(rows)].cpu().numpy()[:, None] == np.array(
        [instances[i].label for i in candidates]
    )
    allowed = same & (iou > iou_thresh)
    if matching == "greedy":
        taken: set[int] = set()
        for r in range(len(rows)):
            free = [c for c in np.where(allowed[r])[0] if c not in taken]
            if free:
                best = max(free, key=lambda c: iou[r, c])
                taken.add(best)
                out[r] = (candidates[best], float(iou[r, best]))
        return out
    det_idx, gt_idx = linear_sum_assignment(np.where(allowed, iou, 0.0), maximize=True)
    for r, c in zip(det_idx, gt_idx, strict=True):
        if allowed[r, c]:
            out[r] = (candidates[c], float(iou[r, c]))
    return out


def select_instances(
    detections: Detections,
    instances: Sequence[Instance],
    mode: SelectionMode = "paper",
    *,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    score_thresh: float = 0.1,
    match_iou: float = 0.9,
    top_k: int = 5,
    matching: Matching = "greedy",
) -> list[SelectedInstance]:
    """The predictions to explain (see the module docstring for the modes), by descending
    score. ``nms_iou``, ``max_detections`` and ``score_thresh`` apply to ``paper``;
    ``top_k`` to ``top-k``; ``match_iou`` and ``matching`` to all modes."""
    if mode == "paper":
        rows = paper_candidates(detections, nms_iou, max_detections, score_thresh)
    elif mode == "all":
        rows = select_detections(detections)
    elif mode == "top-k":
        rows = select_detections(detections, top_k=top_k)
    else:
        known = ", ".join(SELECTION_MODES)
        raise ValueError(f"selection mode must be one of {known}; got {mode!r}")
    matches = match_to_ground_truth(detections, rows, instances, match_iou, matching)
    selected = [
        SelectedInstance(row, gt, iou) for row, (gt, iou) in zip(rows, matches, strict=True)
    ]
    if mode == "paper":
        selected = [s for s in selected if s.gt is not None]
    return selected
