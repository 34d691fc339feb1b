"""``xaibench data synth``: writes a synthetic split and says where."""

import json

from PIL import Image
from typer.testing import CliRunner

from xaibench.cli.data import app
from xaibench.datasets import CocoDataset, read_odgt

runner = CliRunner()


def test_synth_writes_a_coco_split(tmp_path):
    result = runner.invoke(
        app, ["synth", "--out", str(tmp_path), "--num-images", "3", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote 3 objects images (160x160) to {tmp_path / 'train'}" in result.output
    assert str(tmp_path / "annotations" / "train.json") in result.output
    dataset = CocoDataset(tmp_path / "annotations" / "train.json", tmp_path / "train")
    assert len(dataset) == 3


def test_synth_crowd_with_size_split_and_polygons(tmp_path):
    args = ["synth", "--out", str(tmp_path), "-n", "2", "--mode", "crowd", "--size", "96", "128"]
    result = runner.invoke(app, [*args, "--split", "val", "--mask-format", "polygon"])
    assert result.exit_code == 0, result.output
    assert "CrowdHuman odgt" in result.output
    assert Image.open(tmp_path / "val" / "000001.png").size == (128, 96)  # (W, H)
    assert len(read_odgt(tmp_path / "annotations" / "val.odgt")) == 2
    coco = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert any(isinstance(a["segmentation"], list) for a in coco["annotations"])


def test_synth_height_and_width_options(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "-n", "1", "--height", "64"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "train" / "000000.png").size == (160, 64)


def test_synth_rejects_bad_arguments(tmp_path):
    both = ["synth", "--out", str(tmp_path), "--size", "64", "64", "--width", "80"]
    result = runner.invoke(app, both)
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--size", "8", "8"])
    assert result.exit_code == 2 and "image_size must be" in result.output
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--mode", "people"])
    assert result.exit_code == 2 and "--mode" in result.output
