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
    payload = json.loads((out / "toy.detections.json").read_text())
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
    assert result.exit_code != 0 and "gradcampp" in result.output


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
    payload = json.loads((out / "toy.detections.json").read_text())
    (record,) = [d for d in payload["detections"] if d["explained"]]
    assert set(record["maps"]) == {f"{method}:score"}


def test_one_method_twice_under_its_own_labels(tmp_path, image_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["compare", str(image_path), "--methods", "odam@plain,odam@gauss,gradcam",
         "-d", "evidence-toy", "--top-k", "1", "--out", str(out),
         "-p", "odam.mode=exact", "-p", "odam@gauss.smoothing=gaussian"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "odam@plain" in result.output and "odam@gauss" in result.output
    assert Image.open(out / "toy_comparison.png").size == (260 * 3, 260)  # a column per label
    payload = json.loads((out / "toy.detections.json").read_text())
    (record,) = [d for d in payload["detections"] if d["explained"]]
    assert set(record["maps"]) == {"odam@plain:score", "odam@gauss:score", "gradcam:score"}
    plain, gauss = (
        np.load(out / record["maps"][f"odam@{v}:score"]["npy"]) for v in ("plain", "gauss")
    )
    assert not np.allclose(plain, gauss)  # two settings, two files, two maps
    methods = payload["methods"]
    assert methods["odam@plain"]["method"] == methods["odam@gauss"]["method"] == "odam"
    assert methods["odam@gauss"]["params"]["smoothing"] == "gaussian"
    assert methods["odam@plain"]["params"]["smoothing"] == "none"
    assert (
        methods["odam@plain"]["params"]["mode"]
        == methods["odam@gauss"]["params"]["mode"]
        == "exact"
    )


def test_explain_keys_outputs_by_image(tmp_path) -> None:
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    Image.fromarray(evidence_image()).save(first)
    Image.fromarray(evidence_image()[:, ::-1].copy()).save(second)
    out = tmp_path / "out"
    for path in (first, second):  # one call per image, one folder
        result = runner.invoke(
            app, ["explain", str(path), "-d", "evidence-toy", "--top-k", "1", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
    both = runner.invoke(
        app,
        ["explain", str(first), str(second), "-d", "evidence-toy", "--out", str(tmp_path / "b")],
    )
    assert both.exit_code == 0, both.output
    for folder in (out, tmp_path / "b"):
        for stem in ("first", "second"):
            payload = json.loads((folder / f"{stem}.detections.json").read_text())
            assert payload["image"] == stem
            for d in payload["detections"]:
                for files in d["maps"].values():
                    assert files["npy"].startswith(f"{stem}_") and (folder / files["npy"]).exists()
    again = runner.invoke(
        app, ["explain", str(first), str(tmp_path / "x" / "first.jpg"), "-d", "evidence-toy"]
    )
    assert again.exit_code == 2 and "would write the same files" in flat(again.output)
