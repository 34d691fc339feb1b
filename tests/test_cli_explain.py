"""``xaibench explain`` and ``xaibench list`` from the command line."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.visualize import colour_bar

runner = CliRunner()


def test_explain_writes_overlays_maps_and_json(tmp_path, random_image: np.ndarray) -> None:
    image_path = tmp_path / "scene.png"
    Image.fromarray(random_image[..., 0]).save(image_path)  # a grayscale file works too
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "explain", str(image_path), "--detector", "fcos_resnet50_fpn",
            "--detector-param", "num_classes=4", "--detector-param", "min_size=128",
            "--detector-param", "max_size=192", "--detector-param", "score_thresh=0.0",
            "--attribute", "score", "--attribute", "combined", "--top-k", "2",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "scene.detections.json").read_text())
    assert payload["image_size"] == [150, 200]
    explained = [d for d in payload["detections"] if d["explained"]]
    assert len(explained) == 2
    for record in explained:
        assert set(record["maps"]) == {"odam:score", "odam:combined"}
        assert {"level", "y", "x", "anchor", "class_index"} <= set(record["provenance"])
        for files in record["maps"].values():
            heat = np.load(out / files["npy"])
            assert heat.shape == (150, 200) and heat.dtype == np.float32
            bar = colour_bar(heat, 150).shape[1]  # the overlay, then its colour bar
            assert Image.open(out / files["png"]).size == (200 + bar, 150)
    scores = [d["score"] for d in explained]
    assert scores == sorted(scores, reverse=True)


def test_unknown_detector_lists_the_known_ones(tmp_path, random_image: np.ndarray) -> None:
    image_path = tmp_path / "scene.png"
    Image.fromarray(random_image).save(image_path)
    result = runner.invoke(app, ["explain", str(image_path), "--detector", "fcos_r50"])
    assert result.exit_code != 0
    assert "fcos_resnet50_fpn" in result.output


def test_list_shows_every_registry() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for kind in ("detectors", "methods", "metrics", "nms", "recipes", "datasets"):
        assert kind in result.output
    assert "odam" in result.output
    filtered = runner.invoke(app, ["list", "*fcos*", "--kind", "detectors"])
    assert "fcos_resnet50_fpn" in filtered.output and "retinanet" not in filtered.output
