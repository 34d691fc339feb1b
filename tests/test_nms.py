"""NMS strategies on hand-made crowds whose outcome is known."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from xaibench.detectors.evidence import EvidenceObject, build_evidence_toy, evidence_image
from xaibench.detectors.nms import (
    NMSStrategy,
    feature_duplicates,
    greedy_keep,
    normalized_correlation,
    resize_short_edge,
)

from xaibench.params import ParamError, checked_params
from xaibench.registry import NMS
from xaibench.types import Detections, Provenance

# two people side by side whose boxes overlap (IoU 2/3) but whose evidence is disjoint
LEFT = EvidenceObject(box=(20, 20, 80, 140), label=1, region=(24, 24, 48, 136))
RIGHT = EvidenceObject(box=(32, 20, 92, 140), label=1, region=(56, 24, 88, 136), gain=8, bias=-4)
# a second, lower-scoring box on the left person: same evidence (IoU 7/8)
LEFT_AGAIN = EvidenceObject(box=(24, 20, 84, 140), label=1, region=(24, 24, 48, 136), gain=8)
# a small box on the left person's evidence, IoU 0.4 with the first one
LEFT_PART = EvidenceObject(box=(20, 20, 80, 68), label=1, region=(24, 24, 48, 136), gain=6)


def run(name: str, objects, **params):
    detector = build_evidence_toy(objects=objects)
    image = evidence_image(objects)
    return NMS.build(name, **params).run(detector, image)


def candidates(boxes, scores, labels=None) -> Detections:
    n = len(scores)
    z = torch.zeros(n, dtype=torch.long)
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        scores=torch.tensor(scores),
        labels=torch.ones(n, dtype=torch.long) if labels is None else torch.tensor(labels),
        class_probs=torch.zeros(n, 2),
        provenance=Provenance(level=z, y=z, x=z, anchor=z, class_index=z),
        image_size=(100, 100),
    )


def test_two_people_with_different_maps_odam_nms_keeps_both_nms_drops_one():
    assert run("nms", [LEFT, RIGHT]).keep.tolist() == [0]
    assert sorted(run("odamnms", [LEFT, RIGHT]).keep.tolist()) == [0, 1]


def test_a_duplicate_with_near_identical_maps_is_dropped_by_both():
    assert run("nms", [LEFT, LEFT_AGAIN]).keep.tolist() == [0]
    out = run("odamnms", [LEFT, LEFT_AGAIN])
    assert out.keep.tolist() == [0]
    assert out.detections.scores.tolist() == pytest.approx([out.candidates.scores[0].item()])


def test_low_iou_with_highly_correlated_maps_is_a_duplicate_for_odam_nms_only():
    assert sorted(run("nms", [LEFT, LEFT_PART]).keep.tolist()) == [0, 1]
    assert run("odamnms", [LEFT, LEFT_PART]).keep.tolist() == [0]
    # with T_h = 1 (classic NMS's corner of Fig. 9) the correlation never decides a low IoU
    assert sorted(run("odamnms", [LEFT, LEFT_PART], t_high=1.0).keep.tolist()) == [0, 1]


def test_odam_nms_correlations_of_the_toy_maps():
    detector = build_evidence_toy(objects=[LEFT, RIGHT, LEFT_AGAIN])
    image = evidence_image([LEFT, RIGHT, LEFT_AGAIN])
    strategy = NMS.build("odamnms")
    found = detector.detect([image], nms=False)[0]
    corr = strategy.correlations(strategy.heat_maps(detector, image, found))
    assert corr[0, 2] > 0.99 and corr[0, 1] < 0.05 and corr[1, 2] < 0.05


def test_soft_nms_scores_by_hand():
    # IoU(0, 1) = 0.6 (areas 100 and 100, intersection 75); box 2 overlaps nothing
    found = candidates([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.3])
    out = NMS.build("softnms").select(found)
    iou = 75 / 125
    assert out.keep.tolist() == [0, 1, 2]
    expected = [0.9, 0.8 * math.exp(-(iou**2) / 0.5), 0.3]
    assert out.scores.tolist() == pytest.approx(expected)
    linear = NMS.build("softnms", method="linear").select(found)
    assert linear.scores.tolist() == pytest.approx([0.9, 0.8 * (1 - iou), 0.3])
    # decayed to the final threshold or below: dropped
    gone = NMS.build("softnms", method="linear", final_threshold=0.4).select(found)
    assert gone.keep.tolist() == [0]


def test_soft_nms_leaves_other_classes_alone():
    found = candidates([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], labels=[1, 2])
    assert NMS.build("softnms").select(found).scores.tolist() == pytest.approx([0.9, 0.8])
    assert NMS.build("nms").select(found).keep.tolist() == [0, 1]


def test_feature_nms_rule_on_hand_made_embeddings():
    # IoU: 0-1 0.95 (duplicate whatever the embeddings), 0-2 0.6 (decided by distance),
    # 0-3 0.05 (distinct whatever the embeddings)
    iou = torch.tensor([[1.0, 0.95, 0.6, 0.05], [0.95, 1, 0, 0], [0.6, 0, 1, 0], [0.05, 0, 0, 1]])
    far, near = 1.5, 0.5
    dist = torch.tensor([[0, far, near, near], [far, 0, 0, 0], [near, 0, 0, 0], [near, 0, 0, 0]])
    dup = feature_duplicates(iou, dist, high=0.9, low=0.1, max_distance=1.0)
    assert dup[0].tolist() == [True, True, True, False]
    dist[0, 2] = dist[2, 0] = far
    assert feature_duplicates(iou, dist, 0.9, 0.1, 1.0)[0, 2].item() is False


def test_feature_nms_keeps_an_overlapping_person_with_a_distant_embedding():
    strategy = NMS.build("featurenms")
    # IoU 0.6 between 0 and 1; 0 and 2 identical boxes
    found = candidates([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.7])
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # distances 1.41, 0.63
    keep, _ = strategy.keep_from(found, embeddings)
    assert keep.tolist() == [0, 1]


def test_greedy_keep_follows_scores_not_order():
    duplicate = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert greedy_keep(torch.tensor([0.5, 0.9, 0.1]), duplicate).tolist() == [1]
    assert greedy_keep(torch.tensor([0.9, 0.5, 0.8]), duplicate).tolist() == [0, 2]


def test_correlation_and_resizing():
    maps = torch.zeros(3, 100, 200)
    maps[0, :, :100] = 1
    maps[1, :, 100:] = 1
    maps[2] = 2 * maps[0]
    small = resize_short_edge(maps, 50)
    assert small.shape == (3, 50, 100)
    corr = normalized_correlation(small)
    assert corr[0, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert corr[0, 1].item() == pytest.approx(0.0, abs=0.05)
    pearson = normalized_correlation(small, "pearson")
    assert pearson[0, 1].item() == pytest.approx(-1.0, abs=0.05)


def test_score_threshold_and_max_detections():
    found = candidates([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0.9, 0.04, 0.5])
    out = NMS.build("nms", max_detections=1).select(found)
    assert out.keep.tolist() == [0]
    assert NMS.build("nms").select(found).keep.tolist() == [0, 2]
    with pytest.raises(ValueError, match="odamnms needs the detector"):
        NMS.build("odamnms").select(found)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synthetic-crowd-fcos", "synthetic-crowd-frcnn"])
def test_nms_loses_crowded_people_that_the_crowd_demo_detectors_find(name):
    from xaibench.detectors.zoo import demo_data
    from xaibench.metrics.nms_comparison import compare_strategies

    from xaibench.registry import DETECTORS

    detector = DETECTORS.build(name, progress=False)
    val = demo_data(mode="crowd")["val"]
    runs = compare_strategies(detector, [val[i] for i in range(30)], ["none", "nms"])
    without, with_nms = runs["none"].report, runs["nms"].report
    assert with_nms.ap50 > 0.5
    lost = {
        split: without.recall_any[split] - with_nms.recall_any[split]
        for split in ("crowd", "sparse")
    }
    # NMS at 0.5 loses people in crowds, and far more of them than of people standing apart
    assert lost["crowd"] > 0.1
    assert lost["crowd"] > lost["sparse"] + 0.1


@pytest.mark.parametrize("family", ["fcos", "frcnn"])
def test_odam_nms_explains_the_candidates_of_one_trace(family, random_image):
    from conftest import assert_one_pass_odam_nms, build

    _, detector = build(family)
    assert_one_pass_odam_nms(detector, random_image)


@dataclass(kw_only=True, eq=False)
class BestPerClass(NMSStrategy):
    """A new strategy in a few lines: keep the ``keep`` best candidates of each class."""

    name = "best-per-class"
    keep: int = 1

    def suppress(self, candidates, detector=None, image=None):
        kept, per_class = [], Counter()
        for i in torch.argsort(candidates.scores, descending=True).tolist():
            label = int(candidates.labels[i])
            if per_class[label] < self.keep:
                kept.append(i)
                per_class[label] += 1
        index = torch.tensor(kept, dtype=torch.long)
        return index, candidates.scores[index]


def test_a_new_strategy_is_a_dataclass_whose_fields_are_its_settings():
    strategy = BestPerClass(**checked_params(BestPerClass, {"keep": "2", "score_threshold": 0.2}))
    assert strategy.params() == {"iou_threshold": 0.5, "score_threshold": 0.2,
                                 "max_detections": None, "keep": 2}  # fmt: skip
    found = candidates([[0, 0, 9, 9]] * 5, [0.9, 0.1, 0.8, 0.7, 0.6], labels=[1, 1, 1, 2, 2])
    out = strategy.select(found)
    assert out.keep.tolist() == [0, 2, 3, 4]  # class 1: 0.9, 0.8 (0.1 is below 0.2); class 2
    with pytest.raises(ParamError, match="kep: not a setting of BestPerClass; expected one of "
                       "iou_threshold, score_threshold, max_detections, keep"):  # fmt: skip
        checked_params(BestPerClass, {"kep": 2})
    with pytest.raises(ParamError, match="keep='two': expected int"):
        checked_params(BestPerClass, {"keep": "two"})
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        BestPerClass(iou_threshold=2.0)
