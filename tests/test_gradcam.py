"""Grad-CAM and Grad-CAM++ against independent computations: by hand on the evidence
detector, and with torchvision's own modules and plain autograd on FCOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject
from xaibench.methods.gradcam import GradCAM, GradCAMPlusPlus

from xaibench.registry import METHODS
from xaibench.types import ATTRIBUTES, Target

OBJECTS = [
    EvidenceObject(box=(8, 8, 60, 60), label=1, region=(16, 16, 48, 48), colour=(0.6, 0.3, 0.1)),
    EvidenceObject(box=(70, 70, 120, 110), label=1, region=(80, 76, 112, 100), gain=3, bias=0),
]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def cam_reference(grad: torch.Tensor, layer: torch.Tensor, plus_plus: bool) -> torch.Tensor:
    """The layer map (h, w) of one target from its gradient and the layer (C, h, w)."""
    if plus_plus:
        sums = layer.sum(dim=(1, 2), keepdim=True)
        alpha = grad**2 / (2 * grad**2 + sums * grad**3)
        alpha = torch.nan_to_num(alpha * (grad != 0))
        weights = (alpha * grad.clamp(min=0)).sum(dim=(1, 2))
    else:
        weights = grad.mean(dim=(1, 2))
    return torch.relu((weights[:, None, None] * layer).sum(0))


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
def test_evidence_detector_by_hand(method) -> None:
    detector = EvidenceDetector(OBJECTS, stride=4)
    image = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    maps = method().explain(detector, image, [Target(0), Target(1)])

    pixels = torch.from_numpy(image).permute(2, 0, 1).double()[None] / 255
    layer = F.avg_pool2d(pixels, 4).requires_grad_(True)  # (1, 3, 32, 32)
    for saliency, o in zip(maps, OBJECTS, strict=True):
        x1, y1, x2, y2 = (v // 4 for v in o.region)
        evidence = (layer[0, :, y1:y2, x1:x2].mean(dim=(1, 2)) * torch.tensor(o.colour)).sum()
        score = torch.sigmoid(o.gain * evidence + o.bias)
        (grad,) = torch.autograd.grad(score, layer)
        layer_map = cam_reference(grad[0], layer[0].detach(), method is GradCAMPlusPlus)
        expected = F.interpolate(layer_map[None, None], size=(128, 128), mode="bilinear")[0, 0]
        np.testing.assert_allclose(saliency.map, expected.numpy(), rtol=1e-4, atol=1e-7)
        assert saliency.map.max() > 0 and saliency.method == method.name


def test_two_objects_of_one_colour_get_the_same_gradcam() -> None:
    """Grad-CAM weights channels, not places: same-colour objects share the map."""
    objects = [EvidenceObject(box=(0, 0, 40, 40), label=1, region=(8, 8, 32, 32)),
               EvidenceObject(box=(60, 0, 100, 40), label=1, region=(68, 8, 92, 32))]  # fmt: skip
    detector = EvidenceDetector(objects)
    image = np.random.default_rng(2).integers(0, 256, (48, 104, 3), dtype=np.uint8)
    a, b = GradCAM().explain(detector, image, [Target(0), Target(1)])
    assert pearson(a.map, b.map) > 0.999


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
def test_fcos_against_torchvision_autograd(method, random_image: np.ndarray) -> None:
    """Exact mode on an FPN level and on a backbone module by dotted name, recomputed with
    torchvision's own FCOS modules, a forward hook and plain autograd."""
    model, detector = build("fcos")
    trace = detector.trace(random_image)
    p = trace.detections.provenance
    picks = torch.where(p.level == p.level[0])[0][:3].tolist()

    image = torch.from_numpy(random_image).permute(2, 0, 1) / 255.0
    images, _ = model.transform([image])
    captured = {}
    hook = model.backbone.body.layer3.register_forward_hook(
        lambda _m, _i, out: captured.setdefault("layer3", out)
    )
    features = list(model.backbone(images.tensors).values())
    hook.remove()
    head = model.head(features)
    offsets = np.cumsum([0, *(f.shape[-2] * f.shape[-1] for f in features)])
    (h, w), (oh, ow) = images.image_sizes[0], random_image.shape[:2]
    pad_h, pad_w = images.tensors.shape[-2:]

    def reference(score: torch.Tensor, layer: torch.Tensor) -> np.ndarray:
        (grad,) = torch.autograd.grad(score, layer, retain_graph=True)
        layer_map = cam_reference(grad[0], layer[0].detach(), method is GradCAMPlusPlus)
        full = F.interpolate(layer_map[None, None], size=(pad_h, pad_w), mode="bilinear")
        return F.interpolate(full[..., :h, :w], size=(oh, ow), mode="bilinear")[0, 0].numpy()

    nonzero = 0
    for layer_name in ("fpn", "module:backbone.body.layer3"):
        ours = method(layer=layer_name, mode="exact").explain(
            detector, random_image, [Target(i) for i in picks], trace=trace
        )
        for i, saliency in zip(picks, ours, strict=True):
            level = int(p.level[i])
            flat = offsets[level] + int(p.y[i]) * features[level].shape[-1] + int(p.x[i])
            score = torch.sqrt(
                torch.sigmoid(head["cls_logits"][0, flat, int(p.class_index[i])])
                * torch.sigmoid(head["bbox_ctrness"][0, flat, 0])
            )
            layer = features[level] if layer_name == "fpn" else captured["layer3"]
            expected = reference(score, layer)
            if expected.max() == 0:  # nothing survives the ReLU
                assert saliency.map.max() <= 1e-6
                continue
            nonzero += 1
            assert pearson(saliency.map, expected) > 0.99, (layer_name, i)
            assert saliency.map.max() == pytest.approx(expected.max(), rel=0.05)
    assert nonzero >= 2


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
@pytest.mark.parametrize("family", ["retinanet", "frcnn"])
def test_fast_windows_give_the_whole_layer_weights(method, family, random_image) -> None:
    """RetinaNet v1 (no GroupNorm) and Faster R-CNN: the windowed gradients are the exact
    ones, so fast and exact maps agree, for every attribute and on every level. Grad-CAM++'s
    alpha has a pole where 2 + sum(A) g = 0, which magnifies float32 rounding (1e-7) of
    gradients near it to about 1e-2 of a weight: its tolerance is wider."""
    _, detector = build(family)
    trace = detector.trace(random_image)
    level = trace.detections.provenance.level
    picked = [int(torch.where(level == lv)[0][0]) for lv in level.unique()]
    targets = [Target(i, a) for i in picked for a in ATTRIBUTES]
    fast = method().explain(detector, random_image, targets, trace=trace)
    exact = method(mode="exact").explain(detector, random_image, targets, trace=trace)
    rtol = 2e-2 if method is GradCAMPlusPlus else 1e-3
    for f, e in zip(fast, exact, strict=True):
        np.testing.assert_allclose(f.map, e.map, rtol=rtol, atol=rtol * e.map.max() + 1e-12)
    assert any(e.map.max() > 0 for e in exact)


def test_roi_layer_uses_each_rois_own_grid(random_image: np.ndarray) -> None:
    _, detector = build("frcnn")
    trace = detector.trace(random_image)
    targets = [Target(i) for i in range(3)]
    fast = GradCAM(layer="roi").explain(detector, random_image, targets, trace=trace)
    exact = GradCAM(layer="roi", mode="exact").explain(detector, random_image, targets, trace=trace)
    rois = trace.detections.provenance.proposal_box[:3]
    height, width = random_image.shape[:2]
    centres_y, centres_x = np.mgrid[:height, :width] + 0.5
    for f, e, roi in zip(fast, exact, rois, strict=True):
        np.testing.assert_allclose(f.map, e.map, rtol=1e-4, atol=1e-6 * e.map.max() + 1e-12)
        x1, y1, x2, y2 = roi.tolist()
        inside = (centres_x >= x1) & (centres_x <= x2) & (centres_y >= y1) & (centres_y <= y2)
        assert f.map[~inside].max(initial=0) == 0  # the grid covers its RoI only


def test_combined_and_registry(random_image: np.ndarray) -> None:
    _, detector = build("fcos")
    trace = detector.trace(random_image)
    (combined,) = GradCAM().explain(detector, random_image, [Target(0, "combined")], trace=trace)
    five = GradCAM().explain(
        detector, random_image, [Target(0, a) for a in ATTRIBUTES], trace=trace
    )
    np.testing.assert_allclose(combined.map, np.max([s.map for s in five], axis=0))
    assert METHODS.get("gradcam") is GradCAM and METHODS.get("gradcampp") is GradCAMPlusPlus
    assert GradCAM.access == "white-box" and combined.params == {"layer": "fpn", "mode": "fast"}
