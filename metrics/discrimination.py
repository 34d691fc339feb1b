"""Object discrimination index (ODI, Zhao & Chan, ICLR 2023, Sec. 4.2).

ODI = sum(H * [union of the other GT objects]) / sum(H * [union of all GT objects]): the share
of the map's energy inside objects that leaks to objects other than the explained one. A pixel
in both the target and another object counts as "other"; crowd (ignore) instances take no
part. Lower is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from xaibench.metrics.regions import (
    BoxConvention,
    RegionKind,
    RegionMetric,
    first_reason,
    instance_region,
    map_problems,
)

from xaibench.detector import Detector
from xaibench.method import ExplanationMethod
from xaibench.metric import ExplainedBatch, MetricResult
from xaibench.registry import METRICS
from xaibench.types import Instance


def object_discrimination_index(
    maps: np.ndarray, object_regions: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """(N,) ODI of maps (N, H, W) given the K objects' regions (K, H, W) bool and the index of
    each map's own object ``target`` (N,) into them. NaN where no energy falls in any object."""
    maps = np.asarray(maps, dtype=np.float64)
    count = object_regions.sum(axis=0, dtype=np.int64)  # objects covering each pixel
    inside_any = count > 0
    own = object_regions[target]  # (N, H, W)
    other = (count[None] - own) > 0
    total = (maps * inside_any[None]).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (maps * other).sum(axis=(1, 2)) / total, np.nan)


def _objects(
    instances: Sequence[Instance],
    kind: RegionKind,
    size: tuple[int, int],
    convention: BoxConvention = "centre",
) -> tuple[list[int], np.ndarray]:
    """Indices of the non-crowd instances and their regions (K, H, W), boxes rasterised by
    ``convention``."""
    keep = [i for i, inst in enumerate(instances) if not inst.ignore]
    regions = np.zeros((len(keep), *size), dtype=bool)
    for row, i in enumerate(keep):
        regions[row] = instance_region(instances[i], kind, size, convention)
    return keep, regions


@METRICS.register("odi")
class ObjectDiscrimination(RegionMetric):
    """ODI with ground-truth boxes (``odi_box``) or masks (``odi_mask``); lower is better.
    The mask variant needs every non-crowd instance of the image to have a mask. Box pixels
    by ``box_convention``: ``"centre"`` (pixel centres inside) or ``"odam"`` (official
    script: every pixel a box touches)."""

    name = "odi"
    higher_is_better: ClassVar[dict[str, bool]] = {"odi_box": False, "odi_mask": False}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        problems = map_problems(batch.maps, need_energy=True)
        values, reasons = {}, {}
        for kind in self.regions:
            keep, regions = _objects(batch.instances, kind, batch.image_size, self.box_convention)
            missing_mask = kind == "mask" and any(batch.instances[i].mask is None for i in keep)
            why: list[str | None] = []
            for problem, g in zip(problems, batch.gt_index, strict=True):
                if g < 0:
                    gt_reason = "no matched ground-truth instance"
                elif batch.instances[g].ignore:
                    gt_reason = "the matched instance is a crowd region"
                elif missing_mask:
                    gt_reason = "an instance of the image has no mask"
                else:
                    gt_reason = None
                why.append(first_reason(problem, gt_reason))
            ok = np.array([w is None for w in why], dtype=bool)
            column = np.full(len(batch), np.nan)
            if ok.any():
                target = np.array([keep.index(int(g)) for g in batch.gt_index[ok]])
                column[ok] = object_discrimination_index(batch.maps[ok], regions, target)
                for row in np.where(ok & np.isnan(column))[0]:
                    why[row] = "no heat-map energy inside any ground-truth object"
            values[f"odi_{kind}"] = column
            reasons[f"odi_{kind}"] = why
        return MetricResult.build(values, reasons)
