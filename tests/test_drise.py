"""D-RISE against the weighted sum computed independently, on the evidence detector (whose
scores, class probabilities and boxes are known by hand), in input and feature space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject
from xaibench.methods.drise import DRISE, FeatureDRISE, RandomMasks

from xaibench.registry import METHODS
from xaibench.types import Target

OBJECTS = [
    EvidenceObject(box=(4, 4, 36, 36), label=1, region=(8, 8, 32, 32)),
    EvidenceObject(box=(20, 8, 60, 40), label=2, region=(40, 12, 56, 36), gain=6, bias=-2),
]
SIZE = (48, 64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def probs(scores: np.ndarray) -> np.ndarray:
    """The evidence detector's class_probs: background 1 - s, own class s."""
    out = np.zeros((len(OBJECTS), 3))
    out[:, 0] = 1 - scores
    out[np.arange(len(OBJECTS)), [o.label for o in OBJECTS]] = scores
    return out


def weights_by_hand(target: int, scores_per_mask: list[np.ndarray], original: np.ndarray):
    p_t = probs(original)[target]
    out = []
    for scores in scores_per_mask:
        p = probs(scores)
        cos = p @ p_t / (np.linalg.norm(p, axis=1) * np.linalg.norm(p_t))
        ious = np.array([iou(OBJECTS[target].box, o.box) for o in OBJECTS])
        out.append(float((ious * cos).max()))
    return np.array(out)


def scores_by_hand(image: np.ndarray) -> np.ndarray:
    out = []
    for o in OBJECTS:
        x1, y1, x2, y2 = o.region
        e = image[y1:y2, x1:x2].astype(np.float64).mean() / 255
        out.append(sigmoid(o.gain * e + o.bias))
    return np.array(out)


@pytest.fixture
def scene() -> tuple[EvidenceDetector, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(100, 256, (*SIZE, 3), dtype=np.uint8)
    masks = rng.uniform(0, 1, (12, *SIZE))
    return EvidenceDetector(OBJECTS), image, masks


@pytest.mark.parametrize("mean_subtraction", [False, True])
def test_given_masks_give_the_weighted_sum(scene, mean_subtraction: bool) -> None:
    detector, image, masks = scene
    drise = DRISE(masks=masks, mean_subtraction=mean_subtraction, batch_size=5, progress=False)
    maps = drise.explain(detector, image, [Target(0), Target(1), Target(0, "x2")])

    original = scores_by_hand(image)
    masked_scores = [scores_by_hand(np.round(image * m[..., None]).astype(np.uint8)) for m in masks]
    for saliency, target in zip(maps, (0, 1), strict=False):
        w = weights_by_hand(target, masked_scores, original)
        expected = np.tensordot(w, masks, axes=1)
        if mean_subtraction:
            expected -= w.mean() * masks.sum(axis=0)
        np.testing.assert_allclose(saliency.map, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(maps[2].map, maps[0].map)  # one map per detection
    assert maps[0].params["masks"] == "given" and maps[0].params["masks_used"] == 12
    assert maps[0].params["signed"] is mean_subtraction


def test_feature_space_with_given_masks(scene) -> None:
    """Masks multiply the stride-4 layer p1, sampled at each cell's centre: the centre of
    cell i lies between pixels 4i + 1 and 4i + 2, so a cell takes their mean."""
    detector, image, masks = scene
    maps = FeatureDRISE(masks=masks, progress=False).explain(
        detector, image, [Target(0), Target(1)]
    )
    p1 = image.astype(np.float64).reshape(12, 4, 16, 4, 3).mean(axis=(1, 3, 4)) / 255
    on_cells = masks[:, 1::4][:, :, 1::4] + masks[:, 2::4][:, :, 1::4]
    on_cells = (on_cells + masks[:, 1::4][:, :, 2::4] + masks[:, 2::4][:, :, 2::4]) / 4
    scores = []
    for cells in on_cells:
        layer = p1 * cells
        scores.append(
            np.array(
                [
                    sigmoid(o.gain * layer[o.region[1] // 4 : o.region[3] // 4,
                                           o.region[0] // 4 : o.region[2] // 4].mean() + o.bias)
                    for o in OBJECTS
                ]
            )
        )  # fmt: skip
    original = scores_by_hand(image)
    for saliency, target in zip(maps, (0, 1), strict=True):
        w = weights_by_hand(target, scores, original)
        np.testing.assert_allclose(saliency.map, np.tensordot(w, masks, axes=1), rtol=1e-4)
    assert maps[0].params["layer"] == "fpn" and FeatureDRISE.access == "white-box"


def test_same_seed_same_map_and_batch_size_does_not_matter(scene) -> None:
    detector, image, _ = scene
    settings = {"n": 40, "grid": 4, "progress": False}
    a = DRISE(seed=3, batch_size=16, **settings).explain(detector, image, [Target(0)])[0]
    b = DRISE(seed=3, batch_size=7, **settings).explain(detector, image, [Target(0)])[0]
    c = DRISE(seed=4, batch_size=16, **settings).explain(detector, image, [Target(0)])[0]
    np.testing.assert_allclose(a.map, b.map, rtol=1e-6)
    assert not np.allclose(a.map, c.map)
    assert a.params["seed"] == 3 and a.params["n"] == 40


def test_random_masks_follow_rise() -> None:
    masks = RandomMasks(400, (50, 70), grid=5, p=0.3, seed=0, upsample="nearest")
    batch = masks.batch(0, 400)
    assert batch.shape == (400, 50, 70)
    assert set(torch.unique(batch).tolist()) <= {0.0, 1.0}
    assert abs(float(batch.mean()) - 0.3) < 0.02  # each cell on with probability p
    # cells of ceil(50/5) x ceil(70/5) px, shifted by less than one cell
    assert masks.cell_size == (10, 14)
    assert int(masks.shifts[:, 0].max()) <= 9 and int(masks.shifts[:, 1].max()) <= 13
    smooth = RandomMasks(10, (50, 70), grid=5, seed=0).batch(0, 10)
    assert float(smooth.min()) >= 0 and float(smooth.max()) <= 1
    assert len(torch.unique(smooth)) > 2  # bilinear upsampling makes soft edges
    torch.testing.assert_close(masks.batch(3, 5), batch[3:5])


def test_early_stopping_records_the_masks_used(scene) -> None:
    detector, image, _ = scene
    settings = {"n": 400, "grid": 4, "batch_size": 20, "progress": False}
    full = DRISE(**settings).explain(detector, image, [Target(0)])[0]
    early = DRISE(tolerance=0.5, min_masks=40, check_every=40, **settings).explain(
        detector, image, [Target(0)]
    )[0]
    assert full.params["masks_used"] == 400
    assert early.params["masks_used"] < 400 and early.params["masks_used"] % 20 == 0
    assert early.params["tolerance"] == 0.5


def test_objectness_term(demo_detector, demo_scene) -> None:
    """FCOS has an objectness (centerness): switching the term off changes the map."""
    detector = demo_detector("synthetic-fcos")
    image = demo_scene(0)
    settings = {"n": 16, "grid": 8, "progress": False}
    on = DRISE(**settings).explain(detector, image, [Target(0)])[0]
    off = DRISE(objectness=False, **settings).explain(detector, image, [Target(0)])[0]
    assert on.map.shape == image.shape[:2] and on.map.min() >= 0
    assert (off.map >= on.map - 1e-4).all() and (off.map > on.map + 1e-3).any()


def test_invalid_settings(scene) -> None:
    detector, image, masks = scene
    with pytest.raises(ValueError, match="p must lie in"):
        DRISE(p=0)
    with pytest.raises(ValueError, match="upsample must be"):
        DRISE(upsample="area")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        DRISE(masks=masks * 2, progress=False).explain(detector, image, [Target(0)])
    with pytest.raises(IndexError, match="out of range"):
        DRISE(masks=masks, progress=False).explain(detector, image, [Target(7)])
    assert METHODS.get("drise") is DRISE and DRISE.access == "black-box"
