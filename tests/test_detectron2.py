"""detectron2 wrappers (Faster R-CNN R50-FPN, RetinaNet R50-FPN) against detectron2 itself.

Run with the real detectron2 that ``scripts/install_detectron2.py`` installs. Without it the
tests that need it skip, except where ``XAIBENCH_REQUIRE_DETECTRON2`` is set (``.ci/run``
sets it): there a missing detectron2 fails them.

The R50-FPN models have random weights whose frozen BatchNorm statistics are calibrated on
the test image (``calibrate_frozen_batchnorm``), with the score threshold at 0 so that a
random head still yields detections.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xaibench.registry import DETECTORS
from xaibench.types import ATTRIBUTES, Target

ROOT = Path(__file__).resolve().parents[1]
HAVE_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
needs_detectron2 = pytest.mark.skipif(
    not HAVE_DETECTRON2 and not os.environ.get("XAIBENCH_REQUIRE_DETECTRON2"),
    reason="detectron2 is not installed (python scripts/install_detectron2.py)",
)
FAMILIES = ("faster_rcnn", "retinanet")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def load_install_script():
    spec = importlib.util.spec_from_file_location(
        "install_detectron2", ROOT / "scripts" / "install_detectron2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# Without detectron2


def test_install_script_pins_the_wheel_and_the_extra_lists_its_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    script = load_install_script()
    assert len(script.SHA256) == 64 and int(script.SHA256, 16) >= 0
    assert script.VERSION in script.WHEEL
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["detectron2"] == script.DEPENDENCIES


def test_without_detectron2_builders_are_listed_and_name_the_install_script() -> None:
    """A fresh interpreter in which ``import detectron2`` fails: xaibench still imports, the
    builders are registered, torchvision detectors work, building a detectron2 one explains
    how to install it."""
    code = """
import sys
sys.modules["detectron2"] = None  # import detectron2 -> ImportError
from xaibench.registry import DETECTORS
names = DETECTORS.names("detectron2*")
assert names == ["detectron2", "detectron2_faster_rcnn_R_50_FPN",
                 "detectron2_retinanet_R_50_FPN"], names
assert "fcos_resnet50_fpn" in DETECTORS
try:
    DETECTORS.build("detectron2_retinanet_R_50_FPN")
except ImportError as err:
    print("ImportError:", err)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "ImportError:" in result.stdout
    assert "scripts/install_detectron2.py" in result.stdout


# ---------------------------------------------------------------------------------------
# Fixtures: R50-FPN detectors with calibrated frozen BatchNorm


@pytest.fixture(scope="module")
def d2():
    """The wrapper module (imports detectron2)."""
    from xaibench.detectors import detectron2 as module

    return module


@pytest.fixture(scope="module")
def r50(d2, random_image: np.ndarray):
    """``r50("retinanet")``: R50-FPN with random weights, calibrated, 3 classes, test size
    160 / 224 (the 150 x 200 image becomes 160 x 213, padded to 160 x 224)."""
    built = {}

    def get(family: str):
        if family not in built:
            torch.manual_seed(0)
            detector = DETECTORS.build(
                f"detectron2_{family}_R_50_FPN",
                num_classes=3,
                class_names=["circle", "square", "triangle"],
                min_size=160,
                max_size=224,
                score_thresh=0.0,
            )
            assert d2.calibrate_frozen_batchnorm(detector, [random_image]) == 53
            built[family] = detector
        return built[family]

    return get


def predictor(d2, detector, config: str):
    """detectron2's own ``DefaultPredictor`` for the config, running the wrapped model."""
    from detectron2.engine import DefaultPredictor

    cfg = d2.load_config(config)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = detector.num_classes - 1
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 160, 224
    p = DefaultPredictor(cfg)
    p.model = detector.model
    return p


# ---------------------------------------------------------------------------------------
# Installation, configs and construction


@needs_detectron2
def test_pure_python_detectron2_without_compiled_ops_or_model_zoo(r50) -> None:
    import detectron2

    assert detectron2.__version__ == "0.7.2"
    assert importlib.util.find_spec("detectron2._C") is None  # no compiled extension
    r50("faster_rcnn")  # RoIAlign and NMS run through torchvision's ops
    assert "detectron2.model_zoo" not in sys.modules and "pkg_resources" not in sys.modules


@needs_detectron2
def test_configs_are_read_from_the_package_files(d2, tmp_path: Path) -> None:
    path = d2.config_file("COCO-Detection/retinanet_R_50_FPN_3x.yaml")
    assert path.is_file() and "model_zoo" in path.parts
    cfg = d2.load_config(path, opts=["MODEL.RETINANET.NUM_CLASSES", "5"])
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.RETINANET.NUM_CLASSES == 5
    assert cfg.MODEL.RESNETS.DEPTH == 50  # _BASE_ merged by detectron2
    with pytest.raises(FileNotFoundError, match=r"faster_rcnn_R_50_FPN_3x\.yaml"):
        d2.load_config("COCO-Detection/no_such_config.yaml")


@needs_detectron2
def test_construction_errors_are_clear(d2, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        DETECTORS.build("detectron2_retinanet_R_50_FPN", weights=tmp_path / "missing.pth")
    small = d2.build(d2.small_config("faster_rcnn", 3))
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="does not fit the model"):
        d2.load_weights(small.model, foreign)
    with pytest.raises(ValueError, match="class_names has 2 entries; the model predicts 3"):
        d2.wrap(small.model, class_names=["a", "b"])
    with pytest.raises(TypeError, match="expected detectron2 GeneralizedRCNN or RetinaNet"):
        d2.wrap(torch.nn.Linear(2, 2))


@needs_detectron2
def test_weights_round_trip_through_detectron2s_checkpointer(d2, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = d2.build(d2.small_config("faster_rcnn", 3))
    path = tmp_path / "model_final.pth"
    torch.save({"model": source.model.state_dict()}, path)
    torch.manual_seed(2)
    loaded = d2.build(d2.small_config("faster_rcnn", 3), weights=path)
    for (name, a), b in zip(
        source.model.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@needs_detectron2
def test_calibrated_frozen_batchnorm_normalises_its_inputs(r50, random_image) -> None:
    """After calibration each frozen BatchNorm maps its own input (on the calibration image)
    to per-channel mean 0 and variance 1."""
    from detectron2.layers import FrozenBatchNorm2d

    detector = r50("retinanet")
    outputs = []
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out: outputs.append(out.clone())
        )  # before in-place ReLUs
        for m in detector.model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        with torch.no_grad():
            image_list, _ = detector.prepare([random_image])
            detector.model.backbone(image_list.tensor)
    finally:
        for h in hooks:
            h.remove()
    assert len(outputs) == 53
    for out in outputs:
        mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
        assert mean.abs().max() < 1e-3 and (var - 1).abs().max() < 2e-2


def retinanet_units(model, features, provenance) -> tuple[torch.Tensor, torch.Tensor]:
    """Score (N,) and box (N, 4, resized-input pixels) of each detection's unit, with
    detectron2's head, anchors and box transform."""
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    levels = [features[f] for f in model.head_in_features]
    logits, deltas = model.head(levels)
    anchors = model.anchor_generator(levels)
    a = model.anchor_generator.num_cell_anchors[0]
    scores, boxes = [], []
    for i in range(len(provenance)):
        lv = int(provenance.level[i])
        row = (int(provenance.y[i]) * logits[lv].shape[-1] + int(provenance.x[i])) * a
        row += int(provenance.anchor[i])
        k = int(provenance.class_index[i]) - 1
        scores.append(permute_to_N_HWA_K(logits[lv], model.num_classes)[0, row, k].sigmoid())
        delta = permute_to_N_HWA_K(deltas[lv], 4)[0, row]
        anchor = anchors[lv].tensor[row]
        boxes.append(model.box2box_transform.apply_deltas(delta[None], anchor[None])[0])
    return torch.stack(scores), torch.stack(boxes)


# ---------------------------------------------------------------------------------------
# Black box: the wrapper's detections are detectron2's


@needs_detectron2
@pytest.mark.parametrize("family", FAMILIES)
def test_detections_equal_detectron2_inference(d2, r50, family: str, random_image) -> None:
    detector = r50(family)
    config = f"COCO-Detection/{family}_R_50_FPN_3x.yaml"
    reference = predictor(d2, detector, config)(random_image[:, :, ::-1].copy())["instances"]
    (ours,) = detector.detect([random_image])
    assert len(ours) == len(reference) == 100
    assert torch.equal(ours.boxes, reference.pred_boxes.tensor)
    assert torch.equal(ours.scores, reference.scores)
    assert torch.equal(ours.labels, reference.pred_classes + 1)
    assert ours.image_size == random_image.shape[:2]
    # the white-box trace finds the same detections; batches of mixed sizes change nothing
    assert torch.equal(detector.trace(random_image).detections.boxes, ours.boxes)
    other = np.ascontiguousarray(random_image[:120, :180])
    batch = detector.detect([other, random_image], batch_size=2)
    assert_same_ranked_detections(batch[1], ours)
    assert_same_ranked_detections(batch[0], detector.detect([other])[0])


@needs_detectron2
@pytest.mark.parametrize("family", FAMILIES)
def test_odam_nms_explains_the_candidates_of_one_trace(r50, family: str, random_image) -> None:
    from conftest import assert_one_pass_odam_nms

    assert_one_pass_odam_nms(r50(family), random_image)


def assert_same_ranked_detections(got, expected, score_tie: float = 1e-6) -> None:
    """Equal detections, in the same order up to swaps among scores equal within
    ``score_tie``: a batch's convolutions may round differently from a single image's, and
    random weights give near-tied scores (here 0.0107237, 4e-9 apart) whose order that
    rounding decides. Boxes within 1e-3 px, scores within 1e-6."""
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=score_tie)
    ties = torch.cat([torch.zeros(1), (expected.scores.diff().abs() > score_tie).cumsum(0)])

    def canonical(d):  # rows sorted by (tie group, label, box) so that ties compare as sets
        rows = torch.cat([ties[:, None], d.labels[:, None].double(), d.boxes.double()], 1)
        for column in reversed(range(rows.shape[1])):
            rows = rows[rows[:, column].argsort(stable=True)]
        return rows

    torch.testing.assert_close(canonical(got), canonical(expected), rtol=1e-5, atol=1e-3)  # px


@needs_detectron2
def test_retinanet_provenance_names_the_unit_that_scored(r50, random_image) -> None:
    """Each detection's score and class distribution are the sigmoid of detectron2's head
    outputs at its level, cell, anchor and class; its box is that anchor's decoded box."""
    detector = r50("retinanet")
    det = detector.trace(random_image).detections
    with torch.no_grad():
        image_list, (geometry,) = detector.prepare([random_image])
        features = detector.model.backbone(image_list.tensor)
        scores, boxes = retinanet_units(detector.model, features, det.provenance)
    torch.testing.assert_close(det.scores, scores, rtol=1e-6, atol=1e-8)
    clipped = geometry.boxes_to_original(boxes).clamp(min=0)
    clipped = torch.minimum(clipped, torch.tensor([200.0, 150, 200, 150]))  # W, H, W, H
    torch.testing.assert_close(det.boxes, clipped, rtol=1e-5, atol=1e-3)
    assert (det.class_probs[:, 0] == 0).all() and det.objectness is None
    assert torch.equal(det.class_probs[torch.arange(len(det)), det.labels], det.scores)


@needs_detectron2
def test_faster_rcnn_provenance_names_the_proposal(r50, random_image) -> None:
    """Each detection comes from the RPN proposal it names: its box is detectron2's proposal,
    its class distribution the box head's softmax on it (background moved to column 0)."""
    from detectron2.structures import Boxes

    detector = r50("faster_rcnn")
    trace = detector.trace(random_image)
    det = trace.detections
    model = detector.model
    with torch.no_grad():
        image_list, (geometry,) = detector.prepare([random_image])
        features = model.backbone(image_list.tensor)
        (proposals,), _ = model.proposal_generator(image_list, features, None)
        rois = proposals.proposal_boxes.tensor[det.provenance.proposal]
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(rois)])
        logits, _ = heads.box_predictor(heads.box_head(pooled))
    probs = F.softmax(logits, -1)
    torch.testing.assert_close(det.class_probs[:, 0], probs[:, -1])
    torch.testing.assert_close(det.class_probs[:, 1:], probs[:, :-1])
    rows = torch.arange(len(det))
    torch.testing.assert_close(det.scores, probs[rows, det.labels - 1])
    torch.testing.assert_close(det.provenance.proposal_box, geometry.boxes_to_original(rois))
    torch.testing.assert_close(
        det.objectness, proposals.objectness_logits[det.provenance.proposal].sigmoid()
    )


# ---------------------------------------------------------------------------------------
# White box: ODAM against per-target autograd


def independent_odam(detector, family: str, image: np.ndarray, indices: list[int]):
    """ODAM of the scores of detections ``indices`` recomputed with detectron2's own modules
    and plain autograd (scores as detectron2 computes them, gradients on every pyramid level),
    mapped to the original image by resizing the padded layer map, cropping and resizing
    again. Returns, per detection, the map and the levels with a non-zero gradient."""
    from detectron2.data import transforms as T
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
    from detectron2.structures import Boxes

    model = detector.model
    det = detector.detect([image])[0]
    p = det.provenance
    bgr = image[:, :, ::-1]
    resized = T.ResizeShortestEdge([160, 160], 224).get_transform(bgr).apply_image(bgr)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    images = model.preprocess_image([{"image": tensor}])
    features = model.backbone(images.tensor)
    labels = det.labels[indices] - 1
    if family == "retinanet":
        names = list(model.head_in_features)
        logits, _ = model.head([features[f] for f in names])
        a = model.anchor_generator.num_cell_anchors[0]
        scores = []
        for i, k in zip(indices, labels.tolist(), strict=True):
            lv = int(p.level[i])
            row = (int(p.y[i]) * logits[lv].shape[-1] + int(p.x[i])) * a + int(p.anchor[i])
            scores.append(permute_to_N_HWA_K(logits[lv], model.num_classes)[0, row, k].sigmoid())
    else:
        names = list(model.roi_heads.box_in_features)
        sy, sx = image.shape[0] / resized.shape[0], image.shape[1] / resized.shape[1]
        rois = p.proposal_box[indices] / torch.tensor([sx, sy, sx, sy])
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in names], [Boxes(rois)])
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        scores = F.softmax(logits, -1)[torch.arange(len(indices)), labels].unbind()
    out = []
    for i, score in zip(indices, scores, strict=True):
        assert float(score.detach()) == pytest.approx(float(det.scores[i]), rel=1e-5)
        levels = [features[f] for f in names]
        grads = torch.autograd.grad(score, levels, retain_graph=True, allow_unused=True)
        used = [n for n, g in zip(names, grads, strict=True) if g is not None and g.abs().sum()]
        assert len(used) == 1
        g, act = grads[names.index(used[0])], features[used[0]]
        layer_map = torch.relu((g * act).sum(1, keepdim=True))
        padded = images.tensor.shape[-2:]
        full = F.interpolate(layer_map, size=padded, mode="bilinear", align_corners=False)
        crop = full[..., : resized.shape[0], : resized.shape[1]]
        reference = F.interpolate(crop, size=image.shape[:2], mode="bilinear", align_corners=False)
        out.append((reference[0, 0].detach().numpy(), used))
    return out


@needs_detectron2
@pytest.mark.parametrize("family", FAMILIES)
def test_odam_matches_independent_autograd_reference(r50, family: str, random_image) -> None:
    from xaibench.methods.odam import ODAM

    detector = r50(family)
    trace = detector.trace(random_image)
    level = trace.detections.provenance.level
    picked = [int(torch.where(level == lv)[0][0]) for lv in level.unique()[:2]]
    targets = [Target(i, "score") for i in picked]
    references = independent_odam(detector, family, random_image, picked)
    maps = ODAM(mode="exact").explain(detector, random_image, targets, trace=trace)
    for target, saliency, (reference, used) in zip(targets, maps, references, strict=True):
        assert used == [detector.feature_levels[int(level[target.index])]]
        if reference.max() == 0:
            assert saliency.map.max() == 0
            continue
        assert pearson(saliency.map, reference) > 0.99, target
        assert saliency.map.max() == pytest.approx(reference.max(), rel=0.05)


def assert_same_maps(fast, exact) -> None:
    for f, e in zip(fast, exact, strict=True):
        if e.map.max() == 0:  # nothing survives the ReLU: the fast map must be empty too
            assert f.map.max() <= 1e-6 * max(1.0, float(np.abs(f.map).max()))
        else:
            assert pearson(f.map, e.map) >= 0.99, (f.target, pearson(f.map, e.map))


@needs_detectron2
@pytest.mark.parametrize(
    ("family", "layer", "smoothing"),
    [
        ("faster_rcnn", "fpn", "none"),
        ("faster_rcnn", "p3", "gaussian"),
        ("faster_rcnn", "roi", "none"),
        ("retinanet", "fpn", "none"),
        ("retinanet", "fpn", "gaussian"),
    ],
)
def test_fast_matches_exact(r50, family: str, layer: str, smoothing: str, random_image) -> None:
    from xaibench.methods.odam import ODAM

    detector = r50(family)
    trace = detector.trace(random_image)
    level = trace.detections.provenance.level
    picked = [int(torch.where(level == lv)[0][0]) for lv in level.unique()[:2]]
    targets = [Target(i, a) for i in picked for a in ATTRIBUTES]
    detector.detect([np.ascontiguousarray(random_image[::-1])])  # the trace keeps its own state
    fast = ODAM(layer=layer, smoothing=smoothing).explain(
        detector, random_image, targets, trace=trace
    )
    exact = ODAM(layer=layer, smoothing=smoothing, mode="exact").explain(
        detector, random_image, targets, trace=trace
    )
    assert_same_maps(fast, exact)
    assert all(f.map.shape == random_image.shape[:2] for f in fast)


@needs_detectron2
def test_backbone_stage_gradients_equal_autograd_through_the_model(r50, random_image) -> None:
    """Gradients on ``backbone.res4`` (a hooked, re-run layer) equal plain autograd of the
    score and of the right box edge with respect to res4's output in a full forward pass."""
    detector = r50("retinanet")
    trace = detector.trace(random_image)
    assert {"backbone.stem", "backbone.res4", "p3", "fpn"} <= set(trace.layer_names())
    targets = [Target(0, "score"), Target(1, "x2")]
    (windows,) = trace.gradients(targets, layer="backbone.res4", mode="exact")
    captured = {}
    module = detector.model.backbone.bottom_up.res4
    handle = module.register_forward_hook(lambda _m, _i, out: captured.setdefault("res4", out))
    try:
        features = detector.model.backbone(trace.image_list.tensor)
    finally:
        handle.remove()
    scores, boxes = retinanet_units(
        detector.model, features, trace.detections.provenance.index(slice(0, 2))
    )
    score, x2 = scores[0], boxes[1, 2] * trace.geometry.scale()[1]  # resized -> original px
    torch.testing.assert_close(torch.stack([score, x2]), trace.target_values(targets))
    for row, value in enumerate((score, x2)):
        (expected,) = torch.autograd.grad(value, captured["res4"], retain_graph=True)
        torch.testing.assert_close(windows.gradients[row], expected[0], rtol=1e-4, atol=1e-8)
    with pytest.raises(KeyError, match="known: fpn, p3"):
        trace.gradients(targets, layer="backbone.res9")


# ---------------------------------------------------------------------------------------
# The rest of the white-box interface


@pytest.fixture(scope="module")
def small(d2):
    """``small("retinanet")``: the small detectron2 configs with random weights (score
    threshold 0), 160 px scenes of circles, squares and triangles."""
    built = {}

    def get(architecture: str):
        if architecture not in built:
            torch.manual_seed(0)
            built[architecture] = d2.build(
                d2.small_config(architecture, 3),
                class_names=["circle", "square", "triangle"],
                score_thresh=0.0,
            )
        return built[architecture]

    return get


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    from xaibench.datasets.synthetic import render_scene

    return render_scene(3, seed=7).image


def detectron2_inference_on(model, image_list, features, geometry):
    """detectron2's own inference from given pyramid features, original-size results."""
    from detectron2.modeling import RetinaNet
    from detectron2.modeling.postprocessing import detector_postprocess

    if isinstance(model, RetinaNet):
        levels = [features[f] for f in model.head_in_features]
        results = model.forward_inference(image_list, levels, model.head(levels))
    else:
        proposals, _ = model.proposal_generator(image_list, features, None)
        results, _ = model.roi_heads(image_list, features, proposals, None)
    return [detector_postprocess(r, *geometry.original) for r in results]


@needs_detectron2
@pytest.mark.parametrize("architecture", FAMILIES)
def test_feature_masks_rerun_detectron2_on_masked_levels(small, architecture, scene) -> None:
    from xaibench.feature_masks import masks_to_layer

    detector = small(architecture)
    trace = detector.trace(scene)
    masks = torch.ones(3, 4, 4)
    masks[1, :2] = 0.0  # the top half of the image
    masks[2] = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    ours = trace.detect_with_feature_masks(masks, layer="fpn", batch_size=2)
    assert len(ours) == 3
    torch.testing.assert_close(ours[0].boxes, trace.detections.boxes)
    with torch.no_grad():
        for mask, det in zip(masks, ours, strict=True):
            features = {
                name: f * masks_to_layer(mask[None], trace.geometry, tuple(f.shape[-2:]))[:, None]
                for name, f in trace.features.items()
            }
            (reference,) = detectron2_inference_on(
                detector.model, trace.image_list, features, trace.geometry
            )
            torch.testing.assert_close(det.boxes, reference.pred_boxes.tensor)
            torch.testing.assert_close(det.scores, reference.scores)
    assert not torch.equal(ours[1].scores, ours[0].scores)
    stage = trace.detect_with_feature_masks(masks[:1], layer="backbone.res3")
    torch.testing.assert_close(stage[0].boxes, trace.detections.boxes, rtol=1e-5, atol=1e-4)
    with pytest.raises(KeyError, match="not 'roi'"):
        trace.detect_with_feature_masks(masks, layer="roi")


@needs_detectron2
@pytest.mark.parametrize("architecture", FAMILIES)
def test_provenance_outputs_are_the_units_values_and_differentiable(small, architecture, scene):
    detector = small(architecture)
    trace = detector.trace(scene)
    image = torch.from_numpy(scene).permute(2, 0, 1).float().div(255)
    images = torch.stack([image, image.flip(-1)]).requires_grad_(True)
    scores, boxes = trace.provenance_outputs(images, [0, 2])
    expected = trace.target_values([Target(0, a) for a in ATTRIBUTES])
    assert float(scores[0].detach()) == pytest.approx(float(expected[0]), rel=1e-4)
    edges = boxes[0] * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(edges, expected[1:], rtol=1e-4, atol=1e-3)
    assert float(scores[1].detach()) != pytest.approx(float(trace.detections.scores[2]), rel=1e-3)
    (grad,) = torch.autograd.grad(scores.sum() + boxes.sum(), images)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


@needs_detectron2
def test_trace_units_rereads_the_same_proposals_with_new_parameters(small, scene) -> None:
    """Sanity checks re-read the same output units after changing the model: the same
    proposals (not the new RPN's) through the changed box head."""
    from detectron2.structures import Boxes

    detector = small("faster_rcnn")
    trace = detector.trace(scene)
    targets = [Target(i, "x2") for i in range(4)]  # right edge, original pixels (scale 1)
    before = trace.target_values(targets)
    same = detector.trace_units(scene, trace.detections)
    torch.testing.assert_close(same.target_values(targets), before)
    predictor = detector.model.roi_heads.box_predictor
    saved = predictor.bbox_pred.weight.detach().clone()
    try:
        with torch.no_grad():
            predictor.bbox_pred.weight.mul_(3.0)
        changed = detector.trace_units(scene, trace.detections).target_values(targets)
        heads = detector.model.roi_heads
        rois = trace.detections.provenance.proposal_box[:4]
        with torch.no_grad():
            levels = [trace.features[f] for f in heads.box_in_features]
            _, deltas = predictor(heads.box_head(heads.box_pooler(levels, [Boxes(rois)])))
        boxes = predictor.box2box_transform.apply_deltas(deltas, rois).view(4, -1, 4)
        expected = boxes[torch.arange(4), trace.detections.labels[:4] - 1, 2]
        torch.testing.assert_close(changed, expected, rtol=1e-4, atol=1e-3)
        assert not torch.allclose(changed, before)
    finally:
        with torch.no_grad():
            predictor.bbox_pred.weight.copy_(saved)


# ---------------------------------------------------------------------------------------
# Training with the project's recipe


@needs_detectron2
def test_baseline_recipe_trains_a_detectron2_model(d2, tmp_path: Path) -> None:
    from detectron2.modeling import build_model
    from xaibench.detectors.training import BaselineConfig, train

    from xaibench.datasets.synthetic import load_synthetic

    data = load_synthetic(tmp_path / "scenes", num_images=4, seed=0)
    torch.manual_seed(0)
    model = build_model(d2.small_config("faster_rcnn", 3))
    adapter = d2.TrainingAdapter(model)
    before = [p.detach().clone() for p in model.parameters()]
    config = BaselineConfig(iterations=2, batch_size=2, warmup_iterations=0, lr=1e-3)
    result = train(adapter, data, config, progress=False)
    assert result.iterations == 2 and all(np.isfinite(result.losses))
    assert not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    image = torch.zeros(3, 160, 160)
    adapter.train()
    losses = adapter(
        [image], [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([3])}]
    )
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    with pytest.raises(ValueError, match=r"labels'\] must lie in 1\.\.3"):
        adapter([image], [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([0])}])


# ---------------------------------------------------------------------------------------
# Everything in the harness runs unchanged on the wrappers


@needs_detectron2
@pytest.mark.parametrize("architecture", FAMILIES)
def test_every_method_and_metric_runs_on_detectron2(small, architecture, tmp_path) -> None:
    """The evaluation of the demo (every registered method, every metric, scaled down) on a
    synthetic scene, with no image or method failing."""
    import pandas as pd

    from xaibench.cli.evaluate import demo_settings
    from xaibench.datasets.synthetic import load_synthetic
    from xaibench.evaluate import run_evaluation
    from xaibench.registry import METHODS

    data = load_synthetic(tmp_path / "scenes", num_images=1, seed=3)
    settings = demo_settings([architecture], num_images=1)
    method_params = dict(settings.method_params)
    for name, cheaper in {
        "bbam": {"iterations": 5},
        "drise": {"n": 32},
        "drise-feature": {"n": 32},
    }.items():
        if name in method_params:
            method_params[name] = {**method_params[name], **cheaper}
    metric_params = dict(settings.metric_params)
    if "feature-drift" in metric_params:
        metric_params["feature-drift"] = {"params": {"n": 32, "batch_size": 32}}
    settings = settings.model_copy(
        update={
            "method_params": method_params,
            "metric_params": metric_params,
            "selection": "top-k",  # random weights: explain the best detection, matched or not
            "selection_params": {"top_k": 1, "score_thresh": 0.0},
            "max_instances": 1,
        }
    )
    detector = small(architecture)
    run_evaluation(data, settings, tmp_path / "out", False, lambda _name: detector)
    table = pd.read_csv(tmp_path / "out" / "instances.csv")
    assert set(METHODS.names()) <= set(table["method"])
    failures = [r for r in table["reason"].dropna() if "Error" in r or "Exception" in r]
    assert not failures, failures
    assert table.filter(like="deletion").notna().any().any()


@needs_detectron2
def test_commands_take_a_detectron2_config_and_weights(d2, tmp_path) -> None:
    """``xaibench explain`` / ``compare`` / ``evaluate`` with ``--detector detectron2``, a yaml
    config and a weights file written by detectron2's conventions (``{"model": state_dict}``)."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from xaibench.cli import app
    from xaibench.datasets.synthetic import load_synthetic

    data = load_synthetic(tmp_path / "scenes", num_images=1, seed=3)
    config = tmp_path / "small_retinanet.yaml"
    config.write_text(d2.small_config("retinanet", 3).dump())
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save({"model": d2.build(config).model.state_dict()}, weights)
    image_path = tmp_path / "scene.png"
    Image.fromarray(data[0].image).save(image_path)
    runner = CliRunner()
    common = ["--detector", "detectron2", "--weights", str(weights)]
    result = runner.invoke(
        app,
        [
            "explain", str(image_path), *common,
            "--detector-param", f"config={config}", "--detector-param", "score_thresh=0.0",
            "--detector-param", 'class_names=["circle", "square", "triangle"]',
            "--attribute", "combined", "--top-k", "2", "--out", str(tmp_path / "explain"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "explain" / "scene.detections.json").read_text())
    explained = [d for d in payload["detections"] if d["explained"]]
    assert len(explained) == 2 and explained[0]["provenance"]["level"] in ("p3", "p4", "p5", "p6")
    assert explained[0]["class_name"] in ("circle", "square", "triangle")
    heat = np.load(tmp_path / "explain" / explained[0]["maps"]["odam:combined"]["npy"])
    assert heat.shape == (160, 160) and heat.max() > 0
    result = runner.invoke(
        app,
        [
            "compare", str(image_path), *common, "--methods", "odam,gradcam,drise",
            "--detector-param", f"config={config}", "--detector-param", "score_thresh=0.0",
            "--method-param", "drise.n=16", "--method-param", "drise.progress=false",
            "--top-k", "1", "--out", str(tmp_path / "compare"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "compare" / "scene.detections.json").read_text())
    maps = next(d["maps"] for d in compared["detections"] if d["explained"])
    assert {"odam:score", "gradcam:score", "drise:score"} <= set(maps)
    result = runner.invoke(
        app,
        [
            "evaluate", "--annotations", str(data.annotation_file),
            "--images", str(data.image_dir),
            "--detector", "detectron2", "--method", "odam", "--metric", "deletion",
            "--detector-param", f"detectron2.config={config}",
            "--detector-param", f"detectron2.weights={weights}",
            "--detector-param", "detectron2.score_thresh=0.0",
            "--selection", "top-k", "--selection-param", "score_thresh=0.0",
            "--max-instances", "1", "--out", str(tmp_path / "evaluate"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "evaluate" / "instances.csv").read_text()
    assert "odam" in rows and "Error" not in rows
