"""``xaibench demo`` (the end of ``make demo``): heat maps for a few synthetic scenes, then the
embedded default suite into ``OUT/run``, printed at 80 columns."""

from __future__ import annotations

import io

import pytest
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.progress import progress_bar, say
from xaibench.store import STORE_FILE, load_units


def test_first_use_messages_and_bars_fit_the_terminal(capsys, monkeypatch) -> None:
    # a cold cache trains the demo detectors inside `xaibench demo`: what it says fits too
    monkeypatch.setenv("COLUMNS", "60")
    message = (
        "xaibench: training the demo detector synthetic-frcnn on first use (3000 steps on "
        "synthetic scenes, minutes on a CPU); it will be cached in "
        "/root/.cache/xaibench/detectors/synthetic-frcnn"
    )
    say(message)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 2 and max(len(line) for line in lines) <= 60
    assert " ".join(lines) == message  # wrapped at spaces, the cache folder whole
    # the training bar with its loss terms, as ``fit`` shows it
    log = io.StringIO()
    with progress_bar(total=3000, desc="baseline", file=log, mininterval=0) as bar:
        for _ in range(3):
            bar.set_postfix(loss=2.161, classifier=1.336, box_reg=0.121, objectness=0.69)
            bar.update()
    bars = [line for line in log.getvalue().splitlines() if line.strip()]
    assert len(bars) >= 3 and max(len(line) for line in bars) <= 60


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
