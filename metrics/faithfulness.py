"""Faithfulness: deletion and insertion curves (the official ODAM evaluation by default).

Pixels are ranked by the heat map (highest first; ties in row-major order). ``odam``
protocol: 100 steps of max(1, floor(box area / 100)) pixels each, box = the target's
ground-truth box (its predicted box when it has none), area in pixels. Deletion replaces the
ranked pixels by uniform noise (one noise image per call: ``np.random.default_rng(seed)
.integers(0, 256, image.shape, dtype=np.uint8)``); insertion starts from a black image and
copies the original pixels in. The detector runs every 10 steps (11 points including step 0)
on all perturbed images of all targets, in batches (``batch_size`` images per forward pass).

Score at a point = max over the raw predictions (before NMS) of score * [same class as the
target] * [IoU(prediction box, reference box) > 0.5]. The deletion curve is divided by its
step-0 score (the unperturbed image); AUC = trapezoid over x = step / steps in [0, 1], x 100
(deletion: lower is better; insertion: higher is better).

``whole-image`` protocol (RISE-style): the steps cover all H * W pixels (ceil(H * W / steps)
pixels each) and deletion replaces pixels by black (the zero baseline).

Insertion's step-0 score (``start``): ``"detector"`` (default) runs the detector on the black
image, so a detector that scores black above zero raises the whole curve's start;
``"zero"`` (the official ``eval_insert``) sets it to 0 without running the detector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from scipy.integrate import trapezoid
from torchvision.ops import box_iou
from xaibench.metrics.regions import first_reason, map_problems

from xaibench.detector import Detector
from xaibench.method import ExplanationMethod
from xaibench.metric import Curve, ExplainedBatch, Metric, MetricResult
from xaibench.registry import METRICS
from xaibench.types import Detections

Mode = Literal["deletion", "insertion"]
Protocol = Literal["odam", "whole-image"]
PROTOCOLS: tuple[str, ...] = ("odam", "whole-image")
Start = Literal["detector", "zero"]
STARTS: tuple[str, ...] = ("detector", "zero")


def pixel_ranking(heat: np.ndarray) -> np.ndarray:
    """Flat pixel indices (H * W,) by descending heat; ties keep row-major order."""
    return np.argsort(-np.asarray(heat, dtype=np.float64).ravel(), kind="stable")


def pixels_per_step(
    box: np.ndarray, image_size: tuple[int, int], protocol: Protocol, steps: int
) -> int:
    """Pixels perturbed per step: max(1, floor(box area / steps)) for ``odam`` (box xyxy in
    pixels), ceil(H * W / steps) for ``whole-image``."""
    if protocol == "odam":
        area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
        return max(1, math.floor(area / steps))
    if protocol == "whole-image":
        return math.ceil(image_size[0] * image_size[1] / steps)
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def target_score(
    detections: Detections, box: np.ndarray, label: int, iou_thresh: float = 0.5
) -> float:
    """max over ``detections`` of score * [label matches] * [IoU(box_j, box) > iou_thresh];
    0 when no prediction qualifies."""
    if len(detections) == 0:
        return 0.0
    iou = box_iou(detections.boxes.float().cpu(), torch.as_tensor(box, dtype=torch.float32)[None])
    ok = (detections.labels.cpu() == int(label)) & (iou[:, 0] > iou_thresh)
    return float((detections.scores.float().cpu() * ok).max())


class PerturbationCurves:
    """Deletion and insertion scores for many heat maps of one image, sharing forward passes.

    ``scores(detector, image, maps, boxes, labels, modes)`` returns, per mode, the raw target
    scores (N, P) at steps 0, eval_every, ..., steps (P points); the images of step 0 (and of
    the last step when it covers the whole image) are the same for every map and run once.
    ``zero_start`` sets step 0 to 0 instead (no detector run; the official insertion).
    """

    def __init__(
        self,
        protocol: Protocol = "odam",
        steps: int = 100,
        eval_every: int = 10,
        iou_thresh: float = 0.5,
        seed: int = 0,
        batch_size: int = 16,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
        if steps < 1 or eval_every < 1 or steps % eval_every:
            raise ValueError(
                f"steps ({steps}) and eval_every ({eval_every}) must be >= 1 and eval_every "
                "must divide steps"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.protocol: Protocol = protocol
        self.steps = steps
        self.eval_every = eval_every
        self.iou_thresh = iou_thresh
        self.seed = seed
        self.batch_size = batch_size

    @property
    def x(self) -> np.ndarray:
        """(P,) the curve's x: fraction of the steps done."""
        return np.arange(0, self.steps + 1, self.eval_every) / self.steps

    def params(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "steps": self.steps,
            "eval_every": self.eval_every,
            "iou_thresh": self.iou_thresh,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def sources(self, image: np.ndarray, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
        """(start image, image the ranked pixels are copied from) of ``mode``."""
        if mode == "insertion":
            return np.zeros_like(image), image
        if mode != "deletion":
            raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
        if self.protocol == "whole-image":
            return image, np.zeros_like(image)
        rng = np.random.default_rng(self.seed)
        return image, rng.integers(0, 256, image.shape, dtype=np.uint8)

    def counts(self, box: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """(P,) pixels perturbed at each evaluated step (at most H * W)."""
        per_step = pixels_per_step(box, image_size, self.protocol, self.steps)
        steps = np.arange(0, self.steps + 1, self.eval_every)
        return np.minimum(steps * per_step, image_size[0] * image_size[1])

    def scores(
        self,
        detector: Detector,
        image: np.ndarray,
        maps: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        modes: Sequence[Mode] = ("deletion", "insertion"),
        zero_start: bool = False,
    ) -> dict[str, np.ndarray]:
        """Raw target scores (N, P) per mode; maps (N, H, W), reference boxes (N, 4) xyxy,
        labels (N,). ``zero_start``: step 0 scores 0 (the detector does not run on it)."""
        size = (int(image.shape[0]), int(image.shape[1]))
        total = size[0] * size[1]
        rankings = [pixel_ranking(m) for m in maps]
        sources = {mode: self.sources(image, mode) for mode in modes}
        # one job per distinct perturbed image: (mode, row or -1 when shared, pixel count)
        jobs: dict[tuple[str, int, int], int] = {}
        where: dict[str, np.ndarray] = {}
        for mode in modes:
            table = np.zeros((len(maps), len(self.x)), dtype=np.int64)
            for row, box in enumerate(boxes):
                for p, count in enumerate(self.counts(box, size)):
                    if zero_start and p == 0:
                        table[row, p] = -1
                        continue
                    shared = count == 0 or count == total
                    key = (mode, -1 if shared else row, int(count))
                    table[row, p] = jobs.setdefault(key, len(jobs))
            where[mode] = table
        keys = list(jobs)
        raw: list[Detections] = []
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            images = []
            for mode, row, count in chunk:
                base, source = sources[mode]
                out = base.copy()
                pick = rankings[row][:count] if row >= 0 else np.arange(count)
                out.reshape(-1, out.shape[-1])[pick] = source.reshape(-1, source.shape[-1])[pick]
                images.append(out)
            batch = detector.batch_limit(self.batch_size)
            raw.extend(detector.detect(images, batch_size=batch, nms=False))
        out_scores = {}
        for mode in modes:
            table = where[mode]
            values = np.zeros(table.shape)
            for row in range(table.shape[0]):
                for p in range(table.shape[1]):
                    if table[row, p] < 0:
                        continue  # a zero start
                    det = raw[table[row, p]]
                    values[row, p] = target_score(det, boxes[row], labels[row], self.iou_thresh)
            out_scores[mode] = values
        return out_scores


class _PerturbationMetric(Metric):
    """Deletion or insertion as a registered metric (column and curve named after it);
    ``zero_start``: step 0 scores 0 without a detector run."""

    mode: ClassVar[Mode]
    needs = "model"
    zero_start = False

    def __init__(
        self,
        protocol: Protocol = "odam",
        steps: int = 100,
        eval_every: int = 10,
        iou_thresh: float = 0.5,
        seed: int = 0,
        batch_size: int = 16,
        normalise: bool | None = None,
    ) -> None:
        self.curves = PerturbationCurves(protocol, steps, eval_every, iou_thresh, seed, batch_size)
        self.normalise = self.mode == "deletion" if normalise is None else normalise

    def params(self) -> dict[str, object]:
        return {**self.curves.params(), "normalise": self.normalise}

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        self._require(detector, method)
        assert detector is not None
        problems = map_problems(batch.maps, need_peak=True)
        ok = np.array([p is None for p in problems], dtype=bool)
        x = self.curves.x
        curve = np.full((len(batch), len(x)), np.nan)
        why: list[str | None] = list(problems)
        if ok.any():
            scores = self.curves.scores(
                detector,
                batch.image,
                batch.maps[ok],
                batch.reference_boxes[ok],
                batch.labels[ok],
                (self.mode,),
                self.zero_start,
            )[self.mode]
            if self.normalise:
                start = scores[:, :1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    scores = np.where(start > 0, scores / start, np.nan)
            curve[ok] = scores
            for row in np.where(ok & np.isnan(curve).any(axis=1))[0]:
                why[row] = first_reason(
                    why[row], "target not detected on the unperturbed image (score 0)"
                )
        auc = trapezoid(curve, x, axis=1) * 100
        label = "score / score at step 0" if self.normalise else "score"
        return MetricResult.build(
            {self.mode: auc},
            {self.mode: why},
            {self.mode: Curve(x, curve, f"fraction of {self.mode} steps", label)},
        )


@METRICS.register("deletion")
class Deletion(_PerturbationMetric):
    """Deletion AUC x 100 (column and curve ``deletion``); lower is better. Options: see
    the module docstring (``protocol="whole-image"`` for the RISE-style variant)."""

    name = "deletion"
    mode = "deletion"
    higher_is_better: ClassVar[dict[str, bool]] = {"deletion": False}


@METRICS.register("insertion")
class Insertion(_PerturbationMetric):
    """Insertion AUC x 100 (column and curve ``insertion``); higher is better. The curve is
    the raw score (``normalise=True`` divides it by the step-0 score). ``start``: the step-0
    score is the detector's on the black image (``"detector"``) or 0 (``"zero"``, the
    official ``eval_insert``; it cannot be combined with ``normalise=True``)."""

    name = "insertion"
    mode = "insertion"
    higher_is_better: ClassVar[dict[str, bool]] = {"insertion": True}

    def __init__(self, *args: Any, start: str = "detector", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
        if start == "zero" and self.normalise:
            raise ValueError(
                "start='zero' makes the step-0 score 0, so normalise=True (dividing by it) "
                "is undefined; use one or the other"
            )
        self.start: Start = start  # type: ignore[assignment]
        self.zero_start = start == "zero"

    def params(self) -> dict[str, object]:
        return {**super().params(), "start": self.start}

    def conventions(self) -> dict[str, str]:
        return {"insertion_start": self.start}
