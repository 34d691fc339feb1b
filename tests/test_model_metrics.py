"""Deletion and insertion with the hand-built evidence detector, whose score is a known function
of the pixels: every point of the curves is recomputed here from that formula."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import trapezoid
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject

from xaibench.metric import ExplainedBatch
from xaibench.registry import METRICS
from xaibench.types import Instance, Target

SIZE = (48, 64)
OBJECT = EvidenceObject(box=(8, 8, 40, 40), label=1, region=(12, 12, 36, 36))
OTHER = EvidenceObject(box=(44, 4, 60, 44), label=2, region=(48, 8, 56, 40))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def score_of(image: np.ndarray, o: EvidenceObject = OBJECT) -> float:
    """The evidence detector's documented formula."""
    x1, y1, x2, y2 = o.region
    patch = image[y1:y2, x1:x2].astype(np.float64) / 255.0
    return sigmoid(o.gain * float((patch * np.asarray(o.colour)).sum(axis=2).mean()) + o.bias)


@pytest.fixture(scope="module")
def detector() -> EvidenceDetector:
    return EvidenceDetector([OBJECT, OTHER], stride=4)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 60, (*SIZE, 3)).astype(np.uint8)
    x1, y1, x2, y2 = OBJECT.region
    image[y1:y2, x1:x2] = rng.integers(180, 256, (y2 - y1, x2 - x1, 3))
    return image


def good_map() -> np.ndarray:
    """Distinct values, highest on the evidence region (so the ranking is unambiguous)."""
    heat = np.arange(SIZE[0] * SIZE[1], dtype=np.float64).reshape(SIZE)[::-1, ::-1] / 1e4
    x1, y1, x2, y2 = OBJECT.region
    heat[y1:y2, x1:x2] += 10.0
    return heat.astype(np.float32)


def bad_map() -> np.ndarray:
    """Highest far from the evidence: the region comes last in the ranking."""
    heat = good_map()
    x1, y1, x2, y2 = OBJECT.region
    heat[y1:y2, x1:x2] -= 20.0
    return heat


def batch(image: np.ndarray, maps: list[np.ndarray], detector: EvidenceDetector) -> ExplainedBatch:
    (det,) = detector.detect([image])
    truth = [Instance(np.array(OBJECT.box, np.float32), 1), Instance(np.array(OTHER.box), 2)]
    return ExplainedBatch(
        image=image,
        maps=np.stack(maps),
        targets=[Target(0)] * len(maps),
        detections=det,
        instances=truth,
        gt_index=np.zeros(len(maps), dtype=int),
    )


def expected_curve(image: np.ndarray, heat: np.ndarray, mode: str, seed: int = 0) -> np.ndarray:
    """The official protocol written out: 100 steps of floor(32 * 32 / 100) = 10 pixels, the
    detector read every 10 steps; deletion fills uniform noise, insertion starts black."""
    order = np.argsort(-heat.astype(np.float64).ravel(), kind="stable")
    noise = np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
    start, source = (image, noise) if mode == "deletion" else (np.zeros_like(image), image)
    scores = []
    for step in range(0, 101, 10):
        current = start.copy().reshape(-1, 3)
        current[order[: step * 10]] = source.reshape(-1, 3)[order[: step * 10]]
        scores.append(score_of(current.reshape(image.shape)))
    scores = np.asarray(scores)
    return scores / scores[0] if mode == "deletion" else scores


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curves_follow_the_detector_formula(mode: str, detector, scene) -> None:
    result = METRICS.build(mode).compute(batch(scene, [good_map(), bad_map()], detector), detector)
    curve = result.curves[mode]
    np.testing.assert_allclose(curve.x, np.linspace(0, 1, 11))
    for row, heat in enumerate([good_map(), bad_map()]):
        expected = expected_curve(scene, heat, mode)
        np.testing.assert_allclose(curve.y[row], expected, rtol=1e-4)
        assert result.values[mode][row] == pytest.approx(
            trapezoid(expected, np.linspace(0, 1, 11)) * 100, rel=1e-4
        )
    good, bad = result.values[mode]
    if mode == "deletion":  # deleting the evidence first drops the score (noise: to ~half)
        assert good < 80 and bad == pytest.approx(100, abs=1e-3)
    else:  # inserting it first raises the score fastest; the background alone does nothing
        assert good > 50 > 1 > bad


def test_whole_image_protocol_uses_every_pixel_and_a_black_baseline(detector, scene) -> None:
    """48 * 64 = 3072 pixels in 100 steps: 31 per step (the last step covers the image)."""
    metric = METRICS.build("deletion", protocol="whole-image")
    result = metric.compute(batch(scene, [good_map()], detector), detector)
    order = np.argsort(-good_map().astype(np.float64).ravel(), kind="stable")
    expected = []
    for step in range(0, 101, 10):
        current = scene.copy().reshape(-1, 3)
        current[order[: min(step * 31, 3072)]] = 0
        expected.append(score_of(current.reshape(scene.shape)))
    expected = np.asarray(expected) / expected[0]
    np.testing.assert_allclose(result.curves["deletion"].y[0], expected, rtol=1e-4)
    assert expected[-1] == pytest.approx(sigmoid(-5) / score_of(scene))


def test_score_needs_same_class_and_overlap(detector, scene) -> None:
    """Explaining the second object's box with the first object's class: no prediction
    qualifies, so the insertion curve is zero everywhere."""
    (det,) = detector.detect([scene])
    truth = [Instance(np.array(OTHER.box, np.float32), 1)]  # right box, wrong class
    b = ExplainedBatch(scene, good_map()[None], [Target(0)], det, truth, np.array([0]))
    result = METRICS.build("insertion").compute(b, detector)
    assert (result.curves["insertion"].y == 0).all()


def test_all_perturbations_run_in_few_forward_passes(detector, scene) -> None:
    """Two maps, 11 points each, share step 0: 21 images, in ceil(21 / 16) = 2 passes."""
    calls = []
    original = detector.detect

    def counting(images, batch_size=8, nms=True):
        calls.append(len(images))
        return original(images, batch_size=batch_size, nms=nms)

    detector.detect = counting
    try:
        METRICS.build("deletion", batch_size=16).compute(
            batch(scene, [good_map(), bad_map()], detector), detector
        )
    finally:
        del detector.detect
    assert calls[1:] == [16, 5]  # calls[0] is the batch helper's own detection


def test_constant_map_and_undetected_target_give_nan_with_reasons(detector) -> None:
    black = np.zeros((*SIZE, 3), np.uint8)  # the object scores sigmoid(-5) > 0: detected
    maps = [np.ones(SIZE, np.float32), good_map()]
    result = METRICS.build("deletion").compute(batch(black, maps, detector), detector)
    assert np.isnan(result.values["deletion"][0])
    assert result.reasons["deletion"][0] == "constant map"
    assert np.isfinite(result.values["deletion"][1])
    far = ExplainedBatch(
        black,
        good_map()[None],
        [Target(0)],
        detector.detect([black])[0],
        [Instance(np.array([0, 0, 4, 4], np.float32), 1)],  # no prediction overlaps it
        np.array([0]),
    )
    result = METRICS.build("deletion").compute(far, detector)
    assert np.isnan(result.values["deletion"][0])
    assert "not detected" in result.reasons["deletion"][0]


def test_model_metrics_need_the_detector(scene, detector) -> None:
    with pytest.raises(ValueError, match="needs the detector"):
        METRICS.build("insertion").compute(batch(scene, [good_map()], detector))


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="eval_every"):
        METRICS.build("deletion", steps=100, eval_every=7)
    with pytest.raises(ValueError, match="odam, whole-image"):
        METRICS.build("insertion", protocol="rise")
