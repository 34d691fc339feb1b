"""Crowd detection metrics as in the CrowdDet evaluation: AP50, MR^-2, JI, recall crowd/sparse.

Three explicit stages whose results can be inspected:

1. **match** (``match_records``): per image, boxes clipped to the image as CrowdDet does
   (x1 to [0, W - 1], x2 to [0, W], likewise y), detections greedy by score against the
   non-ignored GTs (IoU > 0.5, each GT once); an unmatched detection whose IoA (intersection
   over the detection's area) with an ignore GT is > 0.5 is dropped, else it is a false
   positive. Per-detection and per-GT records (pandas frames).
2. **accumulate** (``accumulate``): all kept detections of all images by descending score,
   cumulative TP/FP, recall (denominator: the non-ignored GTs), precision, FPPI, miss rate.
3. **summarise** (``average_precision``, ``log_average_miss_rate``): AP50 = trapezoid area of
   the raw precision-recall points (no interpolation; as in CrowdDet, from the first point, not
   from recall 0), MR^-2 = exp(mean(log miss rate)) at the first point with FPPI >= each of the
   nine references 10^-2..10^0 (the last point where none reaches it).

JI (``jaccard_index``): for score thresholds 0.0..0.9 (detections with score > t), per image a
maximum-weight bipartite matching (weights = IoU, edges IoU > 0.5, scipy's
``linear_sum_assignment``); unmatched detections and unmatched GTs with IoA > 0.5 on an ignore
GT are removed; JI_img = k / (m + n - k); the mean over images where m + n > 0.

Recall split (paper Table 7): a non-ignored GT is "crowd" if its IoU with another non-ignored
GT of its image is > 0.5, else "sparse"; recall = matched share in stage 1 (all detections, or
those above ``score_threshold``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from xaibench.datasets.crowdhuman import CrowdRecord

IOU_THRESHOLD = 0.5
FPPI_REFERENCES: tuple[float, ...] = (
    0.01,
    0.0178,
    0.0316,
    0.0562,
    0.1,
    0.1778,
    0.3162,
    0.5623,
    1.0,
)
JI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))
_EPS = 1e-6  # CrowdDet's denominator guard in IoU / IoA

TP, FP, IGNORED = 1, 0, -1
"""Status of a detection after matching."""


# ---------------------------------------------------------------------------------------------
# Geometry, as CrowdDet computes it


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """CrowdDet's ``clip_all_boader``: x1 in [0, W - 1], y1 in [0, H - 1], x2 in [0, W],
    y2 in [0, H] (boxes (N, 4) xyxy, pixels); a copy."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 0] = np.minimum(np.maximum(out[:, 0], 0), width - 1)
    out[:, 1] = np.minimum(np.maximum(out[:, 1], 0), height - 1)
    out[:, 2] = np.maximum(np.minimum(out[:, 2], width), 0)
    out[:, 3] = np.maximum(np.minimum(out[:, 3], height), 0)
    return out


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.maximum(iw, 0) * np.maximum(ih, 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, K) IoU of boxes (N, 4) and (K, 4), xyxy."""
    inter = _intersection(a, b)
    return inter / (_area(a)[:, None] + _area(b)[None, :] - inter + _EPS)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, K) intersection over the area of each box of ``a`` (the detections)."""
    return _intersection(a, b) / (_area(a)[:, None] + _EPS)


def crowd_flags(gt_boxes: np.ndarray, ignore: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(M,) bool: non-ignored GTs whose IoU with another non-ignored GT is > ``threshold``."""
    keep = ~np.asarray(ignore, dtype=bool)
    flags = np.zeros(len(gt_boxes), dtype=bool)
    boxes = gt_boxes[keep]
    if len(boxes) > 1:
        iou = box_iou(boxes, boxes)
        np.fill_diagonal(iou, 0.0)
        flags[np.flatnonzero(keep)] = (iou > threshold).any(axis=1)
    return flags


# ---------------------------------------------------------------------------------------------
# Stage 1: match


@dataclass
class ImageMatch:
    """Stage 1 for one image: ``status`` (N,) of each detection (``TP``, ``FP``, ``IGNORED``),
    ``matched_gt`` (N,) the GT index of a TP (-1 otherwise), ``gt_matched`` (M,) the detection
    index that matched each GT (-1 if none). Indices refer to the record's own order."""

    status: np.ndarray
    matched_gt: np.ndarray
    gt_matched: np.ndarray


def match_image(record: CrowdRecord, iou_threshold: float = IOU_THRESHOLD) -> ImageMatch:
    """CrowdDet's ``compare_caltech`` for one image (detections by descending score, ties in
    the record's order)."""
    dts = clip_boxes(record.dt_boxes, record.height, record.width)
    gts = clip_boxes(record.gt_boxes, record.height, record.width)
    n, m = len(dts), len(gts)
    status = np.full(n, IGNORED, dtype=np.int64)
    matched_gt = np.full(n, -1, dtype=np.int64)
    gt_matched = np.full(m, -1, dtype=np.int64)
    valid = ~record.gt_ignore
    iou = box_iou(dts, gts) if m else np.zeros((n, 0))
    ignore_hit = (box_ioa(dts, gts[record.gt_ignore]) > iou_threshold).any(axis=1) if m else None
    order = np.argsort(-record.dt_scores, kind="stable")
    for i in order:
        candidates = np.where(valid & (gt_matched < 0), iou[i], -np.inf)
        j = int(np.argmax(candidates)) if m else -1
        if m and candidates[j] > iou_threshold:
            status[i], matched_gt[i], gt_matched[j] = TP, j, i
        elif ignore_hit is not None and ignore_hit[i]:
            status[i] = IGNORED
        else:
            status[i] = FP
    return ImageMatch(status, matched_gt, gt_matched)


@dataclass
class Matches:
    """Stage 1 for a dataset: one row per detection and one per GT (tidy pandas frames).

    ``detections``: image, detection (index in its record), score, status, gt.
    ``gts``: image, gt (index), ignore, crowd, matched (detection index or -1), score (of the
    matching detection, NaN if unmatched). ``num_images`` counts every record, empty ones too.
    """

    detections: pd.DataFrame
    gts: pd.DataFrame
    num_images: int

    @property
    def num_gt(self) -> int:
        """Non-ignored GTs: the recall denominator."""
        return int((~self.gts["ignore"]).sum())


def match_records(records: Sequence[CrowdRecord], iou_threshold: float = IOU_THRESHOLD) -> Matches:
    """Stage 1 on every record (see ``match_image``)."""
    det_rows, gt_rows = [], []
    for record in records:
        result = match_image(record, iou_threshold)
        gts = clip_boxes(record.gt_boxes, record.height, record.width)
        crowd = crowd_flags(gts, record.gt_ignore)
        det_rows.append(
            pd.DataFrame(
                {
                    "image": record.image_id,
                    "detection": np.arange(len(record.dt_scores)),
                    "score": record.dt_scores,
                    "status": result.status,
                    "gt": result.matched_gt,
                }
            )
        )
        matched = result.gt_matched
        gt_rows.append(
            pd.DataFrame(
                {
                    "image": record.image_id,
                    "gt": np.arange(len(gts)),
                    "ignore": record.gt_ignore,
                    "crowd": crowd,
                    "matched": matched,
                    "score": _matched_scores(matched, record.dt_scores),
                }
            )
        )
    det_columns = {"image": str, "detection": int, "score": float, "status": int, "gt": int}
    gt_columns = {
        "image": str,
        "gt": int,
        "ignore": bool,
        "crowd": bool,
        "matched": int,
        "score": float,
    }
    return Matches(_concat(det_rows, det_columns), _concat(gt_rows, gt_columns), len(records))


def _matched_scores(matched: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Score of the detection each GT matched (NaN where none)."""
    out = np.full(len(matched), np.nan)
    out[matched >= 0] = scores[matched[matched >= 0]]
    return out


def _concat(frames: list[pd.DataFrame], columns: dict[str, type]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})
    return pd.concat(frames, ignore_index=True).astype(columns)


# ---------------------------------------------------------------------------------------------
# Stage 2: accumulate


@dataclass
class Curves:
    """Stage 2: one point per kept (TP or FP) detection, by descending score (ties in image
    order). ``recall``/``precision`` as in CrowdDet's ``eval_AP``, ``fppi`` = FP / images,
    ``miss_rate`` = 1 - recall; ``num_gt`` non-ignored GTs, ``num_images`` images."""

    score: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    fppi: np.ndarray
    miss_rate: np.ndarray
    num_gt: int
    num_images: int

    def frame(self) -> pd.DataFrame:
        """The curve points as a pandas frame."""
        return pd.DataFrame(
            {
                "score": self.score,
                "tp": self.tp,
                "fp": self.fp,
                "recall": self.recall,
                "precision": self.precision,
                "fppi": self.fppi,
                "miss_rate": self.miss_rate,
            }
        )


def accumulate(matches: Matches) -> Curves:
    """Stage 2 from stage 1's per-detection records."""
    kept = matches.detections[matches.detections["status"] != IGNORED]
    kept = kept.iloc[np.argsort(-kept["score"].to_numpy(), kind="stable")]
    is_tp = (kept["status"] == TP).to_numpy()
    tp = np.cumsum(is_tp).astype(np.float64)
    fp = np.cumsum(~is_tp).astype(np.float64)
    num_gt = matches.num_gt
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / num_gt if num_gt else np.full(len(tp), np.nan)
    precision = tp / np.maximum(tp + fp, 1)
    fppi = fp / max(matches.num_images, 1)
    return Curves(
        score=kept["score"].to_numpy(),
        tp=tp,
        fp=fp,
        recall=recall,
        precision=precision,
        fppi=fppi,
        miss_rate=1.0 - recall,
        num_gt=num_gt,
        num_images=matches.num_images,
    )


# ---------------------------------------------------------------------------------------------
# Stage 3: summarise


def average_precision(curves: Curves) -> float:
    """AP: trapezoid area under the raw (recall, precision) points, from the first point
    (CrowdDet's ``_calculate_map``). NaN when there is no non-ignored GT; 0 without
    detections."""
    if curves.num_gt == 0:
        return float("nan")
    r, p = curves.recall, curves.precision
    return float(np.sum((r[1:] - r[:-1]) * (p[1:] + p[:-1]) / 2)) if len(r) > 1 else 0.0


def log_average_miss_rate(curves: Curves, references: Sequence[float] = FPPI_REFERENCES) -> float:
    """MR^-2: geometric mean of the miss rate at the first point with FPPI >= each reference
    (the last point where none reaches it), CrowdDet's ``eval_MR``. NaN without non-ignored GT;
    1.0 without any kept detection (every GT is missed; CrowdDet's code has no point there)."""
    if curves.num_gt == 0:
        return float("nan")
    if len(curves.fppi) == 0:
        return 1.0
    reached = curves.fppi[None, :] >= np.asarray(references)[:, None]
    index = np.where(reached.any(axis=1), reached.argmax(axis=1), len(curves.fppi) - 1)
    with np.errstate(divide="ignore"):
        return float(np.exp(np.log(curves.miss_rate[index]).mean()))


def recall_split(matches: Matches) -> dict[str, float]:
    """Recall of all, crowd and sparse non-ignored GTs (NaN where a group is empty)."""
    gts = matches.gts[~matches.gts["ignore"]]
    found = gts["matched"] >= 0
    out = {}
    for name, rows in (("all", gts.index), ("crowd", gts.index[gts["crowd"]])):
        out[name] = float(found[rows].mean()) if len(rows) else float("nan")
    sparse = gts.index[~gts["crowd"]]
    out["sparse"] = float(found[sparse].mean()) if len(sparse) else float("nan")
    out["num_crowd"] = int(gts["crowd"].sum())
    out["num_sparse"] = int((~gts["crowd"]).sum())
    return out


# ---------------------------------------------------------------------------------------------
# JI


@dataclass
class ImageJI:
    """JI of one image at one score threshold: k matches, m GTs and n detections after the
    ignore rule; ``ratio`` = k / (m + n - k), NaN when m + n = 0 (left out of the mean)."""

    k: int
    m: int
    n: int

    @property
    def ratio(self) -> float:
        return self.k / (self.m + self.n - self.k) if self.m + self.n > 0 else float("nan")


def max_weight_matching(iou: np.ndarray, threshold: float = IOU_THRESHOLD) -> list[tuple[int, int]]:
    """Pairs (detection, GT) of a maximum-weight bipartite matching on the edges with
    IoU > ``threshold`` (weight = IoU)."""
    if iou.size == 0:
        return []
    weights = np.where(iou > threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if weights[r, c] > 0]


def image_ji(
    record: CrowdRecord, score_threshold: float, iou_threshold: float = IOU_THRESHOLD
) -> ImageJI:
    """CrowdDet's ``compute_JI_with_ignore`` for one image: detections with score >
    ``score_threshold``, boxes clipped to the image."""
    dts = clip_boxes(record.dt_boxes, record.height, record.width)
    dts = dts[record.dt_scores > score_threshold]
    gts = clip_boxes(record.gt_boxes, record.height, record.width)
    valid, ignore = gts[~record.gt_ignore], gts[record.gt_ignore]
    matches = max_weight_matching(box_iou(dts, valid), iou_threshold) if len(valid) else []
    free_dt = np.setdiff1d(np.arange(len(dts)), [i for i, _ in matches])
    free_gt = np.setdiff1d(np.arange(len(valid)), [j for _, j in matches])

    def ignored(boxes: np.ndarray) -> int:
        if len(ignore) == 0 or len(boxes) == 0:
            return 0
        return int((box_ioa(boxes, ignore).max(axis=1) > iou_threshold).sum())

    k = len(matches)
    return ImageJI(k=k, m=len(valid) - ignored(valid[free_gt]), n=len(dts) - ignored(dts[free_dt]))


def jaccard_index(
    records: Sequence[CrowdRecord],
    thresholds: Sequence[float] = JI_THRESHOLDS,
    iou_threshold: float = IOU_THRESHOLD,
) -> pd.DataFrame:
    """Per-image JI records (tidy: threshold, image, k, m, n, ratio) for each score threshold."""
    rows = []
    for t in thresholds:
        for record in records:
            ji = image_ji(record, t, iou_threshold)
            rows.append(
                {
                    "threshold": float(t),
                    "image": record.image_id,
                    "k": ji.k,
                    "m": ji.m,
                    "n": ji.n,
                    "ratio": ji.ratio,
                }
            )
    return pd.DataFrame(rows, columns=["threshold", "image", "k", "m", "n", "ratio"])


def summarise_ji(per_image: pd.DataFrame) -> pd.Series:
    """Mean JI per score threshold over images with m + n > 0 (NaN where there is none)."""
    return per_image.groupby("threshold", sort=True)["ratio"].mean()


# ---------------------------------------------------------------------------------------------
# All of it


def above_score(records: Sequence[CrowdRecord], threshold: float) -> list[CrowdRecord]:
    """Copies of ``records`` keeping only the detections with score > ``threshold``."""
    return [
        replace(
            r,
            dt_boxes=r.dt_boxes[r.dt_scores > threshold],
            dt_scores=r.dt_scores[r.dt_scores > threshold],
        )
        for r in records
    ]


@dataclass
class CrowdReport:
    """Every crowd metric of a set of records plus the intermediate stages.

    ``ap50``, ``mr2`` (MR^-2), ``ji`` (best threshold's JI) and ``ji_threshold``, ``recall``
    (all / crowd / sparse and group sizes, of the detections above ``recall_threshold``: by
    default the best JI threshold, as paper Table 7), ``recall_any`` (the same of all
    detections); ``ji_per_threshold`` (Series, index = score
    threshold); ``matches``, ``curves``, ``ji_per_image``: the stages. ``reasons`` says why a
    value is NaN.
    """

    ap50: float
    mr2: float
    ji: float
    ji_threshold: float
    recall: dict[str, float]
    recall_threshold: float | None
    recall_any: dict[str, float]
    ji_per_threshold: pd.Series
    matches: Matches
    curves: Curves
    ji_per_image: pd.DataFrame
    reasons: dict[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """The headline numbers (flat dict): ap50, mr2, ji, ji_threshold, recall_*,
        recall_any_*."""
        out = {"ap50": self.ap50, "mr2": self.mr2, "ji": self.ji, "ji_threshold": self.ji_threshold}
        out.update({f"recall_{k}": float(v) for k, v in self.recall.items()})
        out.update({f"recall_any_{k}": float(v) for k, v in self.recall_any.items()})
        return out


def evaluate_crowd(
    records: Sequence[CrowdRecord],
    iou_threshold: float = IOU_THRESHOLD,
    ji_thresholds: Sequence[float] = JI_THRESHOLDS,
    recall_score_threshold: float | Literal["best-ji"] | None = "best-ji",
) -> CrowdReport:
    """AP50, MR^-2, JI and the recall split of ``records`` (see the module docstring);
    ``recall_score_threshold``: the detections the recall split counts (score above it;
    ``"best-ji"``: the best JI threshold; None: all)."""
    matches = match_records(records, iou_threshold)
    curves = accumulate(matches)
    per_image = jaccard_index(records, ji_thresholds, iou_threshold)
    per_threshold = summarise_ji(per_image)
    reasons = {}
    if matches.num_gt == 0:
        reasons["ap50"] = reasons["mr2"] = "no non-ignored ground truth"
    if per_threshold.isna().all():
        reasons["ji"] = "no image with a ground truth or detection outside ignore regions"
        best, best_t = float("nan"), float("nan")
    else:
        best_t = float(per_threshold.idxmax())
        best = float(per_threshold[best_t])
    threshold = best_t if recall_score_threshold == "best-ji" else recall_score_threshold
    if threshold is None or np.isnan(threshold):
        threshold, recall_matches = None, matches
    else:
        recall_matches = match_records(above_score(records, threshold), iou_threshold)
    return CrowdReport(
        ap50=average_precision(curves),
        mr2=log_average_miss_rate(curves),
        ji=best,
        ji_threshold=best_t,
        recall=recall_split(recall_matches),
        recall_threshold=threshold,
        recall_any=recall_split(matches),
        ji_per_threshold=per_threshold,
        matches=matches,
        curves=curves,
        ji_per_image=per_image,
        reasons=reasons,
    )
