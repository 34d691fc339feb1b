"""Targets decided once (``xaibench.targets``): the built-in kinds on known outputs, and a new
kind (another class's probability) added as one callable, explained on the evidence detector
whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build
from xaibench.detectors.evidence import build_evidence_toy, evidence_image
from xaibench.methods.odam import ODAM

from xaibench.targets import ClassProbability, UnitOutputs, target_values
from xaibench.types import Target


def test_builtin_kinds_read_score_and_outward_box_edges() -> None:
    # row t holds the outputs of target t's unit (targets 0 and 2 share detection 0's unit)
    box0, box1 = [10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]
    outputs = UnitOutputs(
        score=torch.tensor([0.9, 0.2, 0.9, 0.2]), box=torch.tensor([box0, box1, box0, box1])
    )
    targets = [Target(0, "score"), Target(1, "x1"), Target(0, "y1"), Target(1, "y2")]
    values = target_values(targets, outputs)
    assert values.tolist() == pytest.approx([0.9, -1.0, -20.0, 4.0])


def test_a_callable_kind_is_one_object() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    outputs = UnitOutputs(torch.tensor([0.7, 0.4]), torch.zeros(2, 4), probs)
    values = target_values(
        [Target(0, ClassProbability(2)), Target(1, ClassProbability(0))], outputs
    )
    assert values.tolist() == pytest.approx([0.2, 0.5])
    best = Target(1, lambda o: o.class_probs.max(1).values)  # any callable is a kind
    assert target_values([best, best], outputs).tolist() == pytest.approx([0.7, 0.5])


def test_bad_outputs_and_kinds_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"box \(T, 4\)"):
        UnitOutputs(torch.zeros(2), torch.zeros(3, 4))
    outputs = UnitOutputs(torch.zeros(1), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="expand 'combined' first"):
        target_values([Target(0, "combined")], outputs)
    with pytest.raises(ValueError, match="no class probabilities"):
        target_values([Target(0, ClassProbability(1))], outputs)
    with pytest.raises(ValueError, match="2 targets but outputs of 1"):
        target_values([Target(0), Target(0)], outputs)
    with pytest.raises(ValueError, match="or a callable target kind"):
        Target(0, "width")  # type: ignore[arg-type]


def test_another_class_probability_through_the_evidence_detector() -> None:
    """The evidence detector's class_probs: column 0 = 1 - score_k, column label_k = score_k.
    So the background probability of object 0 is 1 - its score, its gradient the score's
    gradient negated, and a class it does not have has probability 0 and no gradient."""
    detector = build_evidence_toy()
    image = evidence_image()
    trace = detector.trace(image)
    score = float(trace.detections.scores[0])
    background, other = Target(0, ClassProbability(0)), Target(0, ClassProbability(2))
    values = trace.target_values([Target(0), background, other])
    assert values.tolist() == pytest.approx([score, 1 - score, 0.0], abs=1e-6)
    (windows,) = trace.gradients([Target(0), background, other], mode="exact")
    g = windows.gradients
    assert g[0].abs().sum() > 0
    torch.testing.assert_close(g[1], -g[0])
    assert g[2].abs().sum() == 0
    # ODAM of "not the background" (negated direction) is ODAM of the score: same evidence
    odam_score = ODAM().explain(detector, image, [Target(0)], trace)[0].map
    odam_bg = ODAM(direction="negative").explain(detector, image, [background], trace)[0].map
    np.testing.assert_allclose(odam_bg, odam_score, rtol=1e-5, atol=1e-7)
    x1, y1, x2, y2 = detector.objects[0].region  # and all of it on the region (+ one cell)
    s = detector.stride
    assert odam_score[y1 - s : y2 + s, x1 - s : x2 + s].sum() > 0.999 * odam_score.sum()


def wrapper(family: str):
    """A torchvision wrapper of conftest, or a small detectron2 one (``d2_<architecture>``)."""
    if not family.startswith("d2_"):
        return build(family)[1]
    pytest.importorskip("detectron2")
    from xaibench.detectors import detectron2 as d2

    torch.manual_seed(0)
    config = d2.small_config(family.removeprefix("d2_"), 3)
    return d2.build(config, class_names=["circle", "square", "triangle"], score_thresh=0.0)


@pytest.mark.parametrize("family", ["fcos", "retinanet", "frcnn", "d2_faster_rcnn", "d2_retinanet"])
def test_class_probability_targets_read_the_detections_class_probs(family, random_image) -> None:
    """Every wrapper gives its units' class probabilities in the columns of
    ``Detections.class_probs``: the target ``ClassProbability(label)`` of a detection is its
    class_probs entry, and that of its own label is its score."""
    detector = wrapper(family)
    trace = detector.trace(random_image)
    det = trace.detections
    rows = list(range(min(4, len(det))))
    other = [int(det.labels[i]) % (detector.num_classes - 1) + 1 for i in rows]
    targets = [Target(i, ClassProbability(int(det.labels[i]))) for i in rows]
    targets += [Target(i, ClassProbability(c)) for i, c in zip(rows, other, strict=True)]
    values = trace.target_values(targets)
    expected = [float(det.class_probs[t.index, t.attribute.label]) for t in targets]
    assert values.tolist() == pytest.approx(expected, abs=1e-5)
    assert values[: len(rows)].tolist() == pytest.approx(det.scores[rows].tolist(), abs=1e-5)
