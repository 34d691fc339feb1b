"""Map metrics (pointing game, energy PG, compactness, VEA, ODI) on hand-made heat maps and
ground truth whose values are worked out by hand, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from xaibench.metrics.discrimination import object_discrimination_index
from xaibench.metrics.localization import (
    VEA_THRESHOLDS,
    compactness,
    energy_pointing_game,
    pointing_game,
    vea_curve,
)
from xaibench.metrics.regions import box_masks

from xaibench.metric import ExplainedBatch
from xaibench.registry import METRICS
from xaibench.types import Detections, Instance, Provenance, Target

H, W = 40, 50


def box_instance(box, label: int = 1, mask: bool = True, ignore: bool = False) -> Instance:
    """A ground-truth instance whose mask (if any) is its box, rasterised by pixel centres."""
    box = np.asarray(box, dtype=np.float32)
    return Instance(
        box=box, label=label, mask=box_masks(box[None], (H, W))[0] if mask else None, ignore=ignore
    )


def batch_of(maps, instances, gt_index) -> ExplainedBatch:
    """One target per map; the detections are the matched ground-truth boxes."""
    maps = np.asarray(maps, dtype=np.float32).reshape(-1, H, W)
    boxes = torch.tensor(np.array([instances[max(g, 0)].box for g in gt_index]))
    n = len(gt_index)
    detections = Detections(
        boxes=boxes,
        scores=torch.ones(n),
        labels=torch.ones(n, dtype=torch.long),
        class_probs=torch.ones(n, 2),
        provenance=Provenance.empty(),
        image_size=(H, W),
    )
    return ExplainedBatch(
        image=np.zeros((H, W, 3), np.uint8),
        maps=maps,
        targets=[Target(i) for i in range(n)],
        detections=detections,
        instances=instances,
        gt_index=np.asarray(gt_index),
    )


def impulse(row: int, col: int, value: float = 1.0) -> np.ndarray:
    m = np.zeros((H, W), np.float32)
    m[row, col] = value
    return m


def test_box_masks_cover_pixels_whose_centres_are_inside() -> None:
    mask = box_masks(np.array([[10, 5, 30, 25]]), (H, W))[0]
    assert mask.sum() == 20 * 20
    assert mask[5, 10] and mask[24, 29] and not mask[25, 29] and not mask[5, 30]
    half = box_masks(np.array([[0.4, 0.0, 1.6, 1.0]]), (H, W))[0]  # centre 0.5 and 1.5 inside
    assert half[0, :3].tolist() == [True, True, False]


def test_pointing_game_impulse_inside_and_outside_the_box() -> None:
    gt = [box_instance([10, 5, 30, 25])]
    maps = [impulse(10, 20), impulse(30, 40), impulse(5, 10), impulse(25, 10)]
    result = METRICS.build("pointing-game").compute(batch_of(maps, gt, [0, 0, 0, 0]))
    # (row 5, col 10) is the box's top-left pixel; row 25 lies below y2 = 25
    assert result.values["pg_box"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert result.values["pg_mask"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_pointing_game_uses_the_mask_when_asked() -> None:
    inst = box_instance([10, 5, 30, 25])
    inst.mask[:, :20] = False  # the object is the right half of its box
    maps = [impulse(10, 12), impulse(10, 25)]
    result = METRICS.build("pointing-game").compute(batch_of(maps, [inst], [0, 0]))
    assert result.values["pg_box"].tolist() == [1.0, 1.0]
    assert result.values["pg_mask"].tolist() == [0.0, 1.0]


def test_energy_pg_of_a_uniform_map_is_box_area_over_image_area() -> None:
    gt = [box_instance([10, 5, 30, 25])]
    result = METRICS.build("energy-pg").compute(batch_of(np.ones((H, W)), gt, [0]))
    assert result.values["epg_box"][0] == pytest.approx(400 / 2000)
    assert result.values["epg_mask"][0] == pytest.approx(400 / 2000)


def test_energy_pg_by_hand() -> None:
    heat = impulse(10, 20, 3.0) + impulse(0, 0, 1.0)  # 3 inside the box, 1 outside
    value = energy_pointing_game(heat[None], box_masks(np.array([[10, 5, 30, 25]]), (H, W)))
    assert value[0] == pytest.approx(3 / 4)


def test_compactness_of_two_points() -> None:
    """Peak 2 at (10, 10), weight 1 four pixels to the right; box 8 x 6 px:
    sqrt(1 * 4^2 / (((8^2 + 6^2) / 4) * 3)) = sqrt(16 / 75)."""
    heat = impulse(10, 10, 2.0) + impulse(10, 14, 1.0)
    value = compactness(heat[None], np.array([[0, 0, 8, 6]]))
    assert value[0] == pytest.approx(math.sqrt(16 / 75))


def test_compactness_of_a_disc_blob_against_a_direct_sum() -> None:
    yy, xx = np.mgrid[:H, :W]
    heat = np.exp(-((yy - 20) ** 2 + (xx - 22) ** 2) / (2 * 3.0**2)).astype(np.float32)
    box = [12, 10, 32, 30]
    result = METRICS.build("compactness").compute(batch_of(heat, [box_instance(box)], [0]))
    num = sum(heat[r, c] * ((r - 20) ** 2 + (c - 22) ** 2) for r in range(H) for c in range(W))
    expected = math.sqrt(num / ((20**2 + 20**2) / 4 * heat.sum(dtype=np.float64)))
    assert result.values["compactness"][0] == pytest.approx(expected, rel=1e-5)
    # a 2-D Gaussian's mean squared distance is 2 sigma^2: sqrt(18 / 200) = 0.3
    assert result.values["compactness"][0] == pytest.approx(0.3, rel=1e-3)


def test_vea_of_a_map_equal_to_the_mask() -> None:
    inst = box_instance([10, 5, 30, 25])
    result = METRICS.build("vea").compute(batch_of(inst.mask.astype(np.float32), [inst], [0]))
    np.testing.assert_allclose(result.curves["vea"].y[0], np.ones(9))
    assert result.values["vea"][0] == pytest.approx(0.8)  # trapezoid over t in [0.1, 0.9]


def test_vea_of_a_ramp_by_hand() -> None:
    """Map = column / 49 over a 40 x 50 image; the mask is the right half (columns 25..49).
    Map > t keeps columns c > 49 t; IoU with the mask is then |c > 49t| / 25 for t >= 0.5
    and 25 / |c > 49t| below."""
    heat = np.tile(np.arange(W, dtype=np.float32) / (W - 1), (H, 1))
    inst = box_instance([25, 0, 50, 40])
    result = METRICS.build("vea").compute(batch_of(heat, [inst], [0]))
    expected = []
    for t in VEA_THRESHOLDS:
        cols = sum(1 for c in range(W) if c / (W - 1) > t)
        expected.append(min(cols, 25) / max(cols, 25))
    np.testing.assert_allclose(result.curves["vea"].y[0], expected)
    e = np.asarray(expected)
    assert result.values["vea"][0] == pytest.approx(0.1 * ((e[:-1] + e[1:]) / 2).sum())


def test_odi_counts_overlaps_as_other_objects() -> None:
    """A = [0,0,10,10], B = [5,0,15,10] overlap on 50 px; union 150 px."""
    a, b = box_instance([0, 0, 10, 10]), box_instance([5, 0, 15, 10], label=2)
    crowd = box_instance([0, 0, 50, 40], ignore=True)  # crowd regions take no part
    maps = [
        np.ones((H, W)),  # uniform: other / all = 100 / 150
        impulse(5, 7),  # in the overlap: "other"
        impulse(5, 2),  # in A only
        impulse(30, 40),  # in no object: undefined
    ]
    result = METRICS.build("odi").compute(batch_of(maps, [a, b, crowd], [0, 0, 0, 0]))
    for kind in ("box", "mask"):
        values = result.values[f"odi_{kind}"]
        assert values[:3].tolist() == pytest.approx([100 / 150, 1.0, 0.0])
        assert np.isnan(values[3])
        assert "no heat-map energy" in result.reasons[f"odi_{kind}"][3]


def test_odi_function_with_three_objects() -> None:
    regions = box_masks(np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]), (H, W))
    heat = impulse(5, 5, 1.0) + impulse(5, 25, 2.0) + impulse(5, 45, 3.0)
    value = object_discrimination_index(heat[None].repeat(3, 0), regions, np.array([0, 1, 2]))
    np.testing.assert_allclose(value, [5 / 6, 4 / 6, 3 / 6])


def test_constant_nan_and_zero_maps_give_nan_with_a_reason() -> None:
    gt = [box_instance([10, 5, 30, 25])]
    nan_map = np.ones((H, W))
    nan_map[3, 3] = np.nan
    maps = [np.full((H, W), 2.0), nan_map, np.zeros((H, W))]
    batch = batch_of(maps, gt, [0, 0, 0])
    pg = METRICS.build("pointing-game").compute(batch)
    assert np.isnan(pg.values["pg_box"]).all()
    assert pg.reasons["pg_box"].tolist()[:2] == ["constant map", "map has NaN or infinite values"]
    energy = METRICS.build("energy-pg").compute(batch)
    assert energy.values["epg_box"][0] == pytest.approx(0.2)  # a constant map has energy
    assert np.isnan(energy.values["epg_box"][1:]).all()
    assert energy.reasons["epg_box"][2] == "map sums to zero"
    for name, column in [("compactness", "compactness"), ("vea", "vea"), ("odi", "odi_box")]:
        result = METRICS.build(name).compute(batch)
        assert np.isnan(result.values[column][1:]).all(), name
        assert all(result.reasons[column][1:]), name
    assert "constant map" in METRICS.build("vea").compute(batch).reason(0)


def test_missing_ground_truth_or_mask_gives_nan_with_a_reason() -> None:
    gt = [box_instance([10, 5, 30, 25], mask=False)]
    result = METRICS.build("energy-pg").compute(batch_of([impulse(10, 20)] * 2, gt, [0, -1]))
    assert result.values["epg_box"][0] == 1.0
    assert np.isnan(result.values["epg_mask"][0])
    assert result.reasons["epg_mask"][0] == "ground-truth instance has no mask"
    assert result.reasons["epg_box"][1] == "no matched ground-truth instance"


def test_unknown_region_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="'box' and/or 'mask'"):
        METRICS.build("pointing-game", regions=("polygon",))


# -- properties ------------------------------------------------------------------------

small_maps = arrays(
    np.float32, (6, 8), elements=st.floats(0, 1e3, allow_nan=False, width=32, allow_subnormal=False)
)
boxes = st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(1, 8), st.integers(1, 6)).map(
    lambda b: [b[0], b[1], max(b[0] + 1, b[2]), max(b[1] + 1, b[3])]
)


def small_batch(heat: np.ndarray, box_a, box_b) -> tuple:
    size = heat.shape
    inst = [
        Instance(np.array(b, np.float32), 1, box_masks(np.array([b]), size)[0])
        for b in (box_a, box_b)
    ]
    n = 1
    detections = Detections(
        boxes=torch.tensor([box_a], dtype=torch.float32),
        scores=torch.ones(n),
        labels=torch.ones(n, dtype=torch.long),
        class_probs=torch.ones(n, 2),
        provenance=Provenance.empty(),
        image_size=size,
    )
    return ExplainedBatch(
        np.zeros((*size, 3), np.uint8), heat[None], [Target(0)], detections, inst, np.array([0])
    )


METRIC_COLUMNS = {
    "pointing-game": ["pg_box", "pg_mask"],
    "energy-pg": ["epg_box", "epg_mask"],
    "compactness": ["compactness"],
    "vea": ["vea"],
    "odi": ["odi_box", "odi_mask"],
}
RANGES = {"pg": (0, 1), "epg": (0, 1), "odi": (0, 1), "vea": (0, 0.8), "compactness": (0, np.inf)}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(heat=small_maps, box_a=boxes, box_b=boxes, scale=st.floats(1e-3, 1e3))
def test_metrics_lie_in_their_ranges_and_ignore_the_scale_of_the_map(
    heat: np.ndarray, box_a, box_b, scale: float
) -> None:
    batch = small_batch(heat, box_a, box_b)
    scaled = small_batch(heat * np.float32(scale), box_a, box_b)
    for name, columns in METRIC_COLUMNS.items():
        metric = METRICS.build(name)
        result, result_scaled = metric.compute(batch), metric.compute(scaled)
        for column in columns:
            value = result.values[column][0]
            if np.isnan(value):
                assert result.reasons[column][0], (name, column)
                continue
            lo, hi = RANGES[column.split("_")[0]]
            assert lo - 1e-9 <= value <= hi + 1e-9, (column, value)
            assert result_scaled.values[column][0] == pytest.approx(value, rel=1e-4, abs=1e-6)
    if len(np.unique(heat)) > 1:
        assert pointing_game(heat[None], box_masks(np.array([box_a]), heat.shape))[0] in (0, 1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(heat=small_maps)
def test_vea_curve_is_an_iou(heat: np.ndarray) -> None:
    regions = box_masks(np.array([[1, 1, 5, 4]]), heat.shape)
    curve = vea_curve(heat[None], regions)
    assert ((curve >= 0) & (curve <= 1)).all()
