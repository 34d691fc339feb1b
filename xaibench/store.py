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
  compute time; ``convention`` the evaluation conventions of the number, ``key=value;...``
  of the method's and the metric's ``conventions()`` (e.g. ``box_convention=odam``; "" where
  none apply), so that tables never mix numbers of different conventions.
- ``curves``: every curve point per explained instance (deletion, insertion, VEA, sanity).
- ``instances``: one row per explained instance of a unit, whatever the metrics (box, score,
  match, seconds per map; ``reason`` where the method failed), the base of wide exports.

Added bookkeeping columns: ``plan.position`` and ``units.position`` (the suite's order, for
exports), ``units.stage`` (``image``: the image could not be read, detected or matched;
``method``: the explanation failed), ``units.attempts`` (times the unit was claimed).
``results.convention`` came later: ``connect`` adds it to a store that lacks it (its older
rows read NULL, which were computed with the defaults, xaibench's conventions).

Writing (``Store``): a unit is claimed (``claim``) in one transaction that checks nobody alive
holds it: its ``owner`` is ``host/pid/token`` and a ``heartbeat`` (``HEARTBEAT_S``) keeps it;
an owner on this host whose process is gone, or a heartbeat older than ``STALE_S``, means the
owner died and the unit is free. A unit's rows (results, curves, instances and its ``units``
row marked done or failed) go in one transaction (``commit``), written only while the unit is
still held by the committing owner, after deleting any rows of an earlier attempt: a run
killed with SIGKILL loses at most the units in flight, and nothing is doubled.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    run_id TEXT NOT NULL, unit_key TEXT NOT NULL, position INTEGER,
    PRIMARY KEY (run_id, unit_key)
);
CREATE TABLE IF NOT EXISTS units (
    unit_key TEXT PRIMARY KEY, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, method_name TEXT NOT NULL, image_id TEXT NOT NULL, file_name TEXT,
    config TEXT NOT NULL, versions TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')), reason TEXT,
    owner TEXT, heartbeat REAL, started REAL, finished REAL, seconds REAL,
    stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, position INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    unit_key TEXT NOT NULL, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, method_name TEXT NOT NULL, image_id TEXT NOT NULL,
    detection INTEGER NOT NULL, attribute TEXT NOT NULL, label INTEGER, class_name TEXT,
    score REAL, x1 REAL, y1 REAL, x2 REAL, y2 REAL, gt_id TEXT, match_iou REAL,
    metric TEXT NOT NULL, column TEXT NOT NULL, value REAL, reason TEXT, seconds REAL,
    higher_is_better INTEGER NOT NULL, convention TEXT
);
CREATE INDEX IF NOT EXISTS results_unit ON results (unit_key);
CREATE TABLE IF NOT EXISTS curves (
    unit_key TEXT NOT NULL, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, image_id TEXT NOT NULL, detection INTEGER NOT NULL,
    curve TEXT NOT NULL, point INTEGER NOT NULL, x REAL, x_name TEXT, x_label TEXT,
    y REAL, y_label TEXT
);
CREATE INDEX IF NOT EXISTS curves_unit ON curves (unit_key);
CREATE TABLE IF NOT EXISTS instances (
    unit_key TEXT NOT NULL, dataset TEXT NOT NULL, detector TEXT NOT NULL,
    method TEXT NOT NULL, method_name TEXT NOT NULL, image_id TEXT NOT NULL, file_name TEXT,
    detection INTEGER NOT NULL, attribute TEXT NOT NULL, label INTEGER, class_name TEXT,
    score REAL, x1 REAL, y1 REAL, x2 REAL, y2 REAL, gt_id TEXT, match_iou REAL, seconds REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS instances_unit ON instances (unit_key);
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
        columns = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        if "convention" not in columns:  # a store written before conventions were stored
            conn.execute("ALTER TABLE results ADD COLUMN convention TEXT")
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


def _run_id(conn: sqlite3.Connection, path: str | Path, run_id: str | None) -> str:
    run_id = run_id or latest_run(conn)
    if run_id is None:
        raise StoreError(f"{path} holds no run yet")
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        raise StoreError(f"{path} has no run {run_id!r}")
    return run_id


def load_results(path: str | Path, run_id: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, curves) of the finished units in one run's plan (the latest by default),
    as the ``results`` and ``curves`` tables define their columns."""
    conn = connect(path)
    try:
        run_id = _run_id(conn, path, run_id)
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


def load_units(path: str | Path, run_id: str | None = None) -> pd.DataFrame:
    """Every unit of one run's plan (the latest by default) in plan order, with its status
    (``pending`` where no process took it yet), stage and reason."""
    conn = connect(path)
    try:
        run_id = _run_id(conn, path, run_id)
        return pd.read_sql_query(
            "SELECT p.unit_key, p.position, u.dataset, u.detector, u.method, u.method_name, "
            "u.image_id, u.file_name, COALESCE(u.status, 'pending') AS status, u.stage, "
            "u.reason, u.seconds, u.attempts FROM plan p LEFT JOIN units u "
            "ON u.unit_key = p.unit_key WHERE p.run_id = ? ORDER BY p.position",
            conn,
            params=(run_id,),
        )
    finally:
        conn.close()


def load_instances(path: str | Path, run_id: str | None = None) -> pd.DataFrame:
    """The ``instances`` rows of one run's finished and failed units, in plan order."""
    conn = connect(path)
    try:
        run_id = _run_id(conn, path, run_id)
        return pd.read_sql_query(
            "SELECT i.* FROM instances i JOIN plan p ON p.unit_key = i.unit_key "
            "JOIN units u ON u.unit_key = i.unit_key WHERE p.run_id = ? "
            "AND u.status IN ('done', 'failed') ORDER BY p.position, i.rowid",
            conn,
            params=(run_id,),
        )
    finally:
        conn.close()


EXPORT_FORMATS = ("parquet", "csv")


def export(
    path: str | Path,
    folder: str | Path,
    run_id: str | None = None,
    formats: Sequence[str] = EXPORT_FORMATS,
) -> dict[str, Path]:
    """Write one run's ``results``, ``curves``, ``instances`` and ``units`` tables as
    ``FOLDER/<table>.parquet`` and/or ``.csv`` (for pandas users); the files written.
    Parquet needs pyarrow (``pip install 'xaibench[parquet]'``)."""
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"export formats are {', '.join(EXPORT_FORMATS)}; got {unknown}")
    if "parquet" in formats:
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise StoreError(
                "Parquet export needs pyarrow: pip install 'xaibench[parquet]'"
            ) from err
    results, curves = load_results(path, run_id)
    tables = {
        "results": results,
        "curves": curves,
        "instances": load_instances(path, run_id),
        "units": load_units(path, run_id),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in tables.items():
        for fmt in formats:
            target = folder / f"{name}.{fmt}"
            tmp = target.with_name(f".{target.name}.tmp")
            if fmt == "csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, index=False)
            tmp.replace(target)
            written[f"{name}_{fmt}"] = target
    return written


# -- the write side ------------------------------------------------------------------------------

HEARTBEAT_S = 10.0
"""Seconds between heartbeats of a running owner."""
STALE_S = 120.0
"""A unit whose heartbeat is older than this is free (its owner on another host died)."""

RESULT_COLUMNS = (
    "unit_key", "dataset", "detector", "method", "method_name", "image_id", "detection",
    "attribute", "label", "class_name", "score", "x1", "y1", "x2", "y2", "gt_id", "match_iou",
    "metric", "column", "value", "reason", "seconds", "higher_is_better", "convention",
)  # fmt: skip
CURVE_COLUMNS = (
    "unit_key", "dataset", "detector", "method", "image_id", "detection", "curve", "point",
    "x", "x_name", "x_label", "y", "y_label",
)  # fmt: skip
INSTANCE_COLUMNS = (
    "unit_key", "dataset", "detector", "method", "method_name", "image_id", "file_name",
    "detection", "attribute", "label", "class_name", "score", "x1", "y1", "x2", "y2", "gt_id",
    "match_iou", "seconds", "reason",
)  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """One unit of work: the method ``method`` (a suite label; ``method_name`` the registered
    name) on image ``image_id`` of ``dataset`` with ``detector``. ``config`` is the JSON of
    everything that changes its numbers and ``unit_key`` its hash; ``position`` its place in
    the suite's order; ``index`` the image's index in its dataset."""

    unit_key: str
    dataset: str
    detector: str
    method: str
    method_name: str
    image_id: str
    file_name: str | None
    index: int
    config: str
    position: int


@dataclass
class UnitRows:
    """What computing a unit gave: ``status`` done or failed (``stage`` image | method and the
    ``reason``), its rows (dicts keyed by the ``results``, ``curves`` and ``instances``
    columns, without ``unit_key``) and its wall time in seconds."""

    status: Literal["done", "failed"]
    results: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    stage: Literal["image", "method"] | None = None
    seconds: float = math.nan


def new_owner() -> str:
    """An owner id, ``host/pid/token``, unique to this process and call."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str | None, heartbeat: float | None, now: float | None = None) -> bool:
    """Whether the owner of a running unit may still be at work: its heartbeat is fresh and,
    on this host, its process exists."""
    now = time.time() if now is None else now
    if owner is None or heartbeat is None or now - heartbeat > STALE_S:
        return False
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


class Store:
    """The write side of a store (see the module docstring); one per process and thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = connect(path)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): one writer at a time."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # runs and plans

    def start_run(
        self,
        suite: dict[str, Any],
        units: Sequence[Unit],
        versions: dict[str, str],
        executor: str,
        suite_file: str | None = None,
    ) -> str:
        """Record a run and its plan (every unit key, in order) in one transaction; its id."""
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, started, suite, suite_file, versions, executor, host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    time.time(),
                    json.dumps(suite, sort_keys=True, default=str),
                    suite_file,
                    json.dumps(versions, sort_keys=True),
                    executor,
                    socket.gethostname(),
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO plan (run_id, unit_key, position) VALUES (?, ?, ?)",
                [(run_id, u.unit_key, u.position) for u in units],
            )
        return run_id

    def finish_run(self, run_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (time.time(), run_id))

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the units ``keys`` and their rows (a fresh start); units held by a live
        owner are kept."""
        keys = list(keys)
        with self.transaction() as conn:
            held = {
                k
                for k, owner, beat in _select_in(
                    conn,
                    "SELECT unit_key, owner, heartbeat FROM units WHERE status = 'running' "
                    "AND unit_key IN ({})",
                    keys,
                )
                if owner_alive(owner, beat)
            }
            free = [(k,) for k in keys if k not in held]
            for table in ("results", "curves", "instances", "units"):
                conn.executemany(f"DELETE FROM {table} WHERE unit_key = ?", free)

    # claiming and committing

    def claim(self, units: Sequence[Unit], owner: str, retry_failed: bool = False) -> list[Unit]:
        """Take, in one transaction, the units of ``units`` that are new, failed (with
        ``retry_failed``) or held by a dead owner; the taken ones, in order."""
        now = time.time()
        taken = []
        with self.transaction() as conn:
            state = {
                k: (status, who, beat)
                for k, status, who, beat in _select_in(
                    conn,
                    "SELECT unit_key, status, owner, heartbeat FROM units WHERE unit_key IN ({})",
                    [u.unit_key for u in units],
                )
            }
            for unit in units:
                status, who, beat = state.get(unit.unit_key, (None, None, None))
                if status == "done" or (status == "failed" and not retry_failed):
                    continue
                if status == "running" and who != owner and owner_alive(who, beat, now):
                    continue
                conn.execute(
                    "INSERT INTO units (unit_key, dataset, detector, method, method_name, "
                    "image_id, file_name, config, versions, status, owner, heartbeat, started, "
                    "attempts, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{}', 'running', ?, ?, ?, "
                    "1, ?) ON CONFLICT (unit_key) DO UPDATE SET status = 'running', "
                    "owner = excluded.owner, heartbeat = excluded.heartbeat, "
                    "started = excluded.started, reason = NULL, stage = NULL, "
                    "attempts = units.attempts + 1",
                    (
                        unit.unit_key, unit.dataset, unit.detector, unit.method,
                        unit.method_name, unit.image_id, unit.file_name, unit.config,
                        owner, now, now, unit.position,
                    ),
                )  # fmt: skip
                taken.append(unit)
        return taken

    def heartbeat(self, owner: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE units SET heartbeat = ? WHERE owner = ? AND status = 'running'",
                (time.time(), owner),
            )

    def release(self, owner: str) -> None:
        """Hand back units ``owner`` claimed but did not finish (an interrupted run)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE units SET owner = NULL, heartbeat = NULL "
                "WHERE owner = ? AND status = 'running'",
                (owner,),
            )

    def commit(self, unit: Unit, owner: str, rows: UnitRows, versions: dict[str, str]) -> bool:
        """Write a unit's rows and mark it done or failed, in one transaction; False (and
        nothing written) when ``owner`` no longer holds it."""
        key = unit.unit_key
        with self.transaction() as conn:
            held = conn.execute(
                "SELECT owner, status FROM units WHERE unit_key = ?", (key,)
            ).fetchone()
            if held is None or tuple(held) != (owner, "running"):
                return False
            for table in ("results", "curves", "instances"):
                conn.execute(f"DELETE FROM {table} WHERE unit_key = ?", (key,))
            for table, columns, records in (
                ("results", RESULT_COLUMNS, rows.results),
                ("curves", CURVE_COLUMNS, rows.curves),
                ("instances", INSTANCE_COLUMNS, rows.instances),
            ):
                _insert(conn, table, columns, key, records)
            conn.execute(
                "UPDATE units SET status = ?, reason = ?, stage = ?, finished = ?, seconds = ?, "
                "versions = ?, heartbeat = ? WHERE unit_key = ?",
                (
                    rows.status,
                    rows.reason,
                    rows.stage,
                    time.time(),
                    None if math.isnan(rows.seconds) else rows.seconds,
                    json.dumps(versions, sort_keys=True),
                    time.time(),
                    key,
                ),
            )
        return True

    def states(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None, float | None]]:
        """unit key -> (status, owner, heartbeat) of the units of ``keys`` in the store."""
        return {
            k: (status, who, beat)
            for k, status, who, beat in _select_in(
                self.conn,
                "SELECT unit_key, status, owner, heartbeat FROM units WHERE unit_key IN ({})",
                list(keys),
            )
        }


@contextmanager
def heartbeats(path: str | Path, owner: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Keep ``owner``'s running units fresh from a background thread (its own connection)."""
    stop = threading.Event()

    def beat() -> None:
        store = Store(path)
        try:
            while not stop.wait(every):
                store.heartbeat(owner)
        finally:
            store.close()

    thread = threading.Thread(target=beat, name="xaibench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _insert(
    conn: sqlite3.Connection,
    table: str,
    columns: Sequence[str],
    key: str,
    records: Sequence[dict[str, Any]],
) -> None:
    if not records:
        return
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" * len(columns))
    values = [(key, *(_sql(r.get(c)) for c in columns[1:])) for r in records]
    conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", values)


def _sql(value: Any) -> Any:
    """NaN as NULL (SQLite has no NaN); numpy scalars as Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _select_in(conn: sqlite3.Connection, sql: str, keys: Sequence[str]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (with one ``IN ({})``) over ``keys``, in chunks under SQLite's limit."""
    out: list[tuple[Any, ...]] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        out.extend(conn.execute(sql.format(", ".join("?" * len(chunk))), chunk).fetchall())
    return out
