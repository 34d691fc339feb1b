"""Leaderboards from a hand-made results store (plain INSERTs into ``xaibench.store``'s
schema): means, bootstrap CIs, ranks, Wilcoxon and Holm-corrected p-values checked against
scipy called here; stale and failed units left out; NaN reasons counted; every file written
by the real ``xaibench leaderboard`` command, and its ``index.html`` rendered by a real
headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from scipy import stats

from xaibench.leaderboard import build_leaderboard, print_leaderboard
from xaibench.leaderboard.stats import holm
from xaibench.store import connect

N = 20  # instances (one detection of each of 20 images)
RESAMPLES = 999
SEED = 3
SUITE = {
    "name": "toy",
    "seed": 0,
    "references": [
        {
            "source": "Zhao & Chan 2023, Table 1",
            "detector": "det",
            "values": {"odam": {"deletion": 72.68}, "gradcam": {"deletion": 92.79}},
        }
    ],
}
MEANS = {"odam": 30.0, "gradcam": 60.0, "drise": 31.0}
INSTANCE_ORDER = sorted(range(N), key=lambda i: f"img{i}")


def toy_values() -> dict[tuple[str, str], np.ndarray]:
    """Per (method, column) the 20 values the store holds (NaN where undefined)."""
    rng = np.random.default_rng(7)
    values = {}
    for method, mean in MEANS.items():
        values[method, "deletion"] = mean + 5 * rng.standard_normal(N)
        values[method, "pg_box"] = (rng.random(N) < mean / 70).astype(float)
    values["gradcam", "deletion"][[2, 5]] = np.nan  # constant maps
    values["(detector)", "drift_shift"] = rng.random(N)
    return values


def _unit(conn: sqlite3.Connection, key: str, method: str, image: str, status: str) -> None:
    conn.execute(
        "INSERT INTO units (unit_key, dataset, detector, method, method_name, image_id, config, "
        "versions, status) VALUES (?, 'synth', 'det', ?, ?, ?, '{}', '{}', ?)",
        (key, method, method, image, status),
    )


SECONDS = {"odam": 0.002, "gradcam": 0.003, "drise": 1.5}  # per map; none for (detector)


def _result(
    conn: sqlite3.Connection, key: str, method: str, image: str, column: str, value: float
) -> None:
    metric = {"deletion": "deletion", "pg_box": "pointing-game"}.get(column, "feature-drift")
    reason = "constant map" if np.isnan(value) else None
    conn.execute(
        "INSERT INTO results (unit_key, dataset, detector, method, method_name, image_id, "
        "detection, attribute, metric, column, value, reason, seconds, higher_is_better) "
        "VALUES (?, 'synth', 'det', ?, ?, ?, 0, 'score', ?, ?, ?, ?, ?, ?)",
        (
            key, method, method, image, metric, column, None if np.isnan(value) else value,
            reason, SECONDS.get(method), column != "deletion",
        ),
    )  # fmt: skip


def make_store(path: Path, suite: dict = SUITE) -> Path:
    """Run ``r1`` (of ``suite``) plans one unit per method and image; a stale unit (other
    settings, not in the plan), a failed unit in the plan and an older run ``r0`` hold rows
    that must not appear."""
    conn = connect(path)
    conn.execute("BEGIN")
    for run, started in (("r0", 1.0), ("r1", 2.0)):
        conn.execute(
            "INSERT INTO runs (run_id, started, suite, versions, executor) "
            "VALUES (?, ?, ?, '{}', 'local')",
            (run, started, json.dumps(suite)),
        )
    for (method, column), values in toy_values().items():
        for i, value in enumerate(values):
            key = f"{method}-{i}"
            if conn.execute("SELECT 1 FROM units WHERE unit_key = ?", (key,)).fetchone() is None:
                _unit(conn, key, method, f"img{i}", "done")
                conn.execute("INSERT INTO plan (run_id, unit_key) VALUES ('r1', ?)", (key,))
            _result(conn, key, method, f"img{i}", column, value)
            _result_curve(conn, key, method, i, column, value)
    for key, status, plan in (("stale-odam-0", "done", "r0"), ("failed-odam-0", "failed", "r1")):
        _unit(conn, key, "odam", "img0", status)
        conn.execute("INSERT INTO plan (run_id, unit_key) VALUES (?, ?)", (plan, key))
        _result(conn, key, "odam", "img0", "deletion", 1000.0)
    conn.execute("COMMIT")
    conn.close()
    return path


def _result_curve(
    conn: sqlite3.Connection, key: str, method: str, i: int, column: str, value: float
) -> None:
    if column != "deletion" or np.isnan(value):
        return
    for p, x in enumerate(np.linspace(0, 1, 11)):
        conn.execute(
            "INSERT INTO curves (unit_key, dataset, detector, method, image_id, detection, curve, "
            "point, x, x_label, y, y_label) VALUES (?, 'synth', 'det', ?, ?, 0, 'deletion', ?, ?, "
            "'fraction deleted', ?, 'score / score at step 0')",
            (key, method, f"img{i}", p, float(x), float(np.exp(-x * value / 10))),
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "results.sqlite")


@pytest.fixture(scope="module")
def board(store: Path):
    return build_leaderboard(store, seed=SEED, resamples=RESAMPLES)


def row(board, method: str, column: str) -> pd.Series:
    s = board.summary
    return s[(s["method"] == method) & (s["column"] == column)].iloc[0]


def test_means_cis_and_nan_counts_match_numpy_and_scipy(board) -> None:
    assert board.run_id == "r1" and board.name == "toy"
    for (method, column), values in toy_values().items():
        got = row(board, method, column)
        finite = values[np.isfinite(values)]
        # the bootstrap resamples the values in instance order (image_id as text, detection)
        ordered = values[INSTANCE_ORDER]
        ordered = ordered[np.isfinite(ordered)]
        assert got["n"] == len(finite)
        assert got["n_nan"] == N - len(finite)
        assert got["mean"] == pytest.approx(finite.mean(), rel=1e-12)
        ci = stats.bootstrap(
            (ordered,),
            np.mean,
            n_resamples=RESAMPLES,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(SEED),
        ).confidence_interval
        if np.all(finite == finite[0]):
            assert (got["ci_low"], got["ci_high"]) == (finite[0], finite[0])
        else:
            assert got["ci_low"] == pytest.approx(ci.low, rel=1e-12)
            assert got["ci_high"] == pytest.approx(ci.high, rel=1e-12)
    nan = board.nan_reasons
    assert nan.to_dict("records") == [
        {
            "dataset": "synth",
            "detector": "det",
            "attribute": "score",
            "method": "gradcam",
            "metric": "deletion",
            "column": "deletion",
            "reason": "constant map",
            "count": 2,
        }
    ]


def test_stale_failed_and_other_runs_rows_never_appear(board, store: Path) -> None:
    assert (board.summary["mean"] < 1000).all()
    assert row(board, "odam", "deletion")["n"] == N
    older = build_leaderboard(store, run_id="r0", resamples=RESAMPLES)
    assert older.summary[["method", "column", "n", "mean"]].to_dict("records") == [
        {"method": "odam", "column": "deletion", "n": 1, "mean": 1000.0},
        {"method": "odam", "column": "seconds", "n": 1, "mean": 0.002},
    ]


def test_ranks_follow_each_columns_direction(board) -> None:
    for column, up in (("deletion", False), ("pg_box", True), ("seconds", False)):
        part = board.summary[board.summary["column"] == column].set_index("method")
        means = part["mean"].drop("(detector)", errors="ignore")
        order = sorted(means.index, key=lambda m: -means[m] if up else means[m])
        assert list(part.loc[order, "rank"]) == [1.0, 2.0, 3.0]
        assert part.loc[order[0], "best"] and not part.loc[order[1:], "best"].any()
    drift = row(board, "(detector)", "drift_shift")
    assert np.isnan(drift["rank"]) and not drift["best"]
    assert (board.tests["method_a"] != "(detector)").all()


def holm_by_hand(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        adjusted[i] = running
    return adjusted


def test_wilcoxon_and_holm_match_scipy_and_a_hand_computation(board) -> None:
    values = toy_values()
    for column in ("deletion", "pg_box"):
        tests = board.tests[board.tests["column"] == column]
        pairs = list(combinations(["odam", "gradcam", "drise"], 2))
        assert list(zip(tests["method_a"], tests["method_b"], strict=True)) == pairs
        p = []
        for (a, b), test in zip(pairs, tests.itertuples(), strict=True):
            x, y = values[a, column], values[b, column]
            shared = np.isfinite(x) & np.isfinite(y)
            assert test.n == shared.sum()
            expected = stats.wilcoxon(x[shared], y[shared])
            assert test.statistic == expected.statistic
            assert test.p == pytest.approx(expected.pvalue, rel=1e-12)
            p.append(expected.pvalue)
        assert list(tests["p_holm"]) == pytest.approx(holm_by_hand(p), rel=1e-12)
    deletion = board.tests[board.tests["column"] == "deletion"].set_index(["method_a", "method_b"])
    # odam and drise (means 30, 31) beat gradcam (60) on deletion (lower is better) ...
    assert deletion.loc[("odam", "gradcam"), ["better", "significant"]].tolist() == ["odam", True]
    assert deletion.loc[("gradcam", "drise"), ["better", "significant"]].tolist() == ["drise", True]
    assert not deletion.loc[("odam", "drise"), "significant"]  # ... but not each other
    assert row(board, "gradcam", "deletion")[["wins", "losses"]].tolist() == [0, 2]
    assert not row(board, "odam", "deletion")["beats_all"]
    assert row(board, "odam", "seconds")["beats_all"]  # 0.002 s against 0.003 and 1.5 s


def test_holm_leaves_nan_out_of_the_family() -> None:
    got = holm(np.array([0.01, np.nan, 0.04, 0.03]))
    assert np.isnan(got[1])
    assert got[[0, 2, 3]] == pytest.approx(holm_by_hand([0.01, 0.04, 0.03]))


def test_console_tables_fit_the_width_splitting_columns(board) -> None:
    tables = {}
    for width in (80, 44):
        console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
        print_leaderboard(board, console)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        assert "…" not in text
        for token in ("deletion ↓", "pg_box ↑", "seconds ↓", "drift_shift ↑", "drise", "72.7"):
            assert token in text
        tables[width] = text.count("synth / det (attribute: score)")
    assert tables[44] > tables[80]


def test_references_and_bad_input_fail_with_the_field(tmp_path: Path, store: Path) -> None:
    from xaibench.leaderboard.board import references_frame

    refs = references_frame(SUITE)
    assert refs.to_dict("records")[0] == {
        "source": "Zhao & Chan 2023, Table 1",
        "dataset": None,
        "detector": "det",
        "method": "odam",
        "column": "deletion",
        "value": 72.68,
    }
    bad = {"references": [{"source": "x", "detector": "det", "values": {"odam": {"del": "7"}}}]}
    with pytest.raises(ValueError, match=r"references\[0\]\.values\.odam\.del must be a number"):
        references_frame(bad)
    with pytest.raises(ValueError, match="no run 'nope'"):
        build_leaderboard(store, run_id="nope")
    doubled = make_store(tmp_path / "doubled.sqlite")
    conn = connect(doubled)
    _result(conn, "odam-0", "odam", "img0", "deletion", 5.0)
    conn.close()
    with pytest.raises(ValueError, match="doubled result rows"):
        build_leaderboard(doubled)


def test_references_scaled_and_filtered_stand_beside_the_measured_means(tmp_path: Path) -> None:
    from xaibench.leaderboard import write_leaderboard

    suite = {
        "name": "toy-refs",
        "references": [
            # every dataset and detector; percentages of a column measured as a fraction
            {"source": "Paper A, Table 4", "scale": 0.01, "values": {"odam": {"pg_box": 55.5}}},
            # another dataset's figures: not in this store's tables
            {"source": "Paper B", "dataset": "coco", "values": {"odam": {"deletion": 72.68}}},
        ],
    }
    board = build_leaderboard(make_store(tmp_path / "r.sqlite", suite), resamples=99)
    assert board.references["value"].tolist() == pytest.approx([0.555, 72.68])
    files = write_leaderboard(board, tmp_path / "out")
    md = files["markdown"].read_text()
    assert "pg_box ↑ [1]" in md and "[1] published: Paper A, Table 4" in md
    assert "0.555" in md
    assert "Paper B" not in md and "72.7" not in md and "[2]" not in md
    odam_line = next(line for line in md.splitlines() if line.startswith("| odam"))
    assert "0.555" in odam_line
    page = files["html"].read_text()
    assert "published: Paper A, Table 4" in page and "0.555" in page
    assert "published: Paper B" not in page  # (the suite.yaml inside names it)
    compared = pd.read_csv(files["comparison_csv"])
    assert len(compared) == 1
    got = compared.iloc[0]
    assert (got["method"], got["column"], got["source"]) == ("odam", "pg_box", "Paper A, Table 4")
    assert got["published"] == pytest.approx(0.555)
    assert got["mean"] == pytest.approx(row(board, "odam", "pg_box")["mean"])
    assert got["ci_low"] == pytest.approx(row(board, "odam", "pg_box")["ci_low"])
    with pytest.raises(ValueError, match=r"references\[0\]\.scale must be a positive number"):
        from xaibench.leaderboard.board import references_frame

        references_frame({"references": [{"source": "x", "scale": 0, "values": {}}]})


@pytest.fixture(scope="module")
def written(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real command line, in a subprocess."""
    out = tmp_path_factory.mktemp("board") / "leaderboards" / "toy"
    xaibench = Path(sys.executable).with_name("xaibench")
    done = subprocess.run(
        [str(xaibench), "leaderboard", str(store), "--out", str(out), "--seed", "3",
         "--resamples", str(RESAMPLES)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "index.html" in done.stdout
    return out


def test_command_writes_every_file_and_latex_bolds_the_best(written: Path, board) -> None:
    for name in (
        "leaderboard.md", "leaderboard.tex", "summary.csv", "wide.csv", "tests.csv",
        "nan_reasons.csv", "references.csv", "suite.yaml", "index.html",
        "plots/synth_det_score_bars.png", "plots/synth_det_deletion.png", "plots/seconds.png",
    ):  # fmt: skip
        assert (written / name).is_file(), name
    for png in (written / "plots").glob("*.png"):
        assert Image.open(png).size[0] > 300
    summary = pd.read_csv(written / "summary.csv")
    assert summary["mean"].to_numpy() == pytest.approx(board.summary["mean"].to_numpy())
    wide = pd.read_csv(written / "wide.csv")
    odam = wide[wide["method"] == "odam"].iloc[0]
    assert odam["deletion ↓"] == pytest.approx(row(board, "odam", "deletion")["mean"])
    assert odam["deletion ↓ low"] == pytest.approx(row(board, "odam", "deletion")["ci_low"])
    tex = (written / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    for column in ("deletion", "pg_box", "seconds"):
        part = board.summary[(board.summary["column"] == column) & board.summary["best"]]
        for mean in part["mean"]:
            from xaibench.leaderboard.tables import decimals

            assert rf"\textbf{{{mean:.{decimals(mean)}f}}}" in tex
    odam_line = next(line for line in tex.splitlines() if line.startswith("odam &"))
    assert "72.7" in odam_line  # the published figure beside the measured one
    assert r"deletion $\downarrow$" in tex and r"pg\_box $\uparrow$" in tex
    md = (written / "leaderboard.md").read_text()
    assert "| odam" in md and "deletion ↓ [1]" in md and "constant map" in md
    assert "Zhao & Chan 2023, Table 1" in md
    suite = (written / "suite.yaml").read_text()
    assert "name: toy" in suite and "72.68" in suite
    page = (written / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page and "<script" not in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("XAIBENCH_REQUIRE_CHROMIUM"),
    reason="chromium is not installed (CI installs it and sets XAIBENCH_REQUIRE_CHROMIUM)",
)
def test_index_html_renders_in_headless_chromium(written: Path, tmp_path: Path) -> None:
    assert chromium() is not None, "XAIBENCH_REQUIRE_CHROMIUM is set but chromium is missing"
    shot = tmp_path / "index.png"
    done = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}", "--window-size=1280,2400",
            (written / "index.html").resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), done.stderr
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2400, 1280, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # text, tables and plots
    assert (image < 100).all(axis=2).mean() > 0.005  # dark text on the white page
