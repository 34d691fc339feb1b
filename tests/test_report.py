"""What ``xaibench evaluate`` prints and returns when things go wrong: a metric column that is
NaN for every instance shows its reason and count, failed images are counted and grouped by
reason with a non-zero exit code when none succeeded, the tables read at 80 columns, and a
failed first attempt does not lock the output folder.

The hand-built evidence detector keeps every run to a few seconds."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from xaibench.detectors.evidence import TOY_OBJECTS, evidence_image

from xaibench.cli import app
from xaibench.method import ExplanationMethod
from xaibench.registry import METHODS

runner = CliRunner()


class ConstantMap(ExplanationMethod):
    """Explains every target with the same constant map: pointing is undefined on it."""

    name = "constant"
    access = "black-box"

    def explain(self, detector, image, targets, trace=None):
        maps = [np.ones(image.shape[:2], np.float32) for _ in targets]
        return self.saliencies(targets, maps, start=time.perf_counter())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, Path]:
    """(COCO json, image folder) of two scenes of the evidence detector's layout, with its
    objects as the ground truth."""
    folder = tmp_path_factory.mktemp("report")
    images = folder / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "object"}, {"id": 2, "name": "other"}]}  # fmt: skip
    for i in range(2):
        Image.fromarray(evidence_image(seed=i)).save(images / f"toy{i}.png")
        coco["images"].append(
            {"id": i + 1, "file_name": f"toy{i}.png", "width": 160, "height": 160}
        )
        for o in TOY_OBJECTS:
            x1, y1, x2, y2 = o.box
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": o.label,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            })  # fmt: skip
    annotations = folder / "toy.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images


def evaluate(scenes, out, *extra: str, images=None, columns: int = 200):
    annotations, image_dir = scenes
    return runner.invoke(
        app,
        [
            "evaluate", "-a", str(annotations), "-i", str(images or image_dir),
            "-d", "evidence-toy", "--selection", "top-k", "--selection-param", "top_k=1",
            "--out", str(out), *extra,
        ],
        env={"COLUMNS": str(columns)},
    )  # fmt: skip


def test_a_column_that_failed_everywhere_shows_its_reason_and_count(
    scenes, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(METHODS._entries, "constant", ConstantMap)
    result = evaluate(scenes, tmp_path / "run", "-m", "constant", "--metric", "pointing-game")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    reason = "evidence-toy 2/2 (constant): pg_box, pg_mask"
    at = next(i for i, line in enumerate(lines) if reason in line)
    assert lines[at + 1].strip() == "constant map"
    assert any(line.startswith("│ pg_box ↑") and "│ -" in line for line in lines)


def test_no_image_evaluated_is_exit_code_1_with_the_failures_grouped(scenes, tmp_path) -> None:
    result = evaluate(scenes, tmp_path / "run", "-m", "gradcam", "--metric", "pointing-game",
                      images=tmp_path / "no-such-folder")  # fmt: skip
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "2 unit(s) failed; 2 of 2 image(s) could not be evaluated" in text
    assert "2 unit(s) on 2 image(s), image failed:" in text and "does not exist" in text
    assert "no image could be evaluated" in text


def test_some_failed_images_are_counted_and_the_run_succeeds(scenes, tmp_path) -> None:
    images = tmp_path / "images"
    shutil.copytree(scenes[1], images)
    (images / "toy1.png").unlink()
    result = evaluate(scenes, tmp_path / "run", "-m", "gradcam", "--metric", "pointing-game",
                      images=images)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 of 2 image(s) could not be evaluated" in " ".join(result.output.split())
    assert "--retry-failed runs them again" in result.output


def test_tables_read_at_80_columns(scenes, tmp_path) -> None:
    methods = ("-m", "gradcam", "-m", "gradcampp", "-m", "odam@p", "-m", "odam@s",
               "-p", "odam@s.smoothing=gaussian")  # fmt: skip
    metrics = ("--metric", "pointing-game", "--metric", "energy-pg", "--metric", "compactness")
    result = evaluate(scenes, tmp_path / "run", *methods, *metrics, columns=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    tables = [line for line in lines if line.startswith("┏")]
    header = " ".join(lines[lines.index(tables[0]) + 1 : lines.index(tables[0]) + 3])
    assert "…" not in header
    for label in ("gradcam", "gradcampp", "odam@p", "odam@s", "pg_box ↑", "epg_box ↑"):
        assert label in result.output
    wide = (tmp_path / "run" / "summary.md").read_text().splitlines()
    assert max(len(line) for line in wide) > 80  # the files keep the wide table


def test_a_failed_first_attempt_does_not_lock_the_folder(scenes, tmp_path) -> None:
    out = tmp_path / "run"
    typo = evaluate(scenes, out, "-m", "gradcam", "--metric", "pointing-gam")
    assert typo.exit_code == 2 and "Did you mean 'pointing-game'?" in typo.output
    assert not (out / "settings.json").exists()
    first = evaluate(scenes, out, "-m", "gradcam", "--metric", "pointing-game")
    assert first.exit_code == 0, first.output
    other = evaluate(scenes, out, "-m", "gradcam", "--metric", "energy-pg")
    assert other.exit_code == 2
    assert "--no-resume" in other.output and "resume=False" not in other.output
    again = evaluate(scenes, out, "-m", "gradcam", "--metric", "energy-pg", "--no-resume")
    assert again.exit_code == 0, again.output
