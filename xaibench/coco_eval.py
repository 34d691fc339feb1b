"""COCO box AP of detections on a COCO-format dataset, computed by pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from xaibench.types import Detections

if TYPE_CHECKING:
    from xaibench.datasets.coco import CocoDataset

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
"""Names of ``COCOeval.stats`` in order (AP averaged over IoU 0.5:0.95 unless named)."""


def coco_results(detections: Sequence[Detections], dataset: CocoDataset) -> list[dict]:
    """Detections as COCO result records (``bbox`` xywh pixels, ``category_id`` of the json).

    ``detections[i]`` belongs to ``dataset[i]``; labels are the dataset's contiguous 1..K.
    Label 0 is skipped: it is the background, which sigmoid heads such as torchvision's FCOS
    keep as an (untrained) output channel and can predict.
    """
    if len(detections) != len(dataset):
        raise ValueError(
            f"got detections for {len(detections)} images but the dataset has {len(dataset)}"
        )
    records = []
    for image_id, det in zip(dataset.image_ids, detections, strict=True):
        boxes = det.boxes.detach().cpu().double()
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        for box, score, label in zip(
            xywh.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
        ):
            if int(label) == 0:
                continue
            records.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.category_id_for_label(int(label)),
                    "bbox": box,
                    "score": float(score),
                }
            )
    return records


def evaluate_coco(detections: Sequence[Detections], dataset: CocoDataset) -> dict[str, float]:
    """Box AP / AR of ``detections`` (one per image of ``dataset``, in order).

    Returns the twelve ``COCOeval.stats`` by name (``STAT_NAMES``): ``AP`` (IoU 0.5:0.95),
    ``AP50``, ``AP75``, ... All are 0 when there is no detection at all; -1 marks a statistic
    without ground truth (pycocotools' convention).
    """
    records = coco_results(detections, dataset)
    if not records:
        return dict.fromkeys(STAT_NAMES, 0.0)
    gt: COCO = dataset.coco
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        evaluator = COCOeval(gt, gt.loadRes(records), iouType="bbox")
        evaluator.params.imgIds = list(dataset.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
