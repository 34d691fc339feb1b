"""``xaibench compare`` and ``xaibench explain`` with each of the five methods, on the
evidence detector (fast, and its evidence is known)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from xaibench.detectors.evidence import evidence_image

from xaibench.cli import app

runner = CliRunner()
QUICK = {  # small settings so that the CLI runs in a second
    "drise": ["n=40", "batch_size=20", "progress=false"],
    "bbam": ["iterations=3", "progress=false"],
}


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "toy.png"
    Image.fromarray(evidence_image()).save(path)
    return path


def test_compare_draws_one_figure_and_writes_the_maps(tmp_path, image_path) -> None:
    out = tmp_path / "out"
    methods = ["odam", "gradcam", "gradcampp", "drise", "bbam"]
    params = [arg for m, items in QUICK.items() for item in items for arg in ("-p", f"{m}.{item}")]
    result = runner.invoke(
        app,
        ["compare", str(image_path), "--methods", ",".join(methods), "--detector",
         "evidence-toy", "--top-k", "2", "--out", str(out), *params],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figure = Image.open(out / "toy_comparison.png")
    assert figure.size == (260 * 5, 260 * 2)  # a column per method, a row per detection
    payload = json.loads((out / "detections.json").read_text())
    explained = [d for d in payload["detections"] if d["explained"]]
    assert len(explained) == 2 and len(payload["detections"]) == 3
    for record in explained:
        assert set(record["maps"]) == {f"{m}:score" for m in methods}
        for files in record["maps"].values():
            heat = np.load(out / files["npy"])
            assert heat.shape == (160, 160) and heat.dtype == np.float32
    assert payload["methods"]["drise"]["params"]["n"] == 40
    assert payload["methods"]["bbam"]["params"]["iterations"] == 3


def flat(output: str) -> str:
    """The CLI's error box without its frame and line breaks."""
    return " ".join(output.replace("│", " ").split())


def test_compare_rejects_bad_method_params(tmp_path, image_path) -> None:
    base = ["compare", str(image_path), "--methods", "odam,gradcam", "-d", "evidence-toy"]
    result = runner.invoke(app, [*base, "-p", "n=5"])
    assert result.exit_code != 0 and "METHOD.key=value" in flat(result.output)
    result = runner.invoke(app, [*base, "-p", "drise.n=5"])
    assert result.exit_code != 0 and "which is not in --methods" in flat(result.output)
    result = runner.invoke(app, [*base.copy()[:3], "odam,gradcamm", "-d", "evidence-toy"])
    assert result.exit_code != 0 and "gradcampp" in str(result.exception)


@pytest.mark.parametrize("method", ["odam", "gradcam", "gradcampp", "drise", "bbam"])
def test_explain_takes_every_method(tmp_path, image_path, method: str) -> None:
    out = tmp_path / method
    params = [arg for item in QUICK.get(method, []) for arg in ("-p", item)]
    result = runner.invoke(
        app,
        ["explain", str(image_path), "--detector", "evidence-toy", "--method", method,
         "--top-k", "1", "--out", str(out), *params],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "detections.json").read_text())
    (record,) = [d for d in payload["detections"] if d["explained"]]
    assert set(record["maps"]) == {f"{method}:score"}
