"""Instance selection: the paper's protocol (NMS 0.5, top 100, score > 0.1, one-to-one
same-class matching with IoU > 0.9), all detections and top-k, on hand-built detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaibench.selection import match_to_ground_truth, select_instances
from xaibench.types import Detections, Instance, Provenance


def detections(boxes, scores, labels) -> Detections:
    n = len(scores)
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        scores=torch.tensor(scores),
        labels=torch.tensor(labels),
        class_probs=torch.zeros(n, 3),
        provenance=Provenance.empty(),
        image_size=(100, 100),
    )


def gt(box, label: int = 1, ignore: bool = False) -> Instance:
    return Instance(box=np.array(box, np.float32), label=label, ignore=ignore)


def test_paper_protocol() -> None:
    det = detections(
        [
            [10, 10, 50, 50],  # 0: matches GT 0 (IoU 1)
            [12, 10, 52, 50],  # 1: duplicate of 0 (IoU > 0.5), removed by NMS
            [60, 60, 90, 90],  # 2: matches GT 1 only at IoU 0.81: not well detected
            [0, 60, 30, 90],  # 3: score 0.1 is not > 0.1
            [60, 0, 90, 30],  # 4: right box, wrong class
            [30, 30, 70, 70],  # 5: matches only the crowd region
        ],
        [0.9, 0.8, 0.7, 0.1, 0.6, 0.5],
        [1, 1, 1, 1, 1, 1],
    )
    truth = [
        gt([10, 10, 50, 50]),
        gt([60, 60, 93, 93]),  # IoU with box 2: 900 / 1089 = 0.826
        gt([0, 60, 30, 90]),
        gt([60, 0, 90, 30], label=2),
        gt([30, 30, 70, 70], ignore=True),
    ]
    selected = select_instances(det, truth, "paper")
    assert [(s.detection, s.gt) for s in selected] == [(0, 0)]
    assert selected[0].iou == pytest.approx(1.0)
    loose = select_instances(det, truth, "paper", match_iou=0.8)
    assert [(s.detection, s.gt) for s in loose] == [(0, 0), (2, 1)]
    assert loose[1].iou == pytest.approx(900 / 1089)


def test_paper_protocol_keeps_at_most_max_detections() -> None:
    boxes = [[i * 10, 0, i * 10 + 8, 8] for i in range(10)]
    det = detections(boxes, [0.9 - 0.01 * i for i in range(10)], [1] * 10)
    truth = [gt(b) for b in boxes]
    selected = select_instances(det, truth, "paper", max_detections=4)
    assert [s.detection for s in selected] == [0, 1, 2, 3]
    assert [s.gt for s in selected] == [0, 1, 2, 3]


def test_all_and_top_k_keep_unmatched_predictions_by_score() -> None:
    det = detections([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], [0.2, 0.9, 0.5], [1, 1, 1])
    truth = [gt([0, 0, 10, 10])]
    everything = select_instances(det, truth, "all")
    # one-to-one: the better-scoring duplicate (row 2) takes the only ground truth
    assert [(s.detection, s.gt) for s in everything] == [(1, None), (2, 0), (0, None)]
    assert np.isnan(everything[0].iou)
    assert [s.detection for s in select_instances(det, truth, "top-k", top_k=2)] == [1, 2]


def test_greedy_and_optimal_matching_differ_where_greedy_is_short_sighted() -> None:
    """Boxes 10 px tall, so IoU is the overlap of the x-intervals over their union.
    A = [1.2, 11.2] overlaps GT 0 = [0, 10] at 8.8 / 11.2 and GT 1 = [2, 12] at 9.2 / 10.8;
    B = GT 1 overlaps GT 0 at 8 / 12 < 0.7. Greedy (A first) gives A GT 1 and B nothing;
    the optimal assignment gives A GT 0 and B GT 1."""
    det = detections([[1.2, 0, 11.2, 10], [2, 0, 12, 10]], [0.9, 0.8], [1, 1])
    truth = [gt([0, 0, 10, 10]), gt([2, 0, 12, 10])]
    greedy = match_to_ground_truth(det, [0, 1], truth, iou_thresh=0.7)
    assert greedy[0] == (1, pytest.approx(9.2 / 10.8))
    assert greedy[1][0] is None
    optimal = match_to_ground_truth(det, [0, 1], truth, iou_thresh=0.7, matching="optimal")
    assert optimal[0] == (0, pytest.approx(8.8 / 11.2))
    assert optimal[1] == (1, pytest.approx(1.0))


def test_unknown_mode_lists_the_known_ones() -> None:
    det = detections([[0, 0, 1, 1]], [0.5], [1])
    with pytest.raises(ValueError, match="paper, all, top-k"):
        select_instances(det, [], "best")
