"""``xaibench nms`` on two small synthetic crowd images with a tiny untrained detector."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from xaibench.detectors.featurenms import EmbeddingConfig, save_embedding, train_embedding
from xaibench.detectors.torchvision import wrap
from xaibench.detectors.zoo import build_small_fcos
from xaibench.metrics.crowd import evaluate_crowd

from xaibench.cli import app
from xaibench.datasets.crowdhuman import CrowdHumanDataset, read_crowddet_results
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.registry import DETECTORS

runner = CliRunner()


@DETECTORS.register("tiny-crowd-test")
def tiny_crowd_detector():
    """Random small FCOS keeping every candidate (score threshold 0.2), for the CLI test."""
    torch.manual_seed(0)
    model = build_small_fcos(2, image_size=96)
    model.score_thresh = 0.2
    return wrap(model, ["__background__", "person"], "tiny-crowd-test", "cpu")


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_crowd")
    return generate_synthetic(root, 2, mode="crowd", image_size=(96, 96), split="val")


def test_nms_command_writes_tables_results_and_figures(tmp_path, crowd):
    detector = DETECTORS.build("tiny-crowd-test")
    data = CrowdHumanDataset(crowd.odgt_file, crowd.images_dir)
    config = EmbeddingConfig(iterations=1, batch_size=1, max_candidates=8, assign_iou=0.0)
    head, info = train_embedding(detector, data, config, progress=False)
    head_file = save_embedding(tmp_path / "head.pt", head, detector, config, info)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["nms", "--dataset", str(crowd.odgt_file), "--images", str(crowd.images_dir),
         "--detector", "tiny-crowd-test", "--strategies", "none,nms,softnms,featurenms,odamnms",
         "-p", f"featurenms.embedding={head_file}", "-p", "odamnms.t_low=0.3",
         "--sweep", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Table 5" in result.output and "Table 7" in result.output
    table5 = pd.read_csv(out / "table5.csv")
    assert table5["strategy"].tolist() == ["none", "nms", "softnms", "featurenms", "odamnms"]
    assert (table5["s/img"] > 0).all()
    assert set(pd.read_csv(out / "table7.csv").columns) >= {"total", "sparse", "crowd"}
    assert "| strategy" in (out / "table5.md").read_text()
    results = pd.read_csv(out / "results.csv")
    assert set(results.columns) == {"detector", "strategy", "metric", "value", "params", "reason"}
    odam = results[(results.strategy == "odamnms")]
    assert '"t_low": 0.3' in odam["params"].iloc[0]
    # the CrowdDet file of a strategy scores the same as the table
    back = evaluate_crowd(read_crowddet_results(out / "crowddet" / "nms.odgt"))
    ji = results[(results.strategy == "nms") & (results.metric == "ji")]["value"].iloc[0]
    assert back.ji == pytest.approx(ji, nan_ok=True)
    assert Image.open(out / "kept_boxes.png").size[0] > 5 * 200
    sweep = pd.read_csv(out / "sweep.csv")
    assert len(sweep) == 36 and Image.open(out / "sweep_ji.png").size[0] > 300


def test_nms_command_names_bad_input(tmp_path, crowd):
    result = runner.invoke(app, ["nms", "--strategies", "nms,fancy", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown nms 'fancy'" in result.output
    result = runner.invoke(app, ["nms", "--dataset", str(crowd.odgt_file), "--strategies", "nms"])
    assert result.exit_code != 0 and "--images is required" in result.output
    result = runner.invoke(
        app,
        ["nms", "--dataset", str(crowd.odgt_file), "--images", str(crowd.images_dir),
         "--strategies", "nms", "-p", "softnms.sigma=1"],
    )  # fmt: skip
    assert result.exit_code != 0 and "softnms" in result.output
    for setting, expected in [
        ("softnms.sigma=abc", "--param softnms.sigma='abc': expected float"),
        ("softnms.sigmaa=1", "--param softnms.sigmaa: not a setting of SoftNMS; expected one of"),
    ]:
        result = runner.invoke(
            app,
            ["nms", "--dataset", str(crowd.odgt_file), "--images", str(crowd.images_dir),
             "--strategies", "softnms", "-p", setting, "--out", str(tmp_path)],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert expected in " ".join(result.output.replace("│", " ").split())


def test_missing_data_and_unknown_names_end_in_one_line(tmp_path):
    missing = tmp_path / "none.odgt"
    cases = [
        (["--dataset", str(missing), "--images", str(tmp_path)], f"--dataset: odgt file {missing}"),
        (["--strategies", "nms,softnmx"], "--strategies: unknown nms 'softnmx'. Did you mean"),
        (["--detector", "nope", "--max-images", "1"], "--detector: unknown detectors 'nope'"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["nms", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert expected in " ".join(result.output.split())
        assert "Traceback" not in result.output
