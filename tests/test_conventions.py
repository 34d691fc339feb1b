"""The two conventions of each choice where xaibench and the official ODAM scripts differ, on
cases whose numbers are worked out by hand: box pixels (a box with fractional edges), the
insertion curve's step 0 (a detector that scores the black image above zero) and D-RISE's
masked images (a mask whose uint8 rounding changes the score); then the ``paper`` preset and
how the convention travels with every stored result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from scipy.integrate import trapezoid
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject
from xaibench.methods.drise import DRISE
from xaibench.metrics.regions import box_interior_masks, box_masks

from xaibench.images import to_rgb_float
from xaibench.leaderboard import build_leaderboard
from xaibench.metric import ExplainedBatch, format_conventions
from xaibench.registry import METRICS, PRESETS
from xaibench.runner import run_suite
from xaibench.store import STORE_FILE, connect, load_results
from xaibench.suite import SuiteError, apply_preset, load_suite, validate_suite
from xaibench.types import Detections, Instance, Provenance, Target

H, W = 8, 8
FRACTIONAL = np.array([2.3, 1.6, 5.5, 4.2])


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def map_batch(maps: np.ndarray, boxes: list[list[float]], gt_index: list[int]) -> ExplainedBatch:
    """Maps (N, H, W) of targets explaining the ground-truth boxes ``gt_index``."""
    instances = [Instance(np.array(b, np.float32), 1) for b in boxes]
    n = len(gt_index)
    detections = Detections(
        boxes=torch.tensor(np.array([boxes[g] for g in gt_index]), dtype=torch.float32),
        scores=torch.ones(n),
        labels=torch.ones(n, dtype=torch.long),
        class_probs=torch.ones(n, 2),
        provenance=Provenance.empty(),
        image_size=(H, W),
    )
    return ExplainedBatch(
        np.zeros((H, W, 3), np.uint8), maps, [Target(i) for i in range(n)], detections,
        instances, np.asarray(gt_index),
    )  # fmt: skip


# -- 1. box pixels -----------------------------------------------------------------------------


def test_a_fractional_box_by_pixel_centres_and_by_the_official_floor_ceil() -> None:
    """x 2.3..5.5, y 1.6..4.2: centres 2.5..5.5 and 2.5, 3.5 are inside (4 x 2 pixels);
    floor/ceil take columns 2..5 and rows 1..4 (4 x 4 pixels)."""
    centre = box_masks(FRACTIONAL[None], (H, W))[0]
    odam = box_masks(FRACTIONAL[None], (H, W), "odam")[0]
    assert np.argwhere(centre.any(axis=0)).ravel().tolist() == [2, 3, 4, 5]
    assert np.argwhere(centre.any(axis=1)).ravel().tolist() == [2, 3]
    assert np.argwhere(odam.any(axis=0)).ravel().tolist() == [2, 3, 4, 5]
    assert np.argwhere(odam.any(axis=1)).ravel().tolist() == [1, 2, 3, 4]
    assert (centre.sum(), odam.sum()) == (8, 16)
    # integer corners: the two agree on the pixels (x2 - x1) * (y2 - y1)
    whole = np.array([[1, 2, 6, 7]])
    np.testing.assert_array_equal(box_masks(whole, (H, W)), box_masks(whole, (H, W), "odam"))
    with pytest.raises(ValueError, match="centre, odam"):
        box_masks(whole, (H, W), "floor")


def test_energy_pg_of_a_uniform_map_with_each_box_convention() -> None:
    batch = map_batch(np.ones((1, H, W), np.float32), [FRACTIONAL.tolist()], [0])
    centre = METRICS.build("energy-pg", regions=["box"]).compute(batch)
    odam = METRICS.build("energy-pg", regions=["box"], box_convention="odam").compute(batch)
    assert centre.values["epg_box"][0] == pytest.approx(8 / 64)
    assert odam.values["epg_box"][0] == pytest.approx(16 / 64)


def test_pointing_game_by_centre_and_by_strict_pixel_indices() -> None:
    """Peaks (row, col): (2, 3) inside both; (4, 5): centre 4.5 > 4.2 misses, index
    4 < 4.2 hits; (1, 3): both miss; (2, 2) in the integer box 2..6: the centre hits, the
    strict 2 < 2 misses."""
    peaks = [(2, 3), (4, 5), (1, 3), (2, 2)]
    maps = np.zeros((4, H, W), np.float32)
    for k, (r, c) in enumerate(peaks):
        maps[k, r, c] = 1.0
    batch = map_batch(maps, [FRACTIONAL.tolist(), [2, 2, 6, 6]], [0, 0, 0, 1])
    centre = METRICS.build("pointing-game", regions=["box"]).compute(batch)
    odam = METRICS.build("pointing-game", regions=["box"], box_convention="odam").compute(batch)
    assert centre.values["pg_box"].tolist() == [1, 0, 0, 1]
    assert odam.values["pg_box"].tolist() == [1, 1, 0, 0]
    assert box_interior_masks(np.array([[2, 2, 6, 6]]), (H, W))[0].sum() == 3 * 3


def test_odi_with_each_box_convention() -> None:
    """Target box x 0..2.5, other box x 2.6..6 (full height), uniform map. Centres: columns
    0-2 and 3-5, ODI 3/6. Floor/ceil: the other box takes column 2 too (shared columns count
    as other), ODI 4/6."""
    batch = map_batch(np.ones((1, H, W), np.float32), [[0, 0, 2.5, 8], [2.6, 0, 6, 8]], [0])
    centre = METRICS.build("odi", regions=["box"]).compute(batch)
    odam = METRICS.build("odi", regions=["box"], box_convention="odam").compute(batch)
    assert centre.values["odi_box"][0] == pytest.approx(3 / 6)
    assert odam.values["odi_box"][0] == pytest.approx(4 / 6)


def test_vea_of_the_box_with_each_convention() -> None:
    """A map that is 1 on the floor/ceil pixels of the box: IoU 1 against them at every
    threshold, 8/16 against the pixel centres; AUC = IoU * 0.8."""
    heat = box_masks(FRACTIONAL[None], (H, W), "odam").astype(np.float32)
    batch = map_batch(heat, [FRACTIONAL.tolist()], [0])
    centre = METRICS.build("vea", region="box").compute(batch)
    odam = METRICS.build("vea", region="box", box_convention="odam").compute(batch)
    assert centre.values["vea"][0] == pytest.approx(0.5 * 0.8)
    assert odam.values["vea"][0] == pytest.approx(0.8)


# -- 2. insertion step 0 -----------------------------------------------------------------------

OBJECT = EvidenceObject(box=(0, 0, 8, 8), label=1, region=(0, 0, 8, 8))


class Counting(EvidenceDetector):
    """The evidence detector, counting the images it is shown."""

    seen = 0

    def detect(self, images, batch_size: int = 8, nms: bool = True) -> list[Detections]:
        self.seen += len(images)
        return super().detect(images, batch_size, nms)


def insertion_batch(detector: EvidenceDetector) -> ExplainedBatch:
    """A white 8 x 8 image, a map falling in row-major order (pixels go in row by row)."""
    image = np.full((H, W, 3), 255, np.uint8)
    heat = np.arange(H * W, 0, -1, dtype=np.float32).reshape(H, W)
    (det,) = detector.detect([image])
    return ExplainedBatch(
        image, heat[None], [Target(0)], det, [Instance(np.array(OBJECT.box, np.float32), 1)],
        np.array([0]),
    )  # fmt: skip


def test_insertion_step_zero_from_the_detector_and_the_official_zero() -> None:
    """4 steps of 64 / 4 = 16 pixels, read every step: after k steps e = k / 4 and the score
    is sigmoid(10 k / 4 - 5); the black image scores sigmoid(-5) = 0.0067 > 0, which the
    official script replaces by 0, lowering the AUC by 0.25 / 2 * sigmoid(-5) * 100."""
    detector = Counting([OBJECT], stride=4)
    batch = insertion_batch(detector)
    x = np.linspace(0, 1, 5)
    expected = np.array([sigmoid(10 * k / 4 - 5) for k in range(5)])
    settings = {"steps": 4, "eval_every": 1}

    detector.seen = 0
    default = METRICS.build("insertion", **settings).compute(batch, detector)
    shown_default = detector.seen
    detector.seen = 0
    official = METRICS.build("insertion", start="zero", **settings).compute(batch, detector)
    np.testing.assert_allclose(default.curves["insertion"].y[0], expected, rtol=1e-5)
    np.testing.assert_allclose(
        official.curves["insertion"].y[0], [0, *expected[1:]], rtol=1e-5, atol=0
    )
    assert default.values["insertion"][0] == pytest.approx(trapezoid(expected, x) * 100, 1e-5)
    gap = default.values["insertion"][0] - official.values["insertion"][0]
    assert gap == pytest.approx(0.25 / 2 * sigmoid(-5) * 100, rel=1e-4)
    assert (shown_default, detector.seen) == (5, 4)  # the black image is not run


def test_insertion_start_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="detector, zero"):
        METRICS.build("insertion", start="black")
    with pytest.raises(ValueError, match="normalise"):
        METRICS.build("insertion", start="zero", normalise=True)
    assert METRICS.build("insertion", start="zero").conventions() == {"insertion_start": "zero"}


# -- 3. D-RISE masked images -------------------------------------------------------------------

# a steep read-out: e = 0.5 / 255 moves the logit by 2
STEEP = EvidenceObject(box=(0, 0, 8, 8), label=1, region=(0, 0, 8, 8), gain=1020.0, bias=-2.0)


def test_float_images_reach_the_detector_unrounded() -> None:
    detector = EvidenceDetector([STEEP], stride=4)
    half = np.full((H, W, 3), 0.5 / 255, np.float32)  # 0.5 grey levels: rounds to 0
    (uint8,) = detector.detect([np.zeros((H, W, 3), np.uint8)])
    (unrounded,) = detector.detect([half])
    assert float(uint8.scores[0]) == pytest.approx(sigmoid(-2), rel=1e-5)
    assert float(unrounded.scores[0]) == pytest.approx(0.5, rel=1e-5)
    exact = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_float(exact) * 255, exact.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_float(np.full((H, W, 3), 2.0))


def drise_weight(target: np.ndarray, masked_score: float) -> float:
    """IoU (1: the box never moves) x cos of the class probabilities (1 - s, s)."""
    p = np.array([1 - masked_score, masked_score])
    return float(p @ target / (np.linalg.norm(p) * np.linalg.norm(target)))


def test_drise_masking_uint8_and_float() -> None:
    """An image of grey level 1 under one mask of 0.5: rounded, the masked image is black
    (score sigmoid(-2)); as the float product it is level 0.5 (score sigmoid(0) = 0.5). The
    original scores sigmoid(2); the map is the weight times the mask."""
    detector = EvidenceDetector([STEEP], stride=4)
    image = np.ones((H, W, 3), np.uint8)
    masks = np.full((1, H, W), 0.5)
    s0 = sigmoid(2.0)
    target = np.array([1 - s0, s0])
    maps = {}
    for masking in ("uint8", "float"):
        method = DRISE(masks=masks, masking=masking, progress=False)
        (saliency,) = method.explain(detector, image, [Target(0)])
        maps[masking] = saliency.map
        assert saliency.params["masking"] == masking
    np.testing.assert_allclose(maps["uint8"], 0.5 * drise_weight(target, sigmoid(-2)), rtol=1e-5)
    np.testing.assert_allclose(maps["float"], 0.5 * drise_weight(target, 0.5), rtol=1e-5)
    assert maps["float"][0, 0] > maps["uint8"][0, 0] + 0.1
    assert DRISE(masking="float").conventions() == {"drise_masking": "float"}
    with pytest.raises(ValueError, match="uint8, float"):
        DRISE(masking="round")


# -- 4. the paper preset and stored conventions ------------------------------------------------


def test_the_paper_preset_selects_the_official_conventions() -> None:
    paper = PRESETS.get("paper")
    suite = validate_suite(
        {
            "name": "p",
            "datasets": [{"name": "s", "kind": "synthetic"}],
            "detectors": [{"name": "evidence-toy"}],
            "methods": [{"name": "drise", "params": {"n": 10}}, {"name": "odam"}],
            "metrics": [
                "pointing-game",
                {"name": "energy-pg", "params": {"box_convention": "centre"}},
                "insertion",
                "deletion",
            ],
            "preset": "paper",
        }
    )
    merged = apply_preset(suite)
    assert [m.params for m in merged.methods] == [{"masking": "float", "n": 10}, {}]
    assert [m.params for m in merged.metrics] == [
        {"box_convention": "odam"},
        {"box_convention": "centre"},  # the entry's own setting wins
        {"start": "zero"},
        {},
    ]
    assert paper.metrics["insertion"] == {"start": "zero"}
    assert apply_preset(suite.model_copy(update={"preset": None})) == suite.model_copy(
        update={"preset": None}
    )
    with pytest.raises(SuiteError, match=r"preset: unknown presets 'papr'.*Known presets: paper"):
        apply_preset(suite.model_copy(update={"preset": "papr"}))


def test_format_conventions() -> None:
    assert format_conventions({}, {}) == ""
    assert (
        format_conventions({"drise_masking": "float"}, {"insertion_start": "zero"})
        == "drise_masking=float;insertion_start=zero"
    )


def tiny_suite(folder, preset: str | None):
    """The evidence detector on 2 synthetic scenes, ODAM, PG / energy PG / insertion."""
    raw = {
        "name": "tiny",
        "datasets": [
            {"name": "synth", "kind": "synthetic", "num_images": 2, "seed": 5, "split": "val"}
        ],
        "detectors": [{"name": "evidence-toy"}],
        "methods": [{"name": "odam"}],
        "metrics": [
            "pointing-game",
            "energy-pg",
            {"name": "insertion", "params": {"steps": 20}},
        ],
        "preset": preset,
        "selection": {"mode": "top-k", "params": {"top_k": 2}},
        "label_map": {"square": "object", "triangle": "other", "circle": None},
        "store": str(folder / "store"),
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_suite(path)


def test_a_preset_run_stores_its_conventions_and_tables_never_mix_them(tmp_path) -> None:
    plain = run_suite(tiny_suite(tmp_path, None), progress=False)
    paper = run_suite(tiny_suite(tmp_path, "paper"), progress=False)
    assert paper.computed == paper.total == plain.total  # other unit keys: nothing reused
    store = tmp_path / "store" / STORE_FILE
    old, _ = load_results(store, plain.run_id)
    new, _ = load_results(store, paper.run_id)
    conventions = lambda r: dict(r.groupby("column")["convention"].unique().map(list))  # noqa: E731
    assert conventions(old) == {
        "pg_box": ["box_convention=centre"],
        "pg_mask": ["box_convention=centre"],
        "epg_box": ["box_convention=centre"],
        "epg_mask": ["box_convention=centre"],
        "insertion": ["insertion_start=detector"],
    }
    assert conventions(new)["epg_box"] == ["box_convention=odam"]
    assert conventions(new)["insertion"] == ["insertion_start=zero"]
    board = build_leaderboard(tmp_path / "store", paper.run_id, resamples=99)
    shown = board.summary.set_index("column")["convention"]
    assert shown["epg_box"] == "box_convention=odam" and shown["seconds"] == ""
    # a store whose rows of one column mix conventions is refused, naming them
    conn = connect(store)
    conn.execute(
        "UPDATE results SET convention = 'box_convention=centre' WHERE rowid = (SELECT "
        "min(rowid) FROM results WHERE column = 'epg_box' AND unit_key IN (SELECT unit_key "
        "FROM plan WHERE run_id = ?))",
        (paper.run_id,),
    )
    conn.close()
    with pytest.raises(ValueError, match="mixes numbers of different conventions"):
        build_leaderboard(tmp_path / "store", paper.run_id, resamples=99)


def test_a_store_without_the_convention_column_gains_it(tmp_path) -> None:
    import sqlite3

    from xaibench.store import SCHEMA

    path = tmp_path / STORE_FILE
    raw = sqlite3.connect(path)
    raw.executescript(SCHEMA.replace(", convention TEXT", ""))
    raw.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    raw.commit()
    raw.close()
    conn = connect(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    conn.close()
    assert "convention" in columns


def test_the_command_line_lists_presets_and_refuses_an_unknown_one(tmp_path) -> None:
    from typer.testing import CliRunner

    from xaibench.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["list", "--kind", "presets"])
    assert listed.exit_code == 0 and "paper" in listed.output
    tiny_suite(tmp_path, None)
    result = runner.invoke(
        app, ["run", str(tmp_path / "tiny.yaml"), "--preset", "papr", "--no-progress"]
    )
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2
    assert "unknown presets 'papr'" in output and "Known presets: paper" in output
    assert not (tmp_path / "store" / STORE_FILE).exists()  # refused before any work
