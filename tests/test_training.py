"""The ``baseline`` recipe on tiny detectors and tiny synthetic scenes (seconds on a CPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from xaibench.detectors.training import (
    BaselineConfig,
    CheckpointError,
    batch_indices,
    load_checkpoint,
    sample_to_target,
    train,
)
from xaibench.detectors.zoo import build_small_fcos, build_small_frcnn

from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.registry import RECIPES
from xaibench.types import Instance, Sample

TINY = {"image_size": 64, "widths": (8, 8, 16, 16, 32), "fpn_channels": 32}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    split = generate_synthetic(tmp_path_factory.mktemp("scenes"), 8, image_size=(64, 64))
    return CocoDataset(split.annotation_file, split.images_dir)


def tiny_fcos() -> nn.Module:
    torch.manual_seed(0)
    return build_small_fcos(4, head_convs=1, **TINY)


def tiny_frcnn() -> nn.Module:
    torch.manual_seed(0)
    return build_small_frcnn(4, representation=32, **TINY)


class Interrupted(Exception):
    pass


class FailingAfter:
    """A dataset that raises ``Interrupted`` once ``reads`` samples have been read."""

    def __init__(self, dataset: CocoDataset, reads: int) -> None:
        self.dataset, self.reads = dataset, reads

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        if self.reads == 0:
            raise Interrupted
        self.reads -= 1
        return self.dataset[index]


def test_registered_as_baseline() -> None:
    assert RECIPES.get("baseline") is train


def test_training_reduces_the_loss(scenes: CocoDataset) -> None:
    model = tiny_fcos()
    config = BaselineConfig(iterations=40, batch_size=4, lr=0.01, warmup_iterations=5)
    result = train(model, scenes, config, progress=False)
    assert result.iterations == 40 and len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    assert not model.training


@pytest.mark.parametrize("build", [tiny_fcos, tiny_frcnn], ids=["fcos", "frcnn"])
def test_resumed_run_ends_with_the_same_weights(
    build: Callable[[], nn.Module], scenes: CocoDataset, tmp_path: Path
) -> None:
    config = BaselineConfig(iterations=6, batch_size=2, warmup_iterations=2, checkpoint_every=3)
    straight = build()
    train(straight, scenes, config, progress=False)

    with pytest.raises(Interrupted):  # dies while reading the batch of step 4 (0-based)
        train(build(), FailingAfter(scenes, reads=9), config, tmp_path, progress=False)
    resumed = build()
    result = train(resumed, scenes, config, tmp_path, progress=False)

    assert result.iterations == 6 and len(result.losses) == 6
    assert result.checkpoint == tmp_path / "last.pt" and result.checkpoint.is_file()
    expected = straight.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_corrupt_checkpoint_names_the_file(scenes: CocoDataset, tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.pt.*corrupt"):
        train(tiny_fcos(), scenes, BaselineConfig(iterations=2), tmp_path, progress=False)


def test_resume_with_another_config_is_refused(scenes: CocoDataset, tmp_path: Path) -> None:
    train(tiny_fcos(), scenes, BaselineConfig(iterations=1, batch_size=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        config = BaselineConfig(iterations=1, batch_size=2, lr=0.5)
        train(tiny_fcos(), scenes, config, tmp_path, progress=False)


def test_config_length_in_iterations_or_epochs() -> None:
    assert BaselineConfig().total_iterations(100) == 1000
    assert BaselineConfig(epochs=3, batch_size=8).total_iterations(20) == 9
    with pytest.raises(ValidationError, match="exactly one of iterations and epochs"):
        BaselineConfig(iterations=10, epochs=2)
    with pytest.raises(ValidationError):
        BaselineConfig(optimizer="rmsprop")


def test_learning_rate_warms_up_then_follows_the_schedule() -> None:
    config = BaselineConfig(lr=0.1, warmup_iterations=10, schedule="step", milestones=(0.5,))
    assert config.lr_at(0, 100) == pytest.approx(1e-4)
    assert config.lr_at(10, 100) == pytest.approx(0.1)
    assert config.lr_at(60, 100) == pytest.approx(0.01)
    cosine = BaselineConfig(lr=0.1, warmup_iterations=0)
    assert cosine.lr_at(0, 100) == pytest.approx(0.1)
    assert cosine.lr_at(50, 100) == pytest.approx(0.05)


def test_every_sample_once_per_epoch() -> None:
    epoch = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=3)]
    assert sorted(epoch) == list(range(20))
    assert batch_indices(7, 4, 20, seed=3) == batch_indices(7, 4, 20, seed=3)


def test_sample_to_target_flips_boxes_and_drops_ignored() -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :5] = 255
    sample = Sample(
        image=image,
        image_id=1,
        instances=[
            Instance(box=np.array([0, 1, 5, 9], np.float32), label=2),
            Instance(box=np.array([6, 1, 9, 9], np.float32), label=1, ignore=True),
        ],
    )
    tensor, target = sample_to_target(sample, flip=True)
    assert tensor.shape == (3, 10, 20) and tensor[:, :, 15:].min() == 1.0
    assert target["boxes"].tolist() == [[15.0, 1.0, 20.0, 9.0]]
    assert target["labels"].tolist() == [2] and target["labels"].dtype == torch.int64


def test_nan_weights_in_a_checkpoint_name_the_file_and_the_tensors(tmp_path: Path) -> None:
    from xaibench.registry import DETECTORS

    torch.manual_seed(0)
    model = build_small_fcos(4)
    state = model.state_dict()
    state["head.classification_head.cls_logits.bias"][1] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"model": state}, path)
    with pytest.raises(
        CheckpointError,
        match=r"nan\.pt holds NaN or inf weights in head\."
        r"classification_head\.cls_logits\.bias \(1 of 4 values\); retrain",
    ):
        load_checkpoint(path, hint="retrain")
    with pytest.raises(CheckpointError, match=r"nan\.pt holds NaN or inf weights"):
        DETECTORS.build("fcos_resnet50_fpn", weights=str(path), num_classes=4)
    cached = tmp_path / "detectors" / "synthetic-fcos" / "weights.pt"
    cached.parent.mkdir(parents=True)
    torch.save({"model": state}, cached)  # the demo detector's cache, as a NaN run leaves it
    with pytest.raises(CheckpointError, match=r"weights\.pt holds NaN .*--detector-param retrain"):
        DETECTORS.build("synthetic-fcos", cache_dir=tmp_path)
