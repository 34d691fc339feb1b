"""Shared fixtures: small torchvision detectors with random weights, the trained demo detectors
and test images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.models import detection as tvd
from xaibench.detectors.torchvision import wrap

from xaibench.detector import Detector
from xaibench.registry import DETECTORS

SMALL = {"weights": None, "weights_backbone": None, "num_classes": 4}


def _low_threshold(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights score low: keep every candidate so that there is something to check."""
    if isinstance(model, tvd.FasterRCNN):
        model.roi_heads.score_thresh = 0.0
    else:
        model.score_thresh = 0.0
    return model.eval()


FACTORIES = {
    "fcos": lambda: tvd.fcos_resnet50_fpn(**SMALL, min_size=160, max_size=224),
    "retinanet": lambda: tvd.retinanet_resnet50_fpn(**SMALL, min_size=160, max_size=224),
    "retinanet_v2": lambda: tvd.retinanet_resnet50_fpn_v2(**SMALL, min_size=160, max_size=224),
    "frcnn": lambda: tvd.fasterrcnn_resnet50_fpn(**SMALL, min_size=160, max_size=224),
    "frcnn_v2": lambda: tvd.fasterrcnn_resnet50_fpn_v2(**SMALL, min_size=160, max_size=224),
    "frcnn_mobilenet": lambda: tvd.fasterrcnn_mobilenet_v3_large_fpn(
        **SMALL, min_size=160, max_size=224
    ),
}


@pytest.fixture(scope="session")
def random_image() -> np.ndarray:
    """A 150 x 200 uint8 RGB image of smooth blobs (resized to 160 x 213, padded to 160 x 224)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:150, :200]
    img = np.zeros((150, 200, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 150), rng.uniform(0, 200), rng.uniform(10, 40)
        img += rng.uniform(0, 255, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session", params=sorted(FACTORIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def build(family: str):
    torch.manual_seed(0)
    model = _low_threshold(FACTORIES[family]())
    return model, wrap(model, name=family)


@pytest.fixture(scope="session")
def demo_detector() -> Callable[[str], Detector]:
    """``demo_detector("synthetic-fcos")``: a trained demo detector, loaded once per session
    from the cache (trained there first if missing: a few minutes on two CPU cores)."""
    loaded: dict[str, Detector] = {}

    def get(name: str) -> Detector:
        if name not in loaded:
            loaded[name] = DETECTORS.build(name, progress=False)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def demo_scene() -> Callable[[int], np.ndarray]:
    """``demo_scene(i)``: image ``i`` of the demo detectors' held-out split (160 x 160 RGB)."""
    from xaibench.detectors.zoo import demo_data

    val = demo_data()["val"]
    return lambda i: val[i].image


def assert_one_pass_odam_nms(detector: Detector, image: np.ndarray, candidates: int = 12) -> None:
    """``trace_candidates`` finds the candidates of ``detect(nms=False)``, and Odam-NMS on
    that one trace keeps what it keeps on those candidates traced again as units (its
    threshold set so that ``candidates`` of them pass)."""
    from xaibench.registry import NMS

    found = detector.detect([image], nms=False)[0]
    traced = detector.trace_candidates(image).detections
    torch.testing.assert_close(traced.boxes, found.boxes)
    torch.testing.assert_close(traced.scores, found.scores)
    assert torch.equal(traced.labels, found.labels)
    assert torch.equal(traced.provenance.level, found.provenance.level)
    assert torch.equal(traced.provenance.class_index, found.provenance.class_index)
    threshold = float(found.scores.sort(descending=True).values[candidates])
    strategy = NMS.build("odamnms", score_threshold=threshold)
    one_pass, two_passes = strategy.run(detector, image), strategy.select(found, detector, image)
    assert len(one_pass.candidates.index(strategy.above_threshold(found))) == candidates
    assert one_pass.keep.tolist() == two_passes.keep.tolist()
    assert len(one_pass.keep) >= 1
