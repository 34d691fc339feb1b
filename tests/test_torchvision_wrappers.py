"""The torchvision wrappers give torchvision's own detections, plus class_probs and provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build
from torchvision.models import detection as tvd
from xaibench.detectors.torchvision import wrap

from xaibench.registry import DETECTORS, UnknownNameError


def torchvision_outputs(model, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])


def torchvision_output(model, image: np.ndarray) -> dict[str, torch.Tensor]:
    return torchvision_outputs(model, [image])[0]


def test_detections_equal_torchvision(family: str, random_image: np.ndarray) -> None:
    model, detector = build(family)
    images = [random_image, np.ascontiguousarray(random_image[20:, 30:][:, ::-1])]  # two sizes
    ours = detector.detect(images, batch_size=2)
    refs = torchvision_outputs(model, images)  # the same batch, so the same padding
    for image, det, ref in zip(images, ours, refs, strict=True):
        assert len(det) == len(ref["boxes"]) > 0
        torch.testing.assert_close(det.boxes, ref["boxes"])
        torch.testing.assert_close(det.scores, ref["scores"])
        assert torch.equal(det.labels, ref["labels"])
        # class_probs hold the full distribution; the detection's own entry is its score
        rows = torch.arange(len(det))
        torch.testing.assert_close(det.class_probs[rows, det.labels], det.scores)
        assert det.image_size == image.shape[:2]


def test_one_stage_score_rederived_from_provenance(random_image: np.ndarray) -> None:
    """Recompute each score from torchvision's own head output at the recorded cell."""
    model, detector = build("fcos")
    det = detector.detect([random_image])[0]
    with torch.no_grad():
        images, _ = model.transform([torch.from_numpy(random_image).permute(2, 0, 1) / 255.0])
        features = list(model.backbone(images.tensors).values())
        head = model.head(features)  # flat (1, sum h*w*A, K), torchvision's order
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    offsets = np.cumsum([0, *sizes])
    p = det.provenance
    for i in range(len(det)):
        level, y, x = int(p.level[i]), int(p.y[i]), int(p.x[i])
        flat = offsets[level] + y * features[level].shape[-1] + x
        cls = torch.sigmoid(head["cls_logits"][0, flat, int(p.class_index[i])])
        ctr = torch.sigmoid(head["bbox_ctrness"][0, flat, 0])
        torch.testing.assert_close(torch.sqrt(cls * ctr), det.scores[i])
    assert detector.feature_levels == ["p3", "p4", "p5", "p6", "p7"]


def test_two_stage_score_rederived_from_provenance(random_image: np.ndarray) -> None:
    """Re-run torchvision's box head on each detection's recorded proposal."""
    model, detector = build("frcnn")
    det = detector.detect([random_image])[0]
    with torch.no_grad():
        images, _ = model.transform([torch.from_numpy(random_image).permute(2, 0, 1) / 255.0])
        features = model.backbone(images.tensors)
        (h, w), (oh, ow) = images.image_sizes[0], random_image.shape[:2]
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
        proposals = det.provenance.proposal_box * scale
        pooled = model.roi_heads.box_roi_pool(features, [proposals], images.image_sizes)
        logits, _ = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    probs = torch.softmax(logits, -1)
    rows = torch.arange(len(det))
    torch.testing.assert_close(
        probs[rows, det.provenance.class_index], det.scores, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(probs, det.class_probs, atol=1e-4, rtol=1e-4)
    assert det.objectness is not None and bool(
        ((det.objectness >= 0) & (det.objectness <= 1)).all()
    )


def test_raw_candidates_include_the_final_detections(random_image: np.ndarray) -> None:
    _, detector = build("retinanet")
    final = detector.detect([random_image])[0]
    raw = detector.detect([random_image], nms=False)[0]
    assert len(raw) > len(final)
    assert all(bool((raw.boxes == b).all(1).any()) for b in final.boxes)


@pytest.mark.parametrize(
    "image",
    [
        np.full((120, 90), 128, np.uint8),  # grayscale
        np.full((120, 90, 4), 200, np.uint8),  # RGBA
        np.full((120, 90, 3), 40000, np.uint16),  # 16-bit
    ],
    ids=["gray", "rgba", "uint16"],
)
def test_odd_images_are_accepted(image: np.ndarray) -> None:
    _, detector = build("fcos")
    (det,) = detector.detect([image])
    assert det.image_size == (120, 90)
    assert det.boxes.shape[1] == 4


def test_no_detections_is_an_empty_result(random_image: np.ndarray) -> None:
    model, detector = build("fcos")
    model.score_thresh = 1.1  # nothing can pass
    (det,) = detector.detect([random_image])
    assert len(det) == 0 and det.class_probs.shape == (0, 4)
    trace = detector.trace(random_image)
    assert len(trace.detections) == 0
    assert trace.gradients([]) == []


def test_wrap_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="expected torchvision FCOS, RetinaNet or FasterRCNN"):
        wrap(torch.nn.Linear(2, 2))


def test_registered_builders_and_unknown_names() -> None:
    assert {"fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn"} <= set(
        DETECTORS.names("*")
    )
    assert DETECTORS.names("*fcos*")[0].startswith("fcos") or "fcos" in DETECTORS.names("*fcos*")[0]
    with pytest.raises(
        UnknownNameError, match=r"Did you mean 'fcos_resnet50_fpn'\?.*Known detectors"
    ):
        DETECTORS.get("fcos_resnet50")


def test_registered_builders_pass_wrapper_options() -> None:
    detector = DETECTORS.build("fcos_resnet50_fpn", min_size=64, max_size=64, gn_tolerance=0.5)
    assert detector.gn_tolerance == 0.5 and detector.model.transform.min_size == (64,)


def test_checkpoint_path_round_trip(tmp_path) -> None:
    build_fcos = DETECTORS.get("fcos_resnet50_fpn")
    torch.manual_seed(1)
    first = build_fcos(num_classes=3, min_size=128, max_size=128)
    path = tmp_path / "fcos.pt"
    torch.save({"model": first.model.state_dict()}, path)
    second = build_fcos(weights=path, num_classes=3, min_size=128, max_size=128)
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        build_fcos(weights=tmp_path / "bad.pt", num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        build_fcos(weights=tmp_path / "missing.pt", num_classes=3)


def test_wraps_a_model_with_another_backbone(random_image: np.ndarray) -> None:
    """Any backbone of the family works: here FCOS on a MobileNetV3 FPN."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6
    )
    anchors = tvd.anchor_utils.AnchorGenerator(((32,), (64,), (128,)), ((1.0,),) * 3)
    model = tvd.FCOS(backbone, num_classes=3, anchor_generator=anchors, min_size=160, max_size=224)
    model.score_thresh = 0.0
    detector = wrap(model.eval(), class_names=["bg", "a", "b"])
    ref = torchvision_output(model, random_image)
    (det,) = detector.detect([random_image])
    torch.testing.assert_close(det.boxes, ref["boxes"])
    assert detector.class_names == ["bg", "a", "b"]
