"""Feature drift: does a detector move object evidence inside the network?

Following the feature-drift study (github.com/negvet/feature_drift), the same black-box method
(D-RISE) explains each detection twice: masking the input image (input space) and masking a
feature layer then re-running the rest of the network (feature space). Per detection:

- ``drift_shift``: the displacement of the feature-space saliency centroid from the
  input-space one, in box sizes: || ((cx_f - cx_i) / w, (cy_f - cy_i) / h) ||;
- ``drift_to_centre``: how much closer to the box centre the centroid moved, in box sizes
  (positive: towards the centre);
- ``drift_centre_energy``: the change (feature minus input) of the share of the map's energy
  inside the box that lies in its central part (the box shrunk to ``central_fraction`` of its
  width and height around its centre); positive: evidence concentrated towards the centre.

Before the centroid and energies, each map loses its background level: H' = max(H - q, 0),
q = the map's ``background_quantile`` quantile over the image (D-RISE maps carry a positive
offset everywhere). Centroids are over the whole image, pixel centres; boxes xyxy in
original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats
from xaibench.metrics.regions import box_masks, first_reason, map_problems

from xaibench.detector import Detector
from xaibench.explain import select_detections
from xaibench.method import ExplanationMethod
from xaibench.metric import ExplainedBatch, Metric, MetricResult
from xaibench.registry import METHODS, METRICS
from xaibench.types import Target

DRIFT_COLUMNS: tuple[str, ...] = ("drift_shift", "drift_to_centre", "drift_centre_energy")


def foreground(maps: np.ndarray, background_quantile: float = 0.5) -> np.ndarray:
    """Maps (N, H, W) minus their ``background_quantile`` quantile, clipped at 0."""
    maps = np.asarray(maps, dtype=np.float64)
    level = np.quantile(maps.reshape(len(maps), -1), background_quantile, axis=1)
    return np.maximum(maps - level[:, None, None], 0.0)


def centroids(maps: np.ndarray) -> np.ndarray:
    """(N, 2) saliency-weighted mean position (x, y) in pixels (pixel centres) of maps
    (N, H, W) with positive sums."""
    maps = np.asarray(maps, dtype=np.float64)
    h, w = maps.shape[1:]
    total = maps.sum(axis=(1, 2))
    cx = (maps.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / total
    cy = (maps.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / total
    return np.stack([cx, cy], axis=1)


def central_boxes(boxes: np.ndarray, central_fraction: float) -> np.ndarray:
    """The boxes (N, 4) xyxy shrunk to ``central_fraction`` of their size about the centre."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * central_fraction / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def central_energy(maps: np.ndarray, boxes: np.ndarray, central_fraction: float) -> np.ndarray:
    """(N,) share of each map's energy inside its box that lies in the box's central part;
    NaN where the box holds no energy."""
    size = maps.shape[1:]
    in_box = (maps * box_masks(boxes, size)).sum(axis=(1, 2))
    centre = (maps * box_masks(central_boxes(boxes, central_fraction), size)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(in_box > 0, centre / in_box, np.nan)


def drift_measures(
    input_maps: np.ndarray,
    feature_maps: np.ndarray,
    boxes: np.ndarray,
    central_fraction: float = 0.5,
    background_quantile: float = 0.5,
) -> dict[str, np.ndarray]:
    """``drift_shift``, ``drift_to_centre`` and ``drift_centre_energy`` (module docstring) of
    input-space and feature-space maps (N, H, W) of detections with boxes (N, 4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    fg_in = foreground(input_maps, background_quantile)
    fg_feat = foreground(feature_maps, background_quantile)
    size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1e-6)  # (w, h)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        c_in, c_feat = centroids(fg_in), centroids(fg_feat)
        shift = np.linalg.norm((c_feat - c_in) / size, axis=1)
        to_centre = np.linalg.norm((c_in - centre) / size, axis=1) - np.linalg.norm(
            (c_feat - centre) / size, axis=1
        )
    energy = central_energy(fg_feat, boxes, central_fraction) - central_energy(
        fg_in, boxes, central_fraction
    )
    return {"drift_shift": shift, "drift_to_centre": to_centre, "drift_centre_energy": energy}


@dataclass
class DriftSummary:
    """Per-detector summary: mean and 95% CI half-width of each measure over detections,
    their count, and a one-line verdict."""

    detector: str
    count: int
    mean: dict[str, float]
    ci95: dict[str, float]
    verdict: str


def summarise_drift(
    detector: str,
    measures: dict[str, np.ndarray],
    shift_thresh: float = 0.1,
    energy_thresh: float = 0.05,
) -> DriftSummary:
    """Mean, 95% CI (t interval) and verdict: evidence moves towards object centres when the
    mean centre-energy change exceeds ``energy_thresh`` and the mean shift ``shift_thresh``
    box sizes, with the centroid moving towards the centre on average."""
    mean, ci = {}, {}
    count = 0
    for key in DRIFT_COLUMNS:
        values = np.asarray(measures.get(key, []), dtype=np.float64)
        values = values[np.isfinite(values)]
        count = max(count, len(values))
        mean[key] = float(values.mean()) if len(values) else float("nan")
        ci[key] = (
            float(stats.sem(values) * stats.t.ppf(0.975, len(values) - 1))
            if len(values) > 1
            else float("nan")
        )
    numbers = (
        f"shift {mean['drift_shift']:.2f} box sizes, centre energy "
        f"{mean['drift_centre_energy']:+.2f}, n={count}"
    )
    if count == 0:
        verdict = f"{detector}: no detection could be measured"
    elif (
        mean["drift_centre_energy"] > energy_thresh
        and mean["drift_shift"] > shift_thresh
        and mean["drift_to_centre"] > 0
    ):
        verdict = (
            f"{detector}: moves evidence towards object centres in its features ({numbers}); "
            "activation-based explanations of these layers are spatially unreliable"
        )
    else:
        verdict = f"{detector}: keeps evidence in place in its features ({numbers})"
    return DriftSummary(detector, count, mean, ci, verdict)


@METRICS.register("feature-drift")
class FeatureDrift(Metric):
    """Feature drift of each explained detection (module docstring), whatever the explanation
    method: ``input_method`` (D-RISE) explains each target in input space and
    ``feature_method`` (feature-space D-RISE) on feature ``layer``, both with ``params``
    (e.g. ``n``, ``grid``, ``p``, ``seed``: the same masks in both spaces). Columns
    ``drift_shift``, ``drift_to_centre``, ``drift_centre_energy``; lower is better."""

    name = "feature-drift"
    needs = "model"
    scope = "detector"
    higher_is_better: ClassVar[dict[str, bool]] = dict.fromkeys(DRIFT_COLUMNS, False)

    def __init__(
        self,
        input_method: str = "drise",
        feature_method: str = "drise-feature",
        layer: str = "fpn",
        params: dict[str, Any] | None = None,
        central_fraction: float = 0.5,
        background_quantile: float = 0.5,
    ) -> None:
        if not 0 < central_fraction < 1:
            raise ValueError(f"central_fraction must be in (0, 1), got {central_fraction}")
        if not 0 <= background_quantile < 1:
            raise ValueError(f"background_quantile must be in [0, 1), got {background_quantile}")
        self.input_method = input_method
        self.feature_method = feature_method
        self.layer = layer
        self.method_params = {"progress": False, **(params or {})}
        self.central_fraction = central_fraction
        self.background_quantile = background_quantile

    def params(self) -> dict[str, object]:
        return {
            "input_method": self.input_method,
            "feature_method": self.feature_method,
            "layer": self.layer,
            "params": self.method_params,
            "central_fraction": self.central_fraction,
            "background_quantile": self.background_quantile,
        }

    def notes(self, instances: pd.DataFrame) -> list[str]:
        """The verdict of each detector in ``instances`` (rows holding drift columns)."""
        if not set(DRIFT_COLUMNS) <= set(instances.columns):
            return []
        rows = instances.dropna(subset=list(DRIFT_COLUMNS), how="all")
        return [
            summarise_drift(
                str(detector),
                {c: pd.to_numeric(g[c], errors="coerce").to_numpy() for c in DRIFT_COLUMNS},
            ).verdict
            for detector, g in rows.groupby("detector", sort=False)
        ]

    def explain_both(
        self, detector: Detector, image: np.ndarray, targets: Sequence[Target]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Input-space and feature-space maps (N, H, W) of ``targets`` (indices into the
        detections of ``detector.trace(image)``)."""
        in_input = METHODS.build(self.input_method, **self.method_params)
        in_features = METHODS.build(self.feature_method, layer=self.layer, **self.method_params)
        a = [s.map for s in in_input.explain(detector, image, targets, trace=detector.trace(image))]
        b = [
            s.map
            for s in in_features.explain(detector, image, targets, trace=detector.trace(image))
        ]
        return np.stack(a), np.stack(b)

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        self._require(detector, method)
        assert detector is not None
        if len(batch) == 0:
            return MetricResult.build({k: np.zeros(0) for k in DRIFT_COLUMNS})
        input_maps, feature_maps = self.explain_both(detector, batch.image, batch.targets)
        boxes = batch.detections.boxes.cpu().numpy()[batch.detection_index]
        return drift_result(
            input_maps, feature_maps, boxes, self.central_fraction, self.background_quantile
        )


def drift_result(
    input_maps: np.ndarray,
    feature_maps: np.ndarray,
    boxes: np.ndarray,
    central_fraction: float = 0.5,
    background_quantile: float = 0.5,
) -> MetricResult:
    """``drift_measures`` with NaN and a reason where a map has nothing to measure."""
    problems_in = map_problems(input_maps, need_peak=True)
    problems_feat = map_problems(feature_maps, need_peak=True)
    why = [
        first_reason(a and f"input-space {a}", b and f"feature-space {b}")
        for a, b in zip(problems_in, problems_feat, strict=True)
    ]
    ok = np.array([w is None for w in why], dtype=bool)
    values = {k: np.full(len(boxes), np.nan) for k in DRIFT_COLUMNS}
    if ok.any():
        measured = drift_measures(
            input_maps[ok], feature_maps[ok], boxes[ok], central_fraction, background_quantile
        )
        for k in DRIFT_COLUMNS:
            values[k][ok] = measured[k]
    reasons = {
        k: [
            w or (None if np.isfinite(v) else "no saliency energy in the box")
            for w, v in zip(why, values[k], strict=True)
        ]
        for k in DRIFT_COLUMNS
    }
    return MetricResult.build(values, reasons)


def drift_report(
    detector: Detector,
    images: Sequence[np.ndarray],
    top_k: int = 3,
    score_thresh: float = 0.3,
    metric: FeatureDrift | None = None,
) -> tuple[pd.DataFrame, DriftSummary]:
    """Feature drift of one detector: the ``top_k`` detections scoring above
    ``score_thresh`` in each image (uint8 RGB), one row each, and the summary with its
    verdict. ``metric`` sets the D-RISE settings (default ``FeatureDrift()``)."""
    metric = metric if metric is not None else FeatureDrift()
    rows = []
    for i, image in enumerate(images):
        detections = detector.trace(image).detections
        chosen = select_detections(detections, top_k=top_k, score_thresh=score_thresh)
        if not chosen:
            continue
        targets = [Target(j) for j in chosen]
        empty = np.zeros((len(targets), *image.shape[:2]), np.float32)  # maps are not used
        batch = ExplainedBatch(image, empty, targets, detections, [], np.full(len(targets), -1))
        result = metric.compute(batch, detector)
        for r, j in enumerate(chosen):
            row = {"image": i, "detection": j, "score": float(detections.scores[j])}
            row |= {k: float(result.values[k][r]) for k in DRIFT_COLUMNS}
            rows.append(row | {"reason": result.reason(r)})
    frame = pd.DataFrame(rows, columns=["image", "detection", "score", *DRIFT_COLUMNS, "reason"])
    summary = summarise_drift(detector.name, {k: frame[k].to_numpy() for k in DRIFT_COLUMNS})
    return frame, summary
