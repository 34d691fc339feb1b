"""Ground-truth regions as pixel masks, and the checks every heat map goes through.

A pixel (row r, column c) covers [c, c + 1) x [r, r + 1) in original-image coordinates. Which
pixels a box (xyxy, original pixels) holds is the ``box_convention`` of the region metrics:

- ``"centre"`` (default): a pixel is inside when its centre (c + 0.5, r + 0.5) is, edges
  included, so a box with integer corners covers exactly (x2 - x1) * (y2 - y1) pixels;
- ``"odam"`` (the official ODAM evaluation scripts): every pixel the box touches, columns
  floor(x1) <= c < ceil(x2) and rows floor(y1) <= r < ceil(y2) (clipped to the image), for
  energy PG, ODI and box VEA; the pointing game instead hits when the peak's pixel indices lie
  strictly inside the box, x1 < c < x2 and y1 < r < y2 (``box_interior_masks``).

Both agree on boxes with integer corners except the pointing game's left and top pixel
column and row (index c = x1 is a hit by centre, a miss by strict inequality).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from xaibench.metric import Metric
from xaibench.types import Instance

RegionKind = Literal["box", "mask"]
BoxConvention = Literal["centre", "odam"]
BOX_CONVENTIONS: tuple[str, ...] = ("centre", "odam")


def check_box_convention(convention: str) -> BoxConvention:
    """``convention`` if it is one of ``BOX_CONVENTIONS``, else ValueError."""
    if convention not in BOX_CONVENTIONS:
        raise ValueError(
            f"box_convention must be one of {', '.join(BOX_CONVENTIONS)}; got {convention!r}"
        )
    return convention  # type: ignore[return-value]


def check_region_kinds(kinds: tuple[str, ...]) -> tuple[RegionKind, ...]:
    """``kinds`` if each is "box" or "mask" (and there is at least one), else ValueError."""
    for kind in kinds:
        if kind not in ("box", "mask"):
            raise ValueError(f"regions must be 'box' and/or 'mask', got {kind!r}")
    if not kinds:
        raise ValueError("regions must name at least one of 'box', 'mask'")
    return tuple(kinds)  # type: ignore[return-value]


def box_masks(
    boxes: np.ndarray, size: tuple[int, int], convention: BoxConvention = "centre"
) -> np.ndarray:
    """(N, H, W) bool: the pixels of each box (N, 4) xyxy, by ``convention`` (module
    docstring: pixel centres inside, or ``"odam"``: every pixel the box touches); NaN boxes
    give empty masks."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = size
    cx, cy = np.arange(width), np.arange(height)
    with np.errstate(invalid="ignore"):
        if check_box_convention(convention) == "centre":
            in_x = (cx[None] + 0.5 >= boxes[:, 0:1]) & (cx[None] + 0.5 <= boxes[:, 2:3])
            in_y = (cy[None] + 0.5 >= boxes[:, 1:2]) & (cy[None] + 0.5 <= boxes[:, 3:4])
        else:
            in_x = (cx[None] >= np.floor(boxes[:, 0:1])) & (cx[None] < np.ceil(boxes[:, 2:3]))
            in_y = (cy[None] >= np.floor(boxes[:, 1:2])) & (cy[None] < np.ceil(boxes[:, 3:4]))
    return in_y[:, :, None] & in_x[:, None, :]  # (N, H, W) from (N, H) and (N, W)


def box_interior_masks(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool: the pixels whose indices (c, r) lie strictly inside each box (N, 4)
    xyxy, x1 < c < x2 and y1 < r < y2 (the official ODAM pointing game)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = np.arange(size[1]), np.arange(size[0])
    with np.errstate(invalid="ignore"):
        in_x = (cx[None] > boxes[:, 0:1]) & (cx[None] < boxes[:, 2:3])
        in_y = (cy[None] > boxes[:, 1:2]) & (cy[None] < boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def instance_region(
    instance: Instance,
    kind: RegionKind,
    size: tuple[int, int],
    convention: BoxConvention = "centre",
    pointing: bool = False,
) -> np.ndarray:
    """(H, W) bool region of a ground-truth instance: its box (pixels by ``convention``;
    ``pointing`` with ``"odam"``: the strict interior of the pointing game) or its mask (all
    False when the instance has no mask)."""
    if kind == "box":
        if pointing and check_box_convention(convention) == "odam":
            return box_interior_masks(instance.box[None], size)[0]
        return box_masks(instance.box[None], size, convention)[0]
    if kind != "mask":
        raise ValueError(f"region kind must be 'box' or 'mask', got {kind!r}")
    if instance.mask is None:
        return np.zeros(size, dtype=bool)
    mask = np.asarray(instance.mask, dtype=bool)
    if mask.shape != tuple(size):
        raise ValueError(
            f"instance {instance.id!r} has a {mask.shape} mask; expected the image size {size}"
        )
    return mask


def target_regions(
    instances: Sequence[Instance],
    gt_index: np.ndarray,
    kind: RegionKind,
    size: tuple[int, int],
    convention: BoxConvention = "centre",
    pointing: bool = False,
) -> tuple[np.ndarray, list[str | None]]:
    """(N, H, W) bool region of each target's ground truth (``instance_region``), and per row
    the reason it cannot be used (no ground truth, no mask, empty region) or None."""
    regions = np.zeros((len(gt_index), *size), dtype=bool)
    reasons: list[str | None] = []
    for row, g in enumerate(gt_index):
        if g < 0:
            reasons.append("no matched ground-truth instance")
            continue
        inst = instances[g]
        if kind == "mask" and inst.mask is None:
            reasons.append("ground-truth instance has no mask")
            continue
        regions[row] = instance_region(inst, kind, size, convention, pointing)
        reasons.append(None if regions[row].any() else f"ground-truth {kind} covers no pixel")
    return regions, reasons


def map_problems(
    maps: np.ndarray, need_peak: bool = False, need_energy: bool = False
) -> list[str | None]:
    """Per map (N, H, W), why a metric cannot use it, or None.

    Every metric rejects non-finite values. ``need_peak`` (pointing game, compactness, VEA):
    a constant map has no maximum to point with. ``need_energy`` (energy PG, ODI,
    compactness): the map must be non-negative with a positive sum.
    """
    maps = np.asarray(maps)
    flat = maps.reshape(maps.shape[0], -1)
    finite = np.isfinite(flat).all(axis=1)
    out: list[str | None] = []
    for i in range(flat.shape[0]):
        row = flat[i]
        if not finite[i]:
            out.append("map has NaN or infinite values")
        elif need_peak and row.max() == row.min():
            out.append("constant map")
        elif need_energy and row.min() < 0:
            out.append("map has negative values (energy metrics need a non-negative map)")
        elif need_energy and row.sum(dtype=np.float64) <= 0:
            out.append("map sums to zero")
        else:
            out.append(None)
    return out


def first_reason(*reasons: str | None) -> str | None:
    """The first of ``reasons`` that is not None."""
    return next((r for r in reasons if r is not None), None)


def where_defined(
    why: list[str | None],
    values: Callable[..., np.ndarray],
    *rows: np.ndarray,
    shape: tuple[int, ...] = (),
) -> np.ndarray:
    """One row of ``shape`` per item: ``values`` of the ``rows`` arrays' rows whose reason in
    ``why`` is None, NaN on the others."""
    ok = np.array([w is None for w in why], dtype=bool)
    out = np.full((len(why), *shape), np.nan)
    if ok.any():
        out[ok] = values(*(r[ok] for r in rows))
    return out


class RegionMetric(Metric):
    """Base of the metrics measured against each target's ground-truth box and/or mask
    (``regions``: any of "box", "mask"); ``box_convention`` says which pixels a box holds
    (module docstring: ``"centre"`` or the official ``"odam"``)."""

    def __init__(
        self, regions: tuple[str, ...] = ("box", "mask"), box_convention: str = "centre"
    ) -> None:
        self.regions = check_region_kinds(tuple(regions))
        self.box_convention = check_box_convention(box_convention)

    def params(self) -> dict[str, object]:
        return {"regions": list(self.regions), "box_convention": self.box_convention}

    def conventions(self) -> dict[str, str]:
        return {"box_convention": self.box_convention} if "box" in self.regions else {}
