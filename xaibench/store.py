"""The results store: one SQLite database per output folder (``OUT/results.sqlite``).

SQLite (the standard library's ``sqlite3``) rather than DuckDB: every commit is atomic and
survives SIGKILL (write-ahead log), several processes may read while one writes and writers
queue on a lock (DuckDB lets one process open a file for writing at a time), and it needs no
extra dependency. Schema (``SCHEMA``; boxes xyxy in original-image pixels):

- ``runs``: one row per ``xaibench run`` (suite JSON, versions, executor, start / end time).
- ``plan``: the units a run asked for. A leaderboard reads the rows of one run's plan, so rows
  of units whose settings have since changed (another ``unit_key``) never enter its tables.
- ``units``: one unit of work (dataset, detector, method label, image): ``unit_key`` is the
  hash of everything that changes its numbers (``config``); ``status`` running | done |
  failed with a ``reason``; ``owner`` and ``heartbeat`` tell other processes it is taken.
- ``results``: one row per explained instance and metric column (``value`` NaN with a
  ``reason`` where undefined); ``method`` is the suite's label (``odam@p3``), ``method_name``
  the registered name; ``higher_is_better`` the column's direction; ``seconds`` the map's
  compute time.
- ``curves``: every curve point per explained instance (deletion, insertion, VEA, sanity).

A unit's rows (results, curves and its ``units`` row marked done) go in one transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
STORE_FILE = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL, suite TEXT NOT NULL,
    suite_file TEXT, versions TEXT NOT NULL, executor TEXT NOT NULL, host TEXT
);
CREATE TABLE IF NOT EXISTS plan (
    run_id TEXT NOT NULL, unit_key TEXT NOT NULL, PRIMARY KEY (run_id, unit_key)
);
CREATE TABLE IF NOT EXISTS units (
    unit_key TEXT PRIMARY KEY, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, method_name TEXT NOT NULL, image_id TEXT NOT NULL, file_name TEXT,
    config TEXT NOT NULL, versions TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')), reason TEXT,
    owner TEXT, heartbeat REAL, started REAL, finished REAL, seconds REAL
);
CREATE TABLE IF NOT EXISTS results (
    unit_key TEXT NOT NULL, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, method_name TEXT NOT NULL, image_id TEXT NOT NULL,
    detection INTEGER NOT NULL, attribute TEXT NOT NULL, label INTEGER, class_name TEXT,
    score REAL, x1 REAL, y1 REAL, x2 REAL, y2 REAL, gt_id TEXT, match_iou REAL,
    metric TEXT NOT NULL, column TEXT NOT NULL, value REAL, reason TEXT, seconds REAL,
    higher_is_better INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_unit ON results (unit_key);
CREATE TABLE IF NOT EXISTS curves (
    unit_key TEXT NOT NULL, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, image_id TEXT NOT NULL, detection INTEGER NOT NULL,
    curve TEXT NOT NULL, point INTEGER NOT NULL, x REAL, x_name TEXT, x_label TEXT,
    y REAL, y_label TEXT
);
CREATE INDEX IF NOT EXISTS curves_unit ON curves (unit_key);
"""


class StoreError(RuntimeError):
    """A store that cannot be used (not a results store, or of another schema version)."""


def connect(path: str | Path, timeout: float = 60.0) -> sqlite3.Connection:
    """Open (creating if needed) the store at ``path`` (a file, or a folder holding
    ``results.sqlite``) in WAL mode; writers wait up to ``timeout`` seconds for the lock."""
    path = Path(path)
    if path.is_dir():
        path = path / STORE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        conn.close()
        raise StoreError(f"{path} is not an xaibench results store: {err}") from err
    if version != str(SCHEMA_VERSION):
        conn.close()
        raise StoreError(
            f"{path} has store schema version {version}; this xaibench reads {SCHEMA_VERSION}"
        )
    return conn


def latest_run(conn: sqlite3.Connection) -> str | None:
    """The id of the most recently started run, or None for an empty store."""
    row = conn.execute("SELECT run_id FROM runs ORDER BY started DESC LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def load_results(path: str | Path, run_id: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, curves) of the finished units in one run's plan (the latest by default),
    as the ``results`` and ``curves`` tables define their columns."""
    conn = connect(path)
    try:
        run_id = run_id or latest_run(conn)
        if run_id is None:
            raise StoreError(f"{path} holds no run yet")
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise StoreError(f"{path} has no run {run_id!r}")
        planned = (
            "SELECT p.unit_key FROM plan p JOIN units u ON u.unit_key = p.unit_key "
            "WHERE p.run_id = ? AND u.status = 'done'"
        )
        results = pd.read_sql_query(
            f"SELECT * FROM results WHERE unit_key IN ({planned}) ORDER BY rowid",
            conn,
            params=(run_id,),
        )
        curves = pd.read_sql_query(
            f"SELECT * FROM curves WHERE unit_key IN ({planned}) ORDER BY rowid",
            conn,
            params=(run_id,),
        )
    finally:
        conn.close()
    return results, curves
