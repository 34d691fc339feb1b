"""``xaibench evaluate`` and its runner: methods x metrics over a COCO json of synthetic scenes
with the demo detector; stored rows, resume, failures recorded with their reason, the table
of means and 95% confidence intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.evaluate import (
    DETECTOR_ROWS,
    EvaluationSettings,
    mean_ci,
    run_evaluation,
    summarise,
    wide_table,
)
from xaibench.labels import rename_categories

runner = CliRunner()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("data"), 2, seed=7, split="eval")


def invoke(scenes, out, *extra: str):
    return runner.invoke(
        app,
        [
            "evaluate", "-a", str(scenes.annotation_file), "-i", str(scenes.images_dir),
            "-d", "synthetic-fcos", "--selection", "top-k", "--selection-param", "top_k=2",
            "--selection-param", "match_iou=0.5", "--out", str(out), *extra,
        ],
    )  # fmt: skip


@pytest.mark.slow
def test_evaluate_writes_rows_table_and_plots_and_resumes(scenes, tmp_path) -> None:
    out = tmp_path / "run"
    args = ("-m", "odam", "--metric", "pointing-game", "--metric", "deletion", "--metric", "vea")
    result = invoke(scenes, out, *args)
    assert result.exit_code == 0, result.output
    assert "pg_box" in result.output and "deletion" in result.output
    rows = pd.read_csv(out / "instances.csv")
    assert len(rows) == 4  # 2 images x top 2 detections x 1 method
    assert set(rows["method"]) == {"odam"}
    assert {"pg_box", "pg_mask", "deletion", "vea", "score", "gt_id", "reason"} <= set(rows)
    assert (rows["deletion"] > 0).all()  # above 100 where noise raises the score
    summary = pd.read_csv(out / "summary.csv")
    deletion = summary[summary["metric"] == "deletion"].iloc[0]
    assert deletion["mean"] == pytest.approx(rows["deletion"].mean())
    assert deletion["n"] == 4 and not deletion["higher_is_better"]
    assert "deletion ↓" in (out / "summary.md").read_text()
    for name in ("deletion", "vea"):
        assert Image.open(out / "plots" / f"{name}.png").size[0] > 100
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves[curves["curve"] == "deletion"]) == 4 * 11
    # a second run resumes: nothing is recomputed, nothing is lost
    again = invoke(scenes, out, *args)
    assert again.exit_code == 0, again.output
    assert len(pd.read_csv(out / "instances.csv")) == 4
    # ... but not with other settings
    other = invoke(scenes, out, *args, "--attribute", "x1")
    assert other.exit_code == 2
    assert "holds results of other settings" in " ".join(other.output.split())


@pytest.mark.slow
def test_a_failing_method_is_recorded_with_its_reason(scenes, tmp_path) -> None:
    out = tmp_path / "run"
    result = invoke(
        scenes, out, "-m", "odam", "-p", "odam.layer=no-such-layer", "--metric", "energy-pg"
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "instances.csv")
    assert len(rows) == 4
    assert rows["reason"].str.contains("odam failed: KeyError").all()
    assert rows["epg_box"].isna().all()


def test_bad_option_values_are_explained(scenes, tmp_path) -> None:
    result = invoke(scenes, tmp_path, "--selection", "best", "-m", "odam")
    assert result.exit_code != 0
    assert "selection must be one of paper, all, top-k" in result.output
    result = invoke(scenes, tmp_path, "-p", "smoothing=gaussian")
    assert result.exit_code != 0 and "name.key=value" in result.output


def test_mean_and_confidence_interval_match_the_t_interval() -> None:
    values = np.array([0.2, 0.5, 0.9, np.nan, 0.4])
    mean, half, n = mean_ci(values)
    finite = values[np.isfinite(values)]
    low, high = stats.t.interval(0.95, len(finite) - 1, loc=finite.mean(), scale=stats.sem(finite))
    assert n == 4 and mean == pytest.approx(finite.mean())
    assert half == pytest.approx((high - low) / 2)


def test_summary_table_per_detector_method_and_metric() -> None:
    rows = pd.DataFrame(
        {
            "detector": ["a", "a", "a", "b"],
            "method": ["m", "m", "n", "m"],
            "pg_box": [1.0, 0.0, 1.0, np.nan],
        }
    )
    summary = summarise(rows, {"pg_box": True})
    assert summary[["detector", "method", "n", "mean"]].values.tolist() == [
        ["a", "m", 2, 0.5],
        ["a", "n", 1, 1.0],
    ]
    wide = wide_table(summary)
    assert list(wide.columns) == ["detector", "method", "pg_box ↑"]
    assert wide.iloc[1]["pg_box ↑"] == "1 (n=1)"


@pytest.mark.slow
def test_an_image_that_cannot_be_read_is_recorded_and_the_run_goes_on(tmp_path) -> None:
    scenes = generate_synthetic(tmp_path / "data", 2, seed=3, split="broken")
    (scenes.images_dir / scenes.file_name(0)).unlink()
    settings = EvaluationSettings(
        detectors=["synthetic-fcos"], methods=["odam"], metrics=["pointing-game"],
        selection="top-k", selection_params={"top_k": 1},
    )  # fmt: skip
    dataset = CocoDataset(scenes.annotation_file, scenes.images_dir)
    result = run_evaluation(dataset, settings, tmp_path / "out", progress=False)
    rows = result.instances
    assert len(rows) == 2
    assert "does not exist" in rows.iloc[0]["reason"]
    assert rows.iloc[1]["method"] == "odam" and rows.iloc[1]["pg_box"] in (0.0, 1.0)


def test_detector_scope_metrics_give_one_row_set_per_detector_and_a_verdict(
    scenes, tmp_path
) -> None:
    """Feature drift measures the detector, not the method: rows of method "(detector)", and
    a verdict line (the evidence detector's pooling layer keeps evidence in place)."""
    settings = EvaluationSettings(
        detectors=["evidence-toy"], methods=["gradcam", "odam"], metrics=["feature-drift"],
        metric_params={"feature-drift": {"params": {"n": 60, "grid": 8}}},
        selection="top-k", selection_params={"top_k": 2},
    )  # fmt: skip
    dataset = CocoDataset(scenes.annotation_file, scenes.images_dir)
    names = {"circle": "object", "square": "other", "triangle": None}  # the toy's two classes
    dataset.class_names = rename_categories(dataset.class_names, names)
    result = run_evaluation(dataset, settings, tmp_path / "out", progress=False)
    rows = result.instances
    drift = rows[rows["method"] == DETECTOR_ROWS]
    assert len(drift) == 4 and drift["drift_shift"].notna().all()
    assert rows[rows["method"] == "odam"]["drift_shift"].isna().all()
    assert len(result.notes) == 1 and result.notes[0].startswith("evidence-toy: keeps evidence")
    assert "keeps evidence" in (tmp_path / "out" / "summary.md").read_text()
