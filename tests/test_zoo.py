"""Demo detectors, their cache and their COCO evaluation.

The ``slow`` tests load the demo detectors from the cache (``$XAIBENCH_CACHE``), training
them first if they are missing (up to about ten minutes each on two CPU cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from xaibench.detectors.training import BaselineConfig, CheckpointError
from xaibench.detectors.zoo import DEMO_CLASS_NAMES, DEMOS, demo_data

from xaibench.cache import atomic_write, cache_dir
from xaibench.coco_eval import evaluate_coco
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.registry import DETECTORS
from xaibench.types import Detections, Provenance, Sample


def ground_truth_as_detections(sample: Sample, shift: float = 0.0) -> Detections:
    """Every non-ignored ground-truth box as a detection of score 1, moved ``shift`` px right."""
    kept = [inst for inst in sample.instances if not inst.ignore]
    n = len(kept)
    boxes = torch.tensor(np.array([inst.box for inst in kept], np.float32).reshape(-1, 4))
    zeros = torch.zeros(n, dtype=torch.long)
    return Detections(
        boxes=boxes + torch.tensor([shift, 0.0, shift, 0.0]),
        scores=torch.ones(n),
        labels=torch.tensor([inst.label for inst in kept], dtype=torch.long),
        class_probs=torch.zeros(n, len(DEMO_CLASS_NAMES)),
        provenance=Provenance(level=zeros, y=zeros, x=zeros, anchor=zeros, class_index=zeros),
        image_size=sample.size,
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    split = generate_synthetic(tmp_path_factory.mktemp("scenes"), 6, seed=5, image_size=(96, 96))
    return CocoDataset(split.annotation_file, split.images_dir)


def test_evaluate_coco_scores_the_ground_truth_as_perfect(scenes: CocoDataset) -> None:
    perfect = [ground_truth_as_detections(scenes[i]) for i in range(len(scenes))]
    assert evaluate_coco(perfect, scenes)["AP50"] == pytest.approx(1.0)
    assert evaluate_coco(perfect, scenes)["AP"] == pytest.approx(1.0)


def test_evaluate_coco_skips_the_background_label(scenes: CocoDataset) -> None:
    detections = [ground_truth_as_detections(scenes[i]) for i in range(len(scenes))]
    for det in detections:
        det.labels = torch.zeros_like(det.labels)  # FCOS's sigmoid head can predict label 0
    assert evaluate_coco(detections, scenes)["AP50"] == 0.0


def test_evaluate_coco_of_shifted_or_missing_boxes(scenes: CocoDataset) -> None:
    shifted = [ground_truth_as_detections(scenes[i], shift=200.0) for i in range(len(scenes))]
    assert evaluate_coco(shifted, scenes)["AP50"] == 0.0
    empty = [Detections.empty(len(DEMO_CLASS_NAMES), scenes[i].size) for i in range(len(scenes))]
    assert evaluate_coco(empty, scenes) == dict.fromkeys(evaluate_coco(empty, scenes), 0.0)
    with pytest.raises(ValueError, match="detections for 1 images but the dataset has 6"):
        evaluate_coco(empty[:1], scenes)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XAIBENCH_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit" and cache_dir().is_dir()
    monkeypatch.delenv("XAIBENCH_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "xaibench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "xaibench"


def test_interrupted_atomic_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.pt"
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_weights_name_the_file_and_the_fix(tmp_path: Path) -> None:
    weights = tmp_path / "detectors" / "synthetic-fcos" / "weights.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"synthetic-fcos/weights\.pt.*retrain=True"):
        DETECTORS.build("synthetic-fcos", cache_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_detector_reaches_ap50_on_held_out_scenes(name: str) -> None:
    detector = DETECTORS.build(name, progress=False)
    val = demo_data()["val"]
    detections = detector.detect([val[i].image for i in range(len(val))])
    ap50 = evaluate_coco(detections, val)["AP50"]
    assert ap50 >= 0.9
    info = json.loads((cache_dir() / "detectors" / name / "info.json").read_text())
    assert info["val"]["AP50"] == pytest.approx(ap50, abs=1e-6)
    assert detector.class_names == DEMO_CLASS_NAMES


def test_training_on_first_use_says_so_where_and_how_far(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cold cache trains the demo detector: one line on stderr naming it and its cache
    folder, progress lines even without a progress bar, and a last line when it is cached."""
    from xaibench.detectors import zoo

    tiny = BaselineConfig(iterations=4, batch_size=2, warmup_iterations=0)
    monkeypatch.setitem(zoo.DEMOS, "synthetic-fcos", zoo.DemoSpec(zoo.build_small_fcos, tiny))
    monkeypatch.setattr(zoo, "DEMO_DATA", {"train": (4, 0), "val": (2, 1)})
    zoo.load_demo("synthetic-fcos", cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err
    folder = tmp_path / "detectors" / "synthetic-fcos"
    assert "training the demo detector synthetic-fcos on first use (4 steps" in err
    assert f"it will be cached in {folder}" in err
    assert "step 2/4" in err and "step 4/4" in err
    assert f"cached in {folder}" in err.splitlines()[-1]
    zoo.load_demo("synthetic-fcos", cache_dir=tmp_path, progress=False)  # cached: silent
    assert capsys.readouterr().err == ""
