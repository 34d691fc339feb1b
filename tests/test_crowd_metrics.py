"""Crowd metrics (CrowdDet evaluation) on tiny cases computed by hand, and the result file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from xaibench.metrics.crowd import (
    FP,
    IGNORED,
    TP,
    accumulate,
    evaluate_crowd,
    image_ji,
    match_image,
    match_records,
)

from xaibench.datasets.crowdhuman import CrowdRecord, read_crowddet_results, write_crowddet_results


def record(image_id, gts, ignore, dts=(), scores=(), size=(100, 100)):
    return CrowdRecord(image_id, size[0], size[1], gts, ignore, dts, scores)


@pytest.fixture
def three_images() -> list[CrowdRecord]:
    """A: two people, an ignore region, a duplicate, a detection in the ignore region and a
    false positive; B: empty; C: one person nobody detected."""
    a = record(
        "A",
        gts=[[0, 0, 10, 10], [50, 50, 60, 60], [80, 0, 100, 20]],
        ignore=[False, False, True],
        dts=[[0, 0, 10, 10], [0, 0, 10, 9], [85, 5, 95, 15], [50, 50, 60, 60], [30, 30, 40, 40]],
        scores=[0.9, 0.8, 0.7, 0.6, 0.5],
    )
    b = record("B", gts=np.zeros((0, 4)), ignore=[])
    c = record("C", gts=[[20, 20, 40, 60]], ignore=[False])
    return [a, b, c]


def test_greedy_matching_with_ignore_regions(three_images):
    result = match_image(three_images[0])
    # the duplicate finds its GT taken (FP); inside the ignore region: dropped
    assert result.status.tolist() == [TP, FP, IGNORED, TP, FP]
    assert result.matched_gt.tolist() == [0, -1, -1, 1, -1]
    assert result.gt_matched.tolist() == [0, 3, -1]


def test_ap_mr_by_hand(three_images):
    curves = accumulate(match_records(three_images))
    # kept in score order: TP, FP, TP, FP; 3 GTs, 3 images
    np.testing.assert_allclose(curves.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(curves.precision, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(curves.fppi, [0, 1 / 3, 1 / 3, 2 / 3])
    report = evaluate_crowd(three_images)
    # trapezoids from the first point: only the step 1/3 -> 2/3 has width
    assert report.ap50 == pytest.approx((1 / 3) * (1 / 2 + 2 / 3) / 2)
    # refs 0.01..0.3162 first reach FPPI 1/3 (miss 2/3); 0.5623 reaches 2/3 (miss 1/3);
    # 1.0 is never reached: the last point (miss 1/3)
    expected = math.exp((7 * math.log(2 / 3) + 2 * math.log(1 / 3)) / 9)
    assert report.mr2 == pytest.approx(expected)


def test_ji_per_threshold_by_hand(three_images):
    report = evaluate_crowd(three_images)
    # per image k / (m + n - k); B (m = n = 0) is left out; C gives 0
    # t < 0.5: A has k=2, m=2, n=4 (the detection in the ignore region removed) -> 1/2
    # t = 0.5: the FP at 0.5 goes -> 2/3; t = 0.6, 0.7: one match, n=2 -> 1/3;
    # t = 0.8: 1/2; t = 0.9: no detection -> 0
    a = [1 / 2] * 5 + [2 / 3, 1 / 3, 1 / 3, 1 / 2, 0]
    np.testing.assert_allclose(report.ji_per_threshold.to_numpy(), np.array(a) / 2)
    np.testing.assert_allclose(report.ji_per_threshold.index, np.arange(10) / 10)
    assert report.ji == pytest.approx(1 / 3)
    assert report.ji_threshold == 0.5


def test_ji_uses_maximum_weight_matching_and_drops_gts_in_ignore_regions():
    # d0 overlaps g0 (0.9) and g1 (0.6); d1 overlaps only g0 (0.7): the best matching pairs
    # d0-g1 and d1-g0 (1.3 > 0.9); g2 unmatched inside an ignore region is not counted in m
    r = record(
        "x",
        gts=[[0, 0, 100, 10], [20, 0, 100, 10], [0, 50, 10, 60], [0, 45, 20, 70]],
        ignore=[False, False, False, True],
        dts=[[10, 0, 100, 10], [0, 0, 70, 10]],
        scores=[0.9, 0.8],
    )
    ji = image_ji(r, 0.0)
    assert (ji.k, ji.m, ji.n) == (2, 2, 2)
    assert ji.ratio == 1.0


def test_no_detections_empty_and_all_ignore_images():
    people = record("p", gts=[[0, 0, 10, 10], [20, 0, 30, 10]], ignore=[False, False])
    report = evaluate_crowd([people, record("e", gts=np.zeros((0, 4)), ignore=[])])
    assert report.ap50 == 0.0
    assert report.mr2 == 1.0  # every person missed at every FPPI
    assert report.ji == 0.0 and report.recall["all"] == 0.0

    only_ignore = record("i", [[0, 0, 50, 50]], [True], [[10, 10, 20, 20]], [0.9])
    report = evaluate_crowd([only_ignore])
    assert report.matches.detections["status"].tolist() == [IGNORED]
    assert math.isnan(report.ap50) and math.isnan(report.mr2) and math.isnan(report.ji)
    assert set(report.reasons) == {"ap50", "mr2", "ji"}


def test_boxes_are_clipped_to_the_image():
    # the full-body GT leaves the image; clipped it equals the detection (IoU 0.5 unclipped)
    r = record("c", [[-10, 0, 10, 10]], [False], [[0, 0, 10, 10]], [0.9])
    assert match_image(r).status.tolist() == [TP]


def test_recall_split_crowd_and_sparse():
    # g0 and g1 overlap with IoU 0.82 (crowd), g2 stands alone (sparse)
    r = record(
        "c",
        gts=[[0, 0, 10, 10], [1, 0, 11, 10], [50, 0, 60, 10]],
        ignore=[False, False, False],
        dts=[[0, 0, 10, 10], [50, 0, 60, 10], [1, 0, 11, 10]],
        scores=[0.9, 0.8, 0.2],
    )
    report = evaluate_crowd([r], recall_score_threshold=None)
    assert report.matches.gts["crowd"].tolist() == [True, True, False]
    assert report.recall["crowd"] == 1.0 and report.recall["sparse"] == 1.0
    above = evaluate_crowd([r], recall_score_threshold=0.5)
    assert above.recall["crowd"] == 0.5 and above.recall["sparse"] == 1.0
    assert above.recall["num_crowd"] == 2 and above.recall["num_sparse"] == 1


def test_crowddet_result_file_round_trip(tmp_path, three_images):
    path = write_crowddet_results(tmp_path / "results.odgt", three_images)
    first = path.read_text().splitlines()[0]
    assert '"tag":-1' in first and '"score":0.9' in first and '"box":[0.0,0.0,10.0,10.0]' in first
    back = read_crowddet_results(path)
    assert [r.image_id for r in back] == ["A", "B", "C"]
    before, after = evaluate_crowd(three_images).values(), evaluate_crowd(back).values()
    assert after == pytest.approx(before, nan_ok=True)


def test_result_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.odgt"
    path.write_text('{"ID": "a", "height": 10, "width": 10, "dtboxes": [{"box": [0, 0, 1]}]}\n')
    with pytest.raises(ValueError, match=r"bad.odgt line 1 \(ID a\) dtboxes\[0\]"):
        read_crowddet_results(path)
    path.write_text('{"ID": "a", "width": 10}\n')
    with pytest.raises(ValueError, match="line 1: missing field"):
        read_crowddet_results(path)


def test_recall_split_at_the_best_ji_threshold_by_default():
    # two people (the second detected at 0.25) and a false positive at 0.3
    r = record(
        "t",
        gts=[[0, 0, 10, 10], [50, 0, 60, 10]],
        ignore=[False, False],
        dts=[[0, 0, 10, 10], [80, 80, 90, 90], [50, 0, 60, 10]],
        scores=[0.9, 0.3, 0.25],
    )
    report = evaluate_crowd([r])
    # JI: t = 0.0..0.2: k=2, n=3 -> 2/3 (the best); t = 0.3..0.8: k=1, n=1 -> 1/2
    assert report.ji == pytest.approx(2 / 3) and report.ji_threshold == 0.0
    assert report.recall_threshold == 0.0 and report.recall["all"] == 1.0
    strict = evaluate_crowd([r], recall_score_threshold=0.26)
    assert strict.recall["all"] == 0.5 and strict.recall_any["all"] == 1.0
    assert strict.values()["recall_any_all"] == 1.0
