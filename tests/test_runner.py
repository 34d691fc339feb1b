"""``xaibench run``: suites into the results store, with real subprocesses and real SQLite.

The suites use the hand-built evidence detector on a few synthetic scenes with cheap methods,
so every test runs in seconds: a run killed with SIGKILL at five points and resumed ends with
the rows of an uninterrupted run; two runs on one store do every unit once; Ray gives the
rows of the local executor; a changed parameter or input file reruns only what it touches.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from xaibench.runner import run_suite
from xaibench.store import STORE_FILE, load_results, load_units
from xaibench.suite import load_suite

TIMING = ["seconds"]


def write_suite(folder: Path, name: str = "tiny", **changes) -> Path:
    """A small suite: evidence detector, 4 synthetic scenes, Grad-CAM and two ODAM settings,
    map and deletion metrics."""
    suite = {
        "name": name,
        "seed": 0,
        "datasets": [
            {"name": "synth", "kind": "synthetic", "num_images": 4, "seed": 5, "split": "val"}
        ],
        "detectors": [{"name": "evidence-toy"}],
        "methods": [
            {"name": "gradcam"},
            {"name": "odam@plain"},
            {"name": "odam@smooth", "params": {"smoothing": "gaussian"}},
        ],
        "metrics": ["pointing-game", "energy-pg", {"name": "deletion", "params": {"steps": 50}}],
        "selection": {"mode": "top-k", "params": {"top_k": 2}},
        # the toy detector's classes; circles are no class of it
        "label_map": {"square": "object", "triangle": "other", "circle": None},
        "store": str(folder / "store"),
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def frames(store: Path, run_id: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, curves) sorted, without timing columns: comparable across runs."""
    results, curves = load_results(store / STORE_FILE, run_id)
    results = results.drop(columns=TIMING)
    keys = ["unit_key", "detection", "attribute", "column"]
    curve_keys = ["unit_key", "detection", "curve", "point"]
    return (
        results.sort_values(keys).reset_index(drop=True),
        curves.sort_values(curve_keys).reset_index(drop=True),
    )


def assert_same_rows(store: Path, reference: Path) -> None:
    got, want = frames(store), frames(reference)
    assert len(got[0]) == len(want[0]) > 0
    pd.testing.assert_frame_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(suite file, store) of one uninterrupted local run."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_suite(folder)
    report = run_suite(load_suite(path), where=path, progress=False)
    assert report.done == report.total == 4 * (1 + 3) - 4 == 12
    return path, folder / "store"


def xaibench_run(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "xaibench"), "run", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def done_units(store: Path) -> int:
    path = store / STORE_FILE
    if not path.exists():
        return -1
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            if conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0:
                return -1
            return conn.execute("SELECT count(*) FROM units WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are being created
        return -1


def test_sigkill_at_five_points_then_resume_gives_the_uninterrupted_rows(
    reference, tmp_path
) -> None:
    suite, ref_store = reference
    store = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = []
    # kill once the plan is written, then after 1, 3, 6 and 9 finished units (and at least
    # one unit after the last kill), each at a random moment of the unit in flight
    for target in (0, 1, 3, 6, 9):
        proc = xaibench_run(str(suite), "--store", str(store))
        need = max(target, kills[-1] + 1) if kills else target
        while done_units(store) < need and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0, 0.03)))  # units take about 0.1 s here
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(done_units(store))
        proc.wait()
    assert len(kills) == 5, f"the run ended before a kill: killed at {kills}"
    assert len(set(kills)) == 5, kills  # five different points
    final = xaibench_run(str(suite), "--store", str(store))
    output = final.communicate(timeout=300)[0].decode()
    assert final.returncode == 0, output
    assert "12 done" in output
    assert_same_rows(store, ref_store)
    units = load_units(store / STORE_FILE)
    assert (units["status"] == "done").all() and len(units) == 12


def test_two_runs_on_one_store_do_every_unit_once(reference, tmp_path) -> None:
    suite, ref_store = reference
    store = tmp_path / "shared"
    first, second = (xaibench_run(str(suite), "--store", str(store)) for _ in range(2))
    outputs = [p.communicate(timeout=300)[0].decode() for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    units = load_units(store / STORE_FILE)
    assert (units["status"] == "done").all()
    assert (units["attempts"] == 1).all()  # no unit was computed twice
    assert_same_rows(store, ref_store)


def test_the_same_suite_and_seed_give_identical_rows(reference, tmp_path) -> None:
    suite, ref_store = reference
    run_suite(load_suite(suite), store=tmp_path / "again", progress=False)
    assert_same_rows(tmp_path / "again", ref_store)


def test_ray_gives_the_rows_of_the_local_executor(reference, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    suite, ref_store = reference
    spec = load_suite(suite, ["executor.kind=ray", "executor.num_cpus=2"])
    try:
        report = run_suite(spec, store=tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert report.computed == report.total == 12
    assert_same_rows(tmp_path / "ray", ref_store)


def test_a_changed_parameter_or_input_file_reruns_only_what_it_touches(tmp_path) -> None:
    path = write_suite(tmp_path)
    first = run_suite(load_suite(path), progress=False)
    assert first.computed == 12
    # another smoothing for one ODAM label: only its 4 units run
    changed = load_suite(path, ["methods[2].params.sigma_scale=0.2"])
    second = run_suite(changed, progress=False)
    assert (second.computed, second.skipped) == (4, 8)
    results, _ = load_results(tmp_path / "store" / STORE_FILE, second.run_id)
    old, _ = load_results(tmp_path / "store" / STORE_FILE, first.run_id)
    smooth = results[results["method"] == "odam@smooth"]
    assert not set(smooth["unit_key"]) & set(old["unit_key"])  # no stale rows in the table
    assert len(results) == len(old)
    # an image file whose content changed: the units of that image run again
    image = tmp_path / "store" / "data" / "synth" / "val" / "000001.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:20, :20] = 255
    Image.fromarray(pixels).save(image)
    third = run_suite(changed, progress=False)
    assert (third.computed, third.skipped) == (3, 9)


def test_a_missing_image_fails_its_units_until_the_file_is_back(tmp_path) -> None:
    suite = load_suite(write_suite(tmp_path), ["limits.images=2"])
    assert run_suite(suite, progress=False).computed == 6
    image = tmp_path / "store" / "data" / "synth" / "val" / "000000.png"
    kept = image.read_bytes()
    image.unlink()  # another content (none): its units run again, and fail
    report = run_suite(suite, progress=False)
    assert (report.computed, report.done, report.failed, report.images_failed) == (3, 3, 3, 1)
    assert report.failures["reason"].str.contains("does not exist").all()
    assert set(report.failures["stage"]) == {"image"}
    # a resume keeps the failures; --retry-failed runs them again
    assert run_suite(suite, progress=False).computed == 0
    again = run_suite(suite, retry_failed=True, progress=False)
    assert (again.computed, again.failed) == (3, 3)
    image.write_bytes(kept)  # the data is fixed: its units (done before) are back
    fixed = run_suite(suite, progress=False)
    assert (fixed.computed, fixed.done, fixed.failed) == (0, 6, 0)
