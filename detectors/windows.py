"""RoIAlign's backward on crops of a level, for the RoI trace's fast path
(``detectors/roi.py``).

Coordinates: level RoIs xyxy in cells of their level; windows (row, col) cells.
"""

from __future__ import annotations

import numpy as np
import torch


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


def roi_spans(level_rois: torch.Tensor, margin: int) -> torch.Tensor:
    """(T, 4) [y0, x0, y1, x1) cells RoIAlign reads for RoIs xyxy in level cells: the
    bilinear neighbours of every sample (aligned or not; RoIs are taken at least one cell
    wide), plus ``margin`` cells on each side."""
    x1, y1, x2, y2 = level_rois.unbind(1)
    x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    start = torch.stack((y1.floor() - 1, x1.floor() - 1), 1) - margin
    end = torch.stack((y2.ceil() + 2, x2.ceil() + 2), 1) + margin
    return torch.cat((start, end), 1).long()


def size_groups(sizes: torch.Tensor, max_groups: int = 16) -> list[list[int]]:
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
