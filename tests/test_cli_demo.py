"""``xaibench demo`` (the end of ``make demo``): heat maps for a few synthetic scenes, then the
embedded default suite into ``OUT/run``, printed at 80 columns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.store import STORE_FILE, load_units


@pytest.mark.slow
def test_demo_explains_then_runs_the_default_suite(tmp_path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--num-images", "1", "--eval-images", "1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for detector in ("synthetic-fcos", "synthetic-frcnn"):
        assert (out / detector / "000000.detections.json").is_file()
        assert list((out / detector).glob("000000_*.png"))
    units = load_units(out / "run" / STORE_FILE)
    assert len(units) == 2 * 6 + 2  # both detectors: six methods, plus feature drift
    assert (units["status"] == "done").all()
    explained = result.output.split("running the default suite")[0]
    assert "…" not in explained  # nothing of the explanation table is cut
    assert max(len(line) for line in result.output.splitlines()) <= 80
