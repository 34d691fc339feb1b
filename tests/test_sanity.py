"""Sanity checks by parameter randomisation: the similarity measures on maps whose answers
are known, the randomisation schedule, and ODAM's similarity collapsing on a demo detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from xaibench.metrics.sanity import (
    MEASURES,
    compared_region,
    map_similarity,
    parameter_blocks,
    plot_sanity,
    randomisation_steps,
    randomised,
    reinitialise,
    sanity_check,
)

from xaibench.metric import ExplainedBatch
from xaibench.registry import METHODS, METRICS
from xaibench.types import Target


def blob(cy: float, cx: float, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0).astype(np.float32)


def test_similarity_of_identical_negated_and_constant_maps() -> None:
    heat = blob(20, 25) + 0.3 * blob(35, 10)
    same = map_similarity(heat, heat)
    assert all(same[m] == pytest.approx(1.0) for m in MEASURES)
    negated = map_similarity(heat, -heat)
    assert negated["spearman"] == pytest.approx(-1.0)
    assert negated["spearman_abs"] == pytest.approx(1.0)
    assert np.isnan(map_similarity(heat, np.ones_like(heat))["spearman"])
    rescaled = map_similarity(heat, 3 * heat + 2)  # SSIM and HOG see min-max normalised maps
    assert rescaled["ssim"] == pytest.approx(1.0) and rescaled["hog"] == pytest.approx(1.0, 1e-3)
    moved = map_similarity(blob(10, 10), blob(38, 38))
    assert moved["spearman"] < 0 and moved["hog"] < 0.2 and moved["ssim"] < 0.6


def test_compared_region_rounds_the_box_outwards() -> None:
    heat = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert compared_region(heat, np.array([1.5, 2.2, 4.1, 5.0])).shape == (3, 4)
    assert compared_region(heat, None).shape == (10, 10)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.ModuleDict({"cls": nn.Conv2d(4, 2, 1), "reg": nn.Conv2d(4, 4, 1)})


def test_blocks_and_schedules_follow_the_module_order() -> None:
    model = Tiny()
    assert parameter_blocks(model, depth=1) == [
        ("body", ["body.0", "body.1"]),
        ("head", ["head.cls", "head.reg"]),
    ]
    blocks = parameter_blocks(model, depth=2)
    assert [b for b, _ in blocks] == ["body.0", "body.1", "head.cls", "head.reg"]
    cascading = randomisation_steps(blocks, "cascading")
    assert [label for label, _ in cascading] == ["head.reg", "head.cls", "body.1", "body.0"]
    assert cascading[1][1] == ["head.reg", "head.cls"]
    assert cascading[-1][1] == ["head.reg", "head.cls", "body.1", "body.0"]
    assert randomisation_steps(blocks, "independent")[2] == ("head.cls", ["head.cls"])


def test_randomised_changes_only_the_named_modules_and_restores_them() -> None:
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with randomised(model, ["head.cls"], seed=3):
        now = model.state_dict()
        assert not torch.equal(now["head.cls.weight"], before["head.cls.weight"])
        assert torch.equal(now["head.reg.weight"], before["head.reg.weight"])
        assert torch.equal(now["body.0.weight"], before["body.0.weight"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_block_gets_the_same_random_values_at_every_cascading_step() -> None:
    alone, together = Tiny(), Tiny()
    reinitialise(alone, ["head.cls"], seed=3)
    reinitialise(together, ["head.reg", "head.cls"], seed=3)
    assert torch.equal(alone.head.cls.weight, together.head.cls.weight)
    reinitialise(together, ["head.cls"], seed=4)
    assert not torch.equal(alone.head.cls.weight, together.head.cls.weight)


@pytest.mark.slow
def test_odam_similarity_collapses_under_cascading_randomisation(
    demo_detector, demo_scene, tmp_path
) -> None:
    """ODAM maps of the three best detections of two held-out scenes, compared inside each
    box: identical before, far apart once every block of the detector is re-initialised."""
    detector = demo_detector("synthetic-fcos")
    odam = METHODS.build("odam")
    last = {m: [] for m in MEASURES}
    for i in range(2):
        targets = [Target(k) for k in range(3)]
        curve = sanity_check(detector, odam, demo_scene(i), targets, depth=2)
        assert curve.steps == [
            "head.regression_head",
            "head.classification_head",
            "backbone.fpn",
            "backbone.body",
        ]
        assert curve.unit == ["provenance"] * 3
        for m in MEASURES:
            last[m].extend(curve.similarity[m][:, -1])
    assert np.nanmean(last["spearman"]) < 0.4
    assert np.nanmean(last["ssim"]) < 0.6
    assert np.nanmean(last["hog"]) < 0.4
    png = plot_sanity(curve, tmp_path / "sanity.png")
    assert Image.open(png).size[0] > 100


@pytest.mark.slow
def test_sanity_metric_on_a_two_stage_detector_re_reads_the_same_proposals(
    demo_detector, demo_scene
) -> None:
    """Faster R-CNN units are re-read from their own RoIs: unchanged parameters give the
    same maps, randomised ones give a finite similarity for every unit."""
    detector = demo_detector("synthetic-frcnn")
    image = demo_scene(0)
    odam = METHODS.build("odam")
    trace = detector.trace(image)
    targets = [Target(0), Target(1)]
    maps = np.stack([s.map for s in odam.explain(detector, image, targets, trace=trace)])
    again = detector.trace_units(image, trace.detections)
    np.testing.assert_allclose(
        np.stack([s.map for s in odam.explain(detector, image, targets, trace=again)]),
        maps,
        rtol=1e-5,
        atol=1e-7,
    )
    batch = ExplainedBatch(image, maps, targets, trace.detections, [], np.array([-1, -1]))
    result = METRICS.build("sanity", depth=1).compute(batch, detector, odam)
    curve = result.curves["sanity_spearman"]
    assert curve.x_names == ["roi_heads", "rpn", "backbone"]
    assert curve.y.shape == (2, 3)
    assert np.isfinite(result.values["sanity_spearman"]).all(), result.reasons
