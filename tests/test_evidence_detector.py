"""The hand-built evidence detector: its scores, gradients and perturbation views follow the
formula in its docstring, computed here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xaibench.detectors.evidence import (
    TOY_OBJECTS,
    EvidenceDetector,
    EvidenceObject,
    evidence_image,
)

from xaibench.registry import DETECTORS
from xaibench.types import Target

OBJECTS = [
    EvidenceObject(box=(10, 12, 50, 60), label=1, region=(8, 16, 40, 48)),
    EvidenceObject(
        box=(60, 5, 90, 40), label=2, region=(64, 8, 88, 32), gain=4.0, bias=-1.0,
        colour=(1.0, 0.0, 0.0),
    ),
]  # fmt: skip


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def expected_score(image: np.ndarray, o: EvidenceObject) -> float:
    x1, y1, x2, y2 = o.region
    patch = image[y1:y2, x1:x2].astype(np.float64) / 255.0
    evidence = float((patch * np.asarray(o.colour)).sum(axis=2).mean())
    return sigmoid(o.gain * evidence + o.bias)


@pytest.fixture
def detector() -> EvidenceDetector:
    return EvidenceDetector(OBJECTS, stride=4)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (70, 99, 3), dtype=np.uint8)


def test_scores_follow_the_formula(detector: EvidenceDetector, image: np.ndarray) -> None:
    (det,) = detector.detect([image])
    expected = [expected_score(image, o) for o in OBJECTS]
    np.testing.assert_allclose(det.scores.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(det.boxes.numpy(), [o.box for o in OBJECTS])
    assert det.labels.tolist() == [1, 2]
    assert det.image_size == (70, 99)
    assert det.objectness is None
    # class_probs: background 1 - s, own class s, others 0
    np.testing.assert_allclose(det.class_probs[:, 0].numpy(), 1 - np.asarray(expected), rtol=1e-5)
    assert det.class_probs[0, 2] == 0 and det.class_probs[1, 1] == 0
    np.testing.assert_allclose(det.class_probs[[0, 1], [1, 2]].numpy(), expected, rtol=1e-5)
    # provenance: the p1 cell holding the region centre
    assert det.provenance.y.tolist() == [32 // 4, 20 // 4]
    assert det.provenance.x.tolist() == [24 // 4, 76 // 4]
    assert det.provenance.class_index.tolist() == [1, 2]


def test_score_depends_only_on_its_region(detector: EvidenceDetector, image: np.ndarray) -> None:
    outside = image.copy()
    outside[:, 40:60] = 0  # between the two regions
    outside[50:] = 255
    inside = image.copy()
    inside[16:48, 8:40] = 255  # object 0's region, brighter
    base, out_changed, in_changed = detector.detect([image, outside, inside], batch_size=2)
    torch.testing.assert_close(out_changed.scores, base.scores)
    assert in_changed.scores[0] > base.scores[0]
    assert in_changed.scores[1] == base.scores[1]


def test_batches_and_image_sizes(detector: EvidenceDetector, image: np.ndarray) -> None:
    images = [image, image[:64, :96], np.ascontiguousarray(image[::-1])]
    together = detector.detect(images, batch_size=3)
    alone = [detector.detect([im])[0] for im in images]
    for a, b, im in zip(together, alone, images, strict=True):
        torch.testing.assert_close(a.scores, b.scores)
        assert a.image_size == im.shape[:2]


def test_gradients_on_p1_are_the_analytic_ones(
    detector: EvidenceDetector, image: np.ndarray
) -> None:
    trace = detector.trace(image)
    assert trace.layer_names()[:2] == ["fpn", "p1"]
    targets = [Target(0, "score"), Target(1, "score"), Target(1, "x2")]
    (fast,) = trace.gradients(targets, "fpn", mode="fast")
    (exact,) = trace.gradients(targets, "p1", mode="exact")
    torch.testing.assert_close(fast.gradients, exact.gradients)
    assert fast.layer == "p1" and fast.layer_size == (18, 25)  # 70 x 99 padded to 72 x 100
    for k, o in enumerate(OBJECTS):
        s = float(trace.detections.scores[k])
        x1, y1, x2, y2 = (v // 4 for v in o.region)
        expected = torch.zeros(3, 18, 25)
        cells = (y2 - y1) * (x2 - x1)
        expected[:, y1:y2, x1:x2] = (
            s * (1 - s) * o.gain * torch.tensor(o.colour)[:, None, None] / cells
        )
        torch.testing.assert_close(fast.gradients[k], expected, rtol=1e-4, atol=1e-9)
    assert fast.gradients[2].abs().max() == 0  # the box is fixed
    # the layer is the 4 x 4 average of the image in [0, 1]
    p1 = image[:68, :96].reshape(17, 4, 24, 4, 3).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(
        fast.layer_activations[:, :17, :24].permute(1, 2, 0).numpy(), p1, rtol=1e-5
    )
    values = trace.target_values(targets)
    np.testing.assert_allclose(values[:2].numpy(), trace.detections.scores.numpy(), rtol=1e-6)
    assert float(values[2]) == 90.0


def test_module_layer_and_unknown_layer(detector: EvidenceDetector, image: np.ndarray) -> None:
    trace = detector.trace(image)
    (by_module,) = trace.gradients([Target(0)], "module:p1")
    (by_level,) = trace.gradients([Target(0)], "p1")
    torch.testing.assert_close(by_module.gradients, by_level.gradients)
    with pytest.raises(KeyError, match="known: fpn, p1"):
        trace.gradients([Target(0)], "p2")
    with pytest.raises(IndexError, match="out of range"):
        trace.gradients([Target(5)])


def test_to_image_places_region_cells_on_the_region(detector: EvidenceDetector) -> None:
    trace = detector.trace(np.zeros((64, 96, 3), dtype=np.uint8))
    (w,) = trace.gradients([Target(0)])
    layer_map = torch.zeros(1, 16, 24)
    layer_map[0, 4:12, 2:10] = 1.0  # cells of region (8, 16, 40, 48)
    image_map = trace.to_image(w, layer_map)[0]
    assert image_map.shape == (64, 96)
    assert torch.all(image_map[18:46, 10:38] == 1)  # well inside the region
    assert image_map[:, 44:].max() == 0 and image_map[52:].max() == 0


def test_feature_masks(detector: EvidenceDetector, image: np.ndarray) -> None:
    trace = detector.trace(image)
    ones = torch.ones(1, 70, 99)
    region_off = torch.ones(1, 70, 99)
    region_off[0, 16:48, 8:40] = 0  # object 0's region
    half = torch.ones(1, 70, 99)
    half[0, :, :24] = 0.5  # the left half of object 0's region (cells 2..5 of 2..9)
    plain, off, halved = trace.detect_with_feature_masks(
        torch.cat([ones, region_off, half]), batch_size=2
    )
    torch.testing.assert_close(plain.scores, trace.detections.scores)
    assert float(off.scores[0]) == pytest.approx(sigmoid(OBJECTS[0].bias), rel=1e-5)
    assert float(off.scores[1]) == pytest.approx(float(plain.scores[1]), rel=1e-6)
    # e scales by 0.5 on the left half of the region's cells
    patch = image[16:48, 8:40].astype(np.float64).mean(axis=2) / 255.0
    patch[:, :16] *= 0.5
    assert float(halved.scores[0]) == pytest.approx(sigmoid(10 * patch.mean() - 5), rel=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        trace.detect_with_feature_masks(2 * ones)
    with pytest.raises(KeyError, match="feature masks apply"):
        trace.detect_with_feature_masks(ones, layer="module:p1")


def test_provenance_outputs_are_differentiable(
    detector: EvidenceDetector, image: np.ndarray
) -> None:
    trace = detector.trace(image)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    images = torch.stack([pixels, pixels * 0.5]).requires_grad_(True)
    scores, boxes = trace.provenance_outputs(images, [0, 0])
    values = scores.detach()
    darker = detector.detect([np.round(image * 0.5).astype(np.uint8)])[0].scores[0]
    assert float(values[0]) == pytest.approx(float(trace.detections.scores[0]), rel=1e-6)
    assert float(values[1]) == pytest.approx(float(darker), rel=1e-2)
    np.testing.assert_array_equal(boxes.detach().numpy(), [OBJECTS[0].box] * 2)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    support = grad.abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(70, 99, dtype=torch.bool)
    expected[16:48, 8:40] = True
    assert torch.equal(support, expected)


def test_invalid_objects_and_images() -> None:
    with pytest.raises(ValueError, match="stride-4 grid"):
        EvidenceDetector([EvidenceObject(box=(0, 0, 9, 9), label=1, region=(1, 0, 8, 8))])
    with pytest.raises(ValueError, match="label 0 must lie in"):
        EvidenceDetector([EvidenceObject(box=(0, 0, 9, 9), label=0, region=(0, 0, 8, 8))])
    with pytest.raises(ValueError, match="at least one"):
        EvidenceDetector([])
    detector = EvidenceDetector(OBJECTS)
    with pytest.raises(ValueError, match="does not fit in an image of 30 x 99"):
        detector.detect([np.zeros((30, 99, 3), dtype=np.uint8)])


def test_registered_toy_with_its_scene() -> None:
    detector = DETECTORS.build("evidence-toy")
    assert detector.class_names == ["__background__", "object", "other"]
    image = evidence_image()
    (det,) = detector.detect([image])
    assert len(det) == len(TOY_OBJECTS) and det.scores.min() > 0.98
    np.testing.assert_allclose(
        det.scores.numpy(), [expected_score(image, o) for o in TOY_OBJECTS], rtol=1e-5
    )


def test_parameters_are_the_gains_and_biases(detector: EvidenceDetector, image) -> None:
    module = detector.torch_module()
    names = dict(module.named_parameters())
    assert set(names) == {"gain", "bias"}
    with torch.no_grad():
        names["gain"].zero_()  # no evidence read: every score is sigmoid(bias)
    (det,) = detector.detect([image])
    np.testing.assert_allclose(det.scores.numpy(), sigmoid(np.array([-5.0, -1.0])), rtol=1e-6)
