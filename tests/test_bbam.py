"""BBAM: the mask shrinks onto the evidence of the hand-built detector; batched optimisation
equals one detection at a time; the loss terms follow the reference code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject, evidence_image
from xaibench.methods.bbam import BBAM, box_deltas, total_variation

from xaibench.registry import METHODS
from xaibench.types import Target


def test_mask_shrinks_onto_the_evidence_region() -> None:
    """Reference hyper-parameters. The perturbation is the reference script's default
    constant fill: the evidence detector's score is linear in the pixels, and blurring a flat
    region keeps its mean, so a blur perturbation would leave its evidence in place."""
    box, region = (120, 120, 200, 200), (136, 136, 184, 184)
    objects = [EvidenceObject(box=box, label=1, region=region)]
    detector = EvidenceDetector(objects)
    image = evidence_image(objects, size=(320, 320), background=40, foreground=220)
    start = BBAM(iterations=0).explain(detector, image, [Target(0)])[0].map
    final = BBAM(perturbation="constant", progress=False).explain(detector, image, [Target(0)])
    heat = final[0].map

    inside = np.zeros(heat.shape, dtype=bool)
    inside[region[1] : region[3], region[0] : region[2]] = True
    in_box = np.zeros(heat.shape, dtype=bool)
    in_box[box[1] : box[3], box[0] : box[2]] = True
    assert heat.min() >= 0 and heat.max() <= 1
    assert start[inside].sum() / start.sum() < 0.4  # the initial mask covers the box
    assert heat[inside].sum() / heat.sum() > 0.75  # most of the final mask is the evidence
    assert heat.sum() < 0.5 * start.sum()
    assert heat[~in_box].max() < 0.05 and heat[in_box & ~inside].mean() < 0.1
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert inside[y, x]
    assert final[0].params["iterations"] == 300 and final[0].params["lr"] == 0.02


def test_initial_mask_follows_the_reference_stride() -> None:
    """stride = 16 + 48 sqrt(box area / image area); 1 on the box's cells."""
    bbam = BBAM()
    mask = bbam.initial_mask(torch.tensor([80.0, 40.0, 160.0, 120.0]), (320, 320))
    stride = 16 + 48 * np.sqrt(80 * 80 / 320**2)  # 28 px
    assert mask.shape == (int(320 / stride),) * 2 == (11, 11)
    expected = torch.zeros(11, 11)
    expected[int(40 / stride) : int(120 / stride), int(80 / stride) : int(160 / stride)] = 1
    torch.testing.assert_close(mask, expected)


def test_batched_equals_one_at_a_time(demo_detector, demo_scene) -> None:
    detector = demo_detector("synthetic-fcos")
    image = demo_scene(0)
    trace = detector.trace(image)
    targets = [Target(0), Target(1), Target(2), Target(1, "x1")]
    together = BBAM(iterations=6, batch_size=3, progress=False).explain(
        detector, image, targets, trace=trace
    )
    alone = BBAM(iterations=6, batch_size=1, progress=False).explain(
        detector, image, targets, trace=trace
    )
    start = BBAM(iterations=0).explain(detector, image, targets, trace=trace)
    for a, b, s in zip(together, alone, start, strict=True):
        np.testing.assert_allclose(a.map, b.map, atol=1e-5)
        assert np.abs(a.map - s.map).max() > 0.01  # the masks did move
    np.testing.assert_array_equal(together[3].map, together[1].map)  # one mask per detection


def test_loss_terms() -> None:
    mask = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    # vertical |0-.5|^3 + |1-0|^3, horizontal |0-1|^3 + |.5-0|^3, diagonals twice each
    expected = (0.125 + 1) + (1 + 0.125) + 2 * 0.0 + 2 * 0.125
    assert float(total_variation(mask, 3)) == pytest.approx(expected)
    reference = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size 20 x 40
    moved = torch.tensor([[12.0, 20.0, 32.0, 60.0]])  # centre x + 2
    wider = torch.tensor([[0.0, 20.0, 40.0, 60.0]])  # width x 2
    torch.testing.assert_close(box_deltas(reference, reference), torch.zeros(1, 4))
    torch.testing.assert_close(box_deltas(moved, reference), torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(
        box_deltas(wider, reference), torch.tensor([[0.0, 0, 5 * float(np.log(2)), 0]])
    )


def test_registered_and_validated() -> None:
    assert METHODS.get("bbam") is BBAM and BBAM.access == "white-box"
    with pytest.raises(ValueError, match="perturbation must be"):
        BBAM(perturbation="noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blur_kernel must be an odd"):
        BBAM(blur_kernel=4)
    detector = EvidenceDetector([EvidenceObject(box=(0, 0, 8, 8), label=1, region=(0, 0, 8, 8))])
    with pytest.raises(IndexError, match="out of range"):
        BBAM(iterations=1).explain(detector, np.zeros((8, 8, 3), np.uint8), [Target(3)])
