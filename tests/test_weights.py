"""Detector weights said to the user: random weights warn, pretrained weights without the
internet end in one line naming the file and the folder to put it in."""

from __future__ import annotations

from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import fcos_resnet50_fpn
from typer.testing import CliRunner
from xaibench.detectors.weights import WeightsError, pretrained_file

from xaibench.cli import app
from xaibench.registry import DETECTORS

SMALL = {"num_classes": 4, "min_size": 128, "max_size": 128}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch.hub folder and no internet: every download fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*_args, **_kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_random_weights_say_so_and_how_to_give_weights() -> None:
    with pytest.warns(UserWarning, match=r"random weights.*--weights DEFAULT.*--weights PATH"):
        DETECTORS.build("fcos_resnet50_fpn", **SMALL)


def test_pretrained_weights_offline_name_the_file_and_the_folder(offline) -> None:
    url, path = pretrained_file(fcos_resnet50_fpn)
    assert path == offline / "fcos_resnet50_fpn_coco-99b0c9b7.pth" and url.endswith(path.name)
    with pytest.raises(WeightsError) as err:
        DETECTORS.build("fcos_resnet50_fpn", weights="DEFAULT")
    message = str(err.value)
    assert path.name in message and str(offline) in message and url in message
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot be loaded.*delete it"):
        DETECTORS.build("fcos_resnet50_fpn", weights="DEFAULT")


def test_cli_weights_messages(offline, tmp_path) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(image)
    base = ["explain", str(image), "-d", "fcos_resnet50_fpn", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*base, "--weights", "DEFAULT"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --weights:") and "fcos_resnet50_fpn_coco-99b0c9b7.pth" in line
    params = [f"--detector-param={k}={v}" for k, v in SMALL.items()]
    result = CliRunner().invoke(app, [*base, *params])
    assert result.exit_code == 0, result.output
    assert "warning: fcos_resnet50_fpn has random weights" in result.output
