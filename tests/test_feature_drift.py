"""Feature drift measurements on hand-made input-space and feature-space maps, the
per-detector summary and verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject, EvidenceTrace
from xaibench.metrics.drift import (
    FeatureDrift,
    central_energy,
    centroids,
    drift_measures,
    drift_report,
    drift_result,
    summarise_drift,
)

from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.types import Detections

H, W = 60, 80
BOX = np.array([[20, 10, 60, 50]])  # 40 x 40 px, centre (40, 30)


def spike(row: int, col: int) -> np.ndarray:
    """A map with a background level of 1 and one salient pixel."""
    m = np.ones((H, W), np.float32)
    m[row, col] = 11.0
    return m


def test_evidence_moved_to_the_box_centre() -> None:
    """Input-space evidence at pixel (row 14, col 24), centre (24.5, 14.5); feature-space
    evidence at (row 29, col 39), centre (39.5, 29.5): the centroid moves by 15 px in x and y
    = 15 / 40 * sqrt(2) box sizes, all of it towards the box centre (39.5 - 40 = -0.5 px is
    where it lands), and the evidence moves from the box's edge into its central half."""
    measures = drift_measures(spike(14, 24)[None], spike(29, 39)[None], BOX)
    assert measures["drift_shift"][0] == pytest.approx(15 / 40 * math.sqrt(2))
    expected_to_centre = math.sqrt(2) * 15.5 / 40 - math.sqrt(2) * 0.5 / 40
    assert measures["drift_to_centre"][0] == pytest.approx(expected_to_centre)
    assert measures["drift_centre_energy"][0] == pytest.approx(1.0)


def test_identical_maps_do_not_drift() -> None:
    yy, xx = np.mgrid[:H, :W]
    heat = np.exp(-((yy - 20) ** 2 + (xx - 30) ** 2) / 50.0)[None]
    measures = drift_measures(heat, heat, BOX)
    assert all(abs(v[0]) < 1e-12 for v in measures.values())


def test_centroid_and_central_energy_by_hand() -> None:
    heat = np.zeros((1, H, W))
    heat[0, 30, 40] = 3.0  # centre (40.5, 30.5), inside the central half
    heat[0, 12, 22] = 1.0  # centre (22.5, 12.5), in the box, outside its central half
    np.testing.assert_allclose(centroids(heat)[0], [(3 * 40.5 + 22.5) / 4, (3 * 30.5 + 12.5) / 4])
    assert central_energy(heat, BOX, 0.5)[0] == pytest.approx(3 / 4)


def test_flat_maps_give_nan_with_a_reason() -> None:
    result = drift_result(np.ones((1, H, W)), spike(29, 39)[None], BOX)
    assert np.isnan(result.values["drift_shift"][0])
    assert result.reasons["drift_shift"][0] == "input-space constant map"
    outside = drift_result(spike(2, 2)[None], spike(3, 3)[None], BOX)  # evidence off the box
    assert np.isfinite(outside.values["drift_shift"][0])
    assert outside.reasons["drift_centre_energy"][0] == "no saliency energy in the box"


def test_summary_and_verdicts() -> None:
    rng = np.random.default_rng(0)
    moving = {
        "drift_shift": rng.uniform(0.2, 0.4, 30),
        "drift_to_centre": rng.uniform(0.1, 0.3, 30),
        "drift_centre_energy": rng.uniform(0.1, 0.3, 30),
    }
    summary = summarise_drift("yolo-ish", moving)
    assert summary.count == 30
    values = moving["drift_shift"]
    low, high = stats.t.interval(0.95, 29, loc=values.mean(), scale=stats.sem(values))
    assert summary.mean["drift_shift"] == pytest.approx(values.mean())
    assert summary.ci95["drift_shift"] == pytest.approx((high - low) / 2)
    assert "towards object centres" in summary.verdict and "unreliable" in summary.verdict
    still = {k: rng.normal(0.0, 0.01, 30) for k in moving}
    still["drift_shift"] = np.abs(still["drift_shift"])
    assert "keeps evidence in place" in summarise_drift("retina-ish", still).verdict
    assert "no detection" in summarise_drift("empty", {}).verdict


# -- with D-RISE on hand-built detectors ---------------------------------------------------

OFF_CENTRE = EvidenceObject(box=(8, 8, 56, 56), label=1, region=(8, 8, 24, 24))
"""A 48 x 48 px box whose evidence is its top-left 16 x 16 px corner."""


class CentringTrace(EvidenceTrace):
    """Features that hold each object's evidence in the layer cell at its box centre (as the
    one-stage detectors of the feature-drift study): masking that cell removes it."""

    @torch.no_grad()
    def detect_with_feature_masks(self, masks, layer="fpn", batch_size=8) -> list[Detections]:
        net = self.detector.net
        on_layer = masks_to_layer(check_masks(masks), self.geometry, tuple(self.p1.shape[-2:]))
        evidence = (net.head(self.p1)[0] - net.bias) / net.gain  # e_k of the unmasked image
        stride = self.detector.stride
        cy = [int(o.box[1] + o.box[3]) // 2 // stride for o in self.detector.objects]
        cx = [int(o.box[0] + o.box[2]) // 2 // stride for o in self.detector.objects]
        return [
            self.detector.detections(
                torch.sigmoid(net.gain * evidence * m[cy, cx] + net.bias), self.image_size
            )
            for m in on_layer
        ]


class CentringDetector(EvidenceDetector):
    def trace(self, image: np.ndarray) -> CentringTrace:
        return CentringTrace(self, image)


def corner_scene() -> np.ndarray:
    image = np.random.default_rng(0).integers(0, 40, (64, 64, 3)).astype(np.uint8)
    image[8:24, 8:24] = 230
    return image


@pytest.mark.parametrize(
    ("detector_class", "moves"), [(EvidenceDetector, False), (CentringDetector, True)]
)
def test_drise_in_input_and_feature_space_finds_the_known_drift(detector_class, moves) -> None:
    """The evidence detector's layer is an average pool: evidence stays in the corner in both
    spaces. The centring detector keeps it at the box centre cell (pixels 32..35), 18 px from
    the corner region's centre in x and y: about 18 * sqrt(2) / 48 = 0.53 box sizes."""
    detector = detector_class([OFF_CENTRE], stride=4)
    metric = FeatureDrift(params={"n": 300, "grid": 8, "seed": 0})
    frame, summary = drift_report(
        detector, [corner_scene()], top_k=1, score_thresh=0.0, metric=metric
    )
    row = frame.iloc[0]
    if moves:
        assert 0.25 < row["drift_shift"] < 0.6
        assert row["drift_to_centre"] > 0.15 and row["drift_centre_energy"] > 0.3
        assert "towards object centres" in summary.verdict
    else:
        assert row["drift_shift"] < 0.02 and abs(row["drift_centre_energy"]) < 0.02
        assert "keeps evidence in place" in summary.verdict
