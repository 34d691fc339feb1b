"""``xaibench train`` on eight tiny synthetic scenes with a tiny FCOS (seconds on a CPU):
outputs, the validation AP50, refusing to overwrite a run, and resuming after a crash."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner
from xaibench.detectors.training import BaselineConfig, FitRecipe, detector_losses

from xaibench.cli import app
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.registry import RECIPES
from xaibench.types import Sample

runner = CliRunner()
cli_train = importlib.import_module("xaibench.cli.train")  # the module, not the command
TINY = [
    "image_size=64",
    "widths=[8, 8, 16, 16, 32]",
    "fpn_channels=32",
    "head_convs=1",
]
STEPS = ["iterations=6", "batch_size=2", "warmup_iterations=2", "hflip=0.5"]
CONFIGS = Path(__file__).parent.parent / "configs" / "train"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    return generate_synthetic(tmp_path_factory.mktemp("scenes"), 8, image_size=(64, 64))


def _args(scenes, out: Path, recipe: str = "odam-train") -> list[str]:
    data = [str(scenes.annotation_file), "--images", str(scenes.images_dir)]
    args = ["train", recipe, "--dataset", *data[:1], *data[1:], "--val-dataset", data[0]]
    args += ["--val-images", data[2], "--checkpoint-every", "3", "--no-progress"]
    args += ["--out", str(out), "--device", "cpu"]
    for item in TINY:
        args += ["--detector-param", item]
    for item in STEPS:
        args += ["--set", item]
    return args


def _text(output: str) -> str:
    """The output without rich's error-box borders, on one line."""
    return " ".join(output.replace("│", " ").split())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)["model"]


class Crash(Exception):
    pass


class CrashAfter:
    """The dataset, until ``reads`` samples have been read; then the process 'dies'."""

    def __init__(self, dataset: CocoDataset, reads: int) -> None:
        self.dataset, self.reads = dataset, reads
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        if self.reads == 0:
            raise Crash
        self.reads -= 1
        return self.dataset[index]


def test_train_writes_weights_and_the_validation_ap50(scenes, tmp_path: Path) -> None:
    result = runner.invoke(app, _args(scenes, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "info.json").read_text())
    assert info["recipe"] == "odam-train" and info["iterations"] == 6
    assert 0.0 <= info["val"]["AP50"] <= 1.0 and info["val"]["images"] == 8
    assert info["config"]["odam_weight"] is None and info["config"]["checkpoint_every"] == 3
    assert "validation AP50" in result.output
    # a second run into the same folder is refused: it would silently resume
    again = runner.invoke(app, _args(scenes, tmp_path / "run"))
    assert again.exit_code == 2 and "pass --resume" in _text(again.output)


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(
    scenes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = runner.invoke(app, _args(scenes, tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output

    real = cli_train.load_training_data
    with monkeypatch.context() as patch:  # dies reading the batch of step 4 (0-based)
        patch.setattr(cli_train, "load_training_data", lambda d, i: CrashAfter(real(d, i), 9))
        crashed = runner.invoke(app, _args(scenes, tmp_path / "resumed"))
    assert isinstance(crashed.exception, Crash)
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3 and not (tmp_path / "resumed" / "weights.pt").exists()

    resumed = runner.invoke(app, [*_args(scenes, tmp_path / "resumed"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    expected = _weights(tmp_path / "straight")
    for name, value in _weights(tmp_path / "resumed").items():
        assert torch.equal(value, expected[name]), name


def test_resume_without_a_checkpoint_and_bad_settings_are_refused(scenes, tmp_path) -> None:
    result = runner.invoke(app, [*_args(scenes, tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and "no checkpoint" in _text(result.output)
    result = runner.invoke(app, [*_args(scenes, tmp_path / "bad"), "--set", "lr=-1"])
    assert result.exit_code == 2 and "lr" in _text(result.output)
    result = runner.invoke(app, ["train", "featurenms-embedding", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not train a detector module" in _text(result.output)


class ScaledConfig(BaselineConfig):
    scale: float = Field(1.0, gt=0, description="factor on the detector's losses")


SCALES_SEEN: list[float] = []


def scaled_losses(model: torch.nn.Module, config: ScaledConfig):
    """A new recipe's losses: the detector's own, times ``config.scale``."""
    SCALES_SEEN.append(config.scale)

    def losses(model, images, targets):
        terms = detector_losses(model, images, targets)
        return {name: config.scale * value for name, value in terms.items()}

    return losses


RECIPES.register("scaled-baseline", FitRecipe("scaled-baseline", ScaledConfig, scaled_losses))


def test_a_new_recipe_is_one_fit_recipe_registration(scenes, tmp_path: Path) -> None:
    args = _args(scenes, tmp_path / "run", recipe="scaled-baseline")
    result = runner.invoke(app, [*args, "--set", "scale=0.5"])
    assert result.exit_code == 0, result.output
    assert SCALES_SEEN == [0.5]
    info = json.loads((tmp_path / "run" / "info.json").read_text())
    assert info["recipe"] == "scaled-baseline" and info["config"]["scale"] == 0.5
    bad = runner.invoke(app, [*_args(scenes, tmp_path / "bad", "scaled-baseline"), "-s", "scale=0"])
    assert bad.exit_code == 2 and "scale" in _text(bad.output) and SCALES_SEEN == [0.5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- {config: {lr: 0.1}}\n", "expected a mapping of sections config"),
        ("config: {}\nschedule: cosine\n", "got schedule"),
        ("config: [unclosed\n", "cannot read it"),
    ],
)
def test_malformed_config_files_name_the_file(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = runner.invoke(
        app, ["train", "baseline", "--config", str(path), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert f"--config {path}" in _text(result.output) and expected in _text(result.output)


@pytest.mark.parametrize(
    ("name", "epochs", "lr", "weight"),
    [
        ("coco_fcos_odam_train.yaml", 12, 0.01, 0.5),
        ("coco_frcnn_odam_train.yaml", 12, 0.02, 0.2),
        ("crowdhuman_fcos_odam_train.yaml", 30, 0.01, 0.5),
        ("crowdhuman_frcnn_odam_train.yaml", 30, 0.02, 0.2),
    ],
)
def test_paper_settings_ship_as_valid_configs(name, epochs, lr, weight) -> None:
    from xaibench.detectors.odam_train import OdamTrainConfig

    config, params = cli_train.read_config_file(CONFIGS / name)
    settings = OdamTrainConfig(**config)
    assert settings.epochs == epochs and settings.batch_size == 16 and settings.lr == lr
    assert settings.optimizer == "sgd" and settings.odam_weight == weight
    assert settings.total_iterations(118287) == epochs * 7393
    assert params["min_size"] == 800


def test_missing_data_and_unknown_names_end_in_one_line(tmp_path) -> None:
    missing = tmp_path / "none.json"
    data = ["--dataset", str(missing), "--images", str(tmp_path), "--val-dataset", str(missing)]
    cases = [
        (
            ["baseline", *data, "--val-images", str(tmp_path)],
            f"--dataset: annotation file {missing}",
        ),
        (["baselin"], "RECIPE: unknown recipes 'baselin'. Did you mean 'baseline'?"),
        (["baseline", "--detector", "nope"], "--detector: unknown detectors 'nope'"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert expected in _text(result.output) and "Traceback" not in result.output
