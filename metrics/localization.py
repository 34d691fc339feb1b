"""Localisation metrics: pointing game, energy-based pointing game, compactness and VEA.

The functions take many heat maps at once, float (N, H, W) over the original image, finite;
regions are (N, H, W) bool (see ``regions.box_masks``); boxes are xyxy in original pixels.
The registered metrics check every map first and give NaN with a reason where a value is
undefined (non-finite map; constant map for pointing, compactness and VEA; a map that is
negative or sums to zero for the energy metrics; a missing ground truth or mask).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.integrate import trapezoid
from xaibench.metrics.regions import (
    BoxConvention,
    RegionKind,
    RegionMetric,
    check_box_convention,
    check_region_kinds,
    first_reason,
    map_problems,
    target_regions,
    where_defined,
)

from xaibench.detector import Detector
from xaibench.method import ExplanationMethod
from xaibench.metric import Curve, ExplainedBatch, Metric, MetricResult
from xaibench.registry import METRICS

VEA_THRESHOLDS = np.round(np.arange(1, 10) / 10, 1)
"""The thresholds of VEA: 0.1, 0.2, ..., 0.9."""


def peak_positions(maps: np.ndarray) -> np.ndarray:
    """(N, 2) (row, column) of each map's maximum; ties go to the first in row-major order."""
    maps = np.asarray(maps)
    flat = maps.reshape(maps.shape[0], -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=1)


def pointing_game(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where the map's maximum lies in the region, else 0.0."""
    peak = peak_positions(maps)
    rows = np.arange(len(peak))
    return regions[rows, peak[:, 0], peak[:, 1]].astype(np.float64)


def energy_pointing_game(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(N,) sum(H * M) / sum(H): the share of the map's energy inside the region."""
    maps = np.asarray(maps, dtype=np.float64)
    inside = (maps * regions).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return inside / maps.sum(axis=(1, 2))


def compactness(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) sqrt( sum_x H(x) ||x - x_peak||^2 / (((w^2 + h^2) / 4) * sum_x H(x)) ), distances
    in pixels from the map's maximum, (w, h) the size of each box (N, 4) xyxy. Lower is more
    compact: 1 is a spread of half the box diagonal."""
    maps = np.asarray(maps, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = maps.shape[1:]
    peak = peak_positions(maps)
    dy2 = (np.arange(height)[None] - peak[:, :1]) ** 2  # (N, H)
    dx2 = (np.arange(width)[None] - peak[:, 1:]) ** 2  # (N, W)
    weighted = (maps.sum(axis=2) * dy2).sum(axis=1) + (maps.sum(axis=1) * dx2).sum(axis=1)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(weighted / ((w**2 + h**2) / 4 * maps.sum(axis=(1, 2))))


def vea_curve(
    maps: np.ndarray, regions: np.ndarray, thresholds: np.ndarray = VEA_THRESHOLDS
) -> np.ndarray:
    """(N, T) IoU of (min-max normalised map > t) with the region, for each threshold t."""
    maps = np.asarray(maps, dtype=np.float64)
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = (maps - lo) / (hi - lo)
    out = np.zeros((maps.shape[0], len(thresholds)))
    for j, t in enumerate(thresholds):
        above = normalised > t
        inter = (above & regions).sum(axis=(1, 2))
        union = (above | regions).sum(axis=(1, 2))
        out[:, j] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return out


def vea_auc(curve: np.ndarray, thresholds: np.ndarray = VEA_THRESHOLDS) -> np.ndarray:
    """(N,) trapezoid area under the VEA curve over t (0.1 to 0.9: at most 0.8, not rescaled)."""
    return trapezoid(curve, thresholds, axis=1)


def _per_region(
    batch: ExplainedBatch,
    kinds: tuple[RegionKind, ...],
    prefix: str,
    score,
    problems: list[str | None],
    convention: BoxConvention = "centre",
    pointing: bool = False,
) -> MetricResult:
    """Columns ``<prefix>_<kind>`` of ``score(maps, regions)`` with NaN where undefined;
    box regions by ``convention`` (``pointing``: the pointing game's)."""
    values, reasons = {}, {}
    for kind in kinds:
        regions, region_reasons = target_regions(
            batch.instances, batch.gt_index, kind, batch.image_size, convention, pointing
        )
        why = [first_reason(p, r) for p, r in zip(problems, region_reasons, strict=True)]
        values[f"{prefix}_{kind}"] = where_defined(why, score, batch.maps, regions)
        reasons[f"{prefix}_{kind}"] = why
    return MetricResult.build(values, reasons)


@METRICS.register("pointing-game")
class PointingGame(RegionMetric):
    """Pointing game: 1 if the map's maximum lies in the ground-truth box (``pg_box``) or
    mask (``pg_mask``), else 0; higher is better. ``box_convention="centre"``: the peak
    pixel's centre lies in the box, edges included; ``"odam"`` (official script): its indices
    (c, r) satisfy x1 < c < x2 and y1 < r < y2."""

    name = "pointing-game"
    higher_is_better: ClassVar[dict[str, bool]] = {"pg_box": True, "pg_mask": True}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        problems = map_problems(batch.maps, need_peak=True)
        return _per_region(
            batch, self.regions, "pg", pointing_game, problems, self.box_convention, True
        )


@METRICS.register("energy-pg")
class EnergyPointingGame(RegionMetric):
    """Energy-based pointing game: sum(H * M) / sum(H), M the ground-truth box (``epg_box``)
    or mask (``epg_mask``); higher is better. Box pixels by ``box_convention``: ``"centre"``
    (pixel centres inside) or ``"odam"`` (official script: floor(x1)..ceil(x2) - 1, every
    pixel the box touches)."""

    name = "energy-pg"
    higher_is_better: ClassVar[dict[str, bool]] = {"epg_box": True, "epg_mask": True}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        problems = map_problems(batch.maps, need_energy=True)
        return _per_region(
            batch, self.regions, "epg", energy_pointing_game, problems, self.box_convention
        )


@METRICS.register("compactness")
class Compactness(Metric):
    """Heat-map compactness around its maximum, relative to the ground-truth box size
    (column ``compactness``); lower is better."""

    name = "compactness"
    higher_is_better: ClassVar[dict[str, bool]] = {"compactness": False}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        problems = map_problems(batch.maps, need_peak=True, need_energy=True)
        boxes = batch.gt_boxes
        why = [
            first_reason(p, "no matched ground-truth instance" if g < 0 else None)
            for p, g in zip(problems, batch.gt_index, strict=True)
        ]
        column = where_defined(why, compactness, batch.maps, boxes)
        return MetricResult.build({"compactness": column}, {"compactness": why})


@METRICS.register("vea")
class VisualExplanationAccuracy(Metric):
    """VEA: IoU of the min-max normalised map thresholded at t = 0.1..0.9 with the
    ground-truth mask (``region="box"``: the box); column ``vea`` is the curve's trapezoid
    area over t (not rescaled, at most 0.8), curve ``vea`` the IoUs; higher is better.
    ``box_convention`` (``"centre"`` or ``"odam"``, see ``regions``) rasterises the box of
    ``region="box"``."""

    name = "vea"
    higher_is_better: ClassVar[dict[str, bool]] = {"vea": True}

    def __init__(self, region: str = "mask", box_convention: str = "centre") -> None:
        (self.region,) = check_region_kinds((region,))
        self.box_convention = check_box_convention(box_convention)

    def params(self) -> dict[str, object]:
        return {"region": self.region, "box_convention": self.box_convention}

    def conventions(self) -> dict[str, str]:
        return {"box_convention": self.box_convention} if self.region == "box" else {}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        problems = map_problems(batch.maps, need_peak=True)
        regions, region_reasons = target_regions(
            batch.instances, batch.gt_index, self.region, batch.image_size, self.box_convention
        )
        why = [first_reason(p, r) for p, r in zip(problems, region_reasons, strict=True)]
        curve = where_defined(why, vea_curve, batch.maps, regions, shape=(len(VEA_THRESHOLDS),))
        return MetricResult.build(
            {"vea": vea_auc(curve)},
            {"vea": why},
            {"vea": Curve(VEA_THRESHOLDS, curve, "threshold t", "IoU(map > t, GT)")},
        )
