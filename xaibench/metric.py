"""The interface of a metric: what it receives (the heat maps of several explained predictions
of one image, with the image's ground truth) and what it returns (values per prediction, the
reason wherever a value is NaN, and curves for plots).

Metrics that need the model get the detector, and those that re-explain (sanity checks) get
the explanation method too. Heat maps are float32 (N, H, W) over the original image; boxes are
xyxy in original-image pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from xaibench.detector import Detector
from xaibench.method import ExplanationMethod
from xaibench.types import Detections, Instance, Target


@dataclass
class ExplainedBatch:
    """Heat maps of N targets of one image and what metrics need to score them.

    ``maps`` (N, H, W) float32, one per target; ``targets`` index ``detections`` (the
    image's detections, boxes xyxy in original pixels); ``instances`` are the image's ground
    truth and ``gt_index`` (N,) says which instance each target explains (-1: none).
    """

    image: np.ndarray
    maps: np.ndarray
    targets: Sequence[Target]
    detections: Detections
    instances: Sequence[Instance]
    gt_index: np.ndarray

    def __post_init__(self) -> None:
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.gt_index = np.asarray(self.gt_index, dtype=np.int64).reshape(-1)
        if self.maps.ndim != 3:
            raise ValueError(f"ExplainedBatch.maps must be (N, H, W), got {self.maps.shape}")
        n, h, w = self.maps.shape
        if self.image.shape[:2] != (h, w):
            raise ValueError(
                f"ExplainedBatch.maps are {h}x{w} but the image is "
                f"{self.image.shape[0]}x{self.image.shape[1]} (H x W)"
            )
        if len(self.targets) != n or len(self.gt_index) != n:
            raise ValueError(
                f"ExplainedBatch has {n} maps, {len(self.targets)} targets and "
                f"{len(self.gt_index)} gt_index entries; expected one of each per map"
            )
        bad = [int(g) for g in self.gt_index if not -1 <= g < len(self.instances)]
        if bad:
            raise ValueError(
                f"ExplainedBatch.gt_index {bad} out of range for {len(self.instances)} instances"
            )

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.maps.shape[1]), int(self.maps.shape[2])

    @property
    def gt_boxes(self) -> np.ndarray:
        """(N, 4) ground-truth box of each target (xyxy, original pixels); NaN where none."""
        out = np.full((len(self), 4), np.nan)
        for row, g in enumerate(self.gt_index):
            if g >= 0:
                out[row] = self.instances[g].box
        return out

    @property
    def detection_index(self) -> np.ndarray:
        return np.array([t.index for t in self.targets], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """(N,) predicted label of each target."""
        return self.detections.labels.cpu().numpy()[self.detection_index]

    @property
    def reference_boxes(self) -> np.ndarray:
        """(N, 4) the box each target's output is compared with: its ground-truth box where
        it has one, else its predicted box."""
        boxes = self.gt_boxes
        predicted = self.detections.boxes.cpu().numpy()[self.detection_index]
        missing = np.isnan(boxes).any(axis=1)
        boxes[missing] = predicted[missing]
        return boxes


@dataclass
class Curve:
    """A curve per row: ``x`` (P,) shared, ``y`` (N, P); ``x_label``/``y_label`` and the tick
    names ``x_names`` (P,) where x is categorical (e.g. layers) are for plots."""

    x: np.ndarray
    y: np.ndarray
    x_label: str = "x"
    y_label: str = "y"
    x_names: list[str] | None = None


@dataclass
class MetricResult:
    """Values of one metric for N rows.

    ``values``: column name -> (N,) float, NaN where undefined; ``reasons``: the same columns
    -> (N,) the reason of each NaN (None where the value is defined); ``curves``: name ->
    ``Curve`` (for plots).
    """

    values: dict[str, np.ndarray]
    reasons: dict[str, np.ndarray]
    curves: dict[str, Curve] = field(default_factory=dict)

    @staticmethod
    def build(
        values: Mapping[str, np.ndarray],
        reasons: Mapping[str, Sequence[str | None]] | None = None,
        curves: Mapping[str, Curve] | None = None,
    ) -> MetricResult:
        """Check shapes; NaN values without a given reason get "undefined"."""
        out_values = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in values.items()}
        sizes = {len(v) for v in out_values.values()}
        if len(sizes) > 1:
            raise ValueError(f"metric columns differ in length: {sizes}")
        out_reasons = {}
        for key, column in out_values.items():
            given = (reasons or {}).get(key)
            r = np.empty(len(column), dtype=object)
            r[:] = list(given) if given is not None else [None] * len(column)
            missing = np.array([x is None for x in r], dtype=bool)
            r[~np.isnan(column)] = None
            r[np.isnan(column) & missing] = "undefined"
            out_reasons[key] = r
        return MetricResult(out_values, out_reasons, dict(curves or {}))

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def reason(self, row: int) -> str:
        """The reasons of row ``row``'s NaN values, as "column, column: reason; ..." ("" if
        none)."""
        columns: dict[str, list[str]] = {}
        for key, reasons in self.reasons.items():
            if reasons[row] is not None:
                columns.setdefault(str(reasons[row]), []).append(key)
        return "; ".join(f"{', '.join(keys)}: {why}" for why, keys in columns.items())


def format_conventions(*parts: Mapping[str, str]) -> str:
    """``key=value`` pairs of conventions, sorted and joined by ``;`` ("" when there are
    none): the ``convention`` of stored result rows."""
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return ";".join(f"{k}={merged[k]}" for k in sorted(merged))


MetricNeeds = Literal["map", "model", "method"]


class Metric(ABC):
    """Scores explanations. ``needs``: ``"map"`` (heat maps and ground truth only),
    ``"model"`` (also the detector) or ``"method"`` (also the explanation method).
    ``higher_is_better`` maps each column to its direction (for tables). ``scope``:
    ``"explanation"`` (scores the maps of a method) or ``"detector"`` (measures the detector
    whatever the method, e.g. feature drift: runners call it once per image, method None)."""

    name: ClassVar[str] = "metric"
    needs: ClassVar[MetricNeeds] = "map"
    scope: ClassVar[Literal["explanation", "detector"]] = "explanation"
    higher_is_better: ClassVar[dict[str, bool]] = {}

    @abstractmethod
    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        """Values for every row of ``batch``."""

    def params(self) -> dict[str, object]:
        """The settings recorded with the results."""
        return {}

    def conventions(self) -> dict[str, str]:
        """The settings among ``params()`` that choose between published conventions (e.g.
        xaibench's or the official ODAM scripts'), so that numbers of different choices are
        not comparable; stored with every result row (``format_conventions``). None by
        default."""
        return {}

    def notes(self, instances: pd.DataFrame) -> list[str]:
        """One-line conclusions from the stored per-instance rows of this metric's columns
        (e.g. a verdict per detector), for reports; none by default."""
        return []

    def _require(self, detector: Detector | None, method: ExplanationMethod | None) -> None:
        if self.needs in ("model", "method") and detector is None:
            raise ValueError(f"metric {self.name!r} needs the detector (detector=...)")
        if self.needs == "method" and method is None:
            raise ValueError(f"metric {self.name!r} needs the explanation method (method=...)")
