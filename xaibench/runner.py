"""The suite runner: a suite's units computed into its results store, resumably.

``run_suite`` opens the suite (``Workspace``: plugins built, datasets opened, bad settings
fail before any work), writes the run's ``runs`` row and its plan (every unit key), then
works through the units: a unit already done is skipped, a unit another live process holds is
left to it (and waited for), a failed unit is skipped unless ``retry_failed``; every unit's
rows are committed in one transaction as soon as it finishes. Executors:

- ``local``: units computed in this process, one image at a time;
- ``ray``: one task per image (its units), on a local ``ray.init`` or a cluster
  (``address``); tasks request ``gpus_per_task`` GPUs (default 1) where the cluster has GPUs;
  workers build the suite's plugins once per process, compute rows and return them; only
  this process (the driver) writes the store.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from xaibench.detector import Detector
from xaibench.evaluate import evaluate_units
from xaibench.plan import Dataset, Workspace, versions
from xaibench.store import STORE_FILE, Store, Unit, UnitRows, heartbeats, new_owner, owner_alive
from xaibench.suite import Suite

WAIT_S = 1.0
"""Seconds between looks at units that another live process holds."""


@dataclass
class RunReport:
    """How a run went: ``total`` units in the plan, ``done``/``failed`` at the end (by any
    process), ``computed`` by this one, ``skipped`` (done before), ``failures`` (one row per
    failed unit of the plan: dataset, detector, method, image_id, stage, reason)."""

    run_id: str
    store: Path
    total: int
    done: int
    failed: int
    computed: int
    skipped: int
    seconds: float
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)
    images: int = 0

    @property
    def images_failed(self) -> int:
        """Images (per dataset and detector) that could not be read, detected or matched."""
        if self.failures.empty:
            return 0
        bad = self.failures[self.failures["stage"] == "image"]
        return int(bad[["dataset", "detector", "image_id"]].drop_duplicates().shape[0])


def run_suite(
    suite: Suite,
    *,
    where: str | Path = "suite",
    store: str | Path | None = None,
    retry_failed: bool = False,
    fresh: bool = False,
    progress: bool = True,
    console: Console | None = None,
    detector_factory: Callable[[str], Detector] | None = None,
    datasets: dict[str, Dataset] | None = None,
    before_work: Callable[[], None] | None = None,
) -> RunReport:
    """Run ``suite`` into ``store`` (a folder; default ``suite.store_dir``). ``fresh`` drops
    the plan's stored units first (``evaluate --no-resume``); ``before_work`` is called once
    the suite is known to be runnable, before anything is written."""
    started = time.perf_counter()
    folder = (Path(store) if store is not None else suite.store_dir).absolute()
    suite = absolute_paths(suite.model_copy(update={"store": folder}))
    space = Workspace.open(suite, where, detector_factory, datasets)
    groups = space.plan()
    units = [u for g in groups for u in g]
    if before_work is not None:
        before_work()
    db = Store(folder / STORE_FILE)
    try:
        run_id = db.start_run(
            suite.model_dump(mode="json"), units, versions(), suite.executor.kind, str(where)
        )
        if fresh:
            db.forget(u.unit_key for u in units)
        before = db.states([u.unit_key for u in units])
        skipped = sum(1 for s in before.values() if s[0] == "done")
        owner = new_owner()
        with _progress(progress, console, len(units)) as bar:
            bar.update(done=skipped, failed=sum(1 for s in before.values() if s[0] == "failed"))
            execute = _ray if suite.executor.kind == "ray" else _local
            with heartbeats(folder / STORE_FILE, owner):
                computed = execute(space, db, groups, owner, retry_failed, bar)
        db.finish_run(run_id)
        return _report(db, run_id, folder, units, computed, skipped, started, len(groups))
    finally:
        db.close()


def absolute_paths(suite: Suite) -> Suite:
    """The suite with its dataset paths made absolute (for workers in other folders)."""
    fields = ("annotations", "odgt", "images")
    datasets = [
        d.model_copy(update={f: getattr(d, f).absolute() for f in fields if hasattr(d, f)})
        for d in suite.datasets
    ]
    detectors = [
        d.model_copy(update={"weights": str(Path(d.weights).absolute())})
        if d.weights not in (None, "DEFAULT")
        else d
        for d in suite.detectors
    ]
    return suite.model_copy(update={"datasets": datasets, "detectors": detectors})


# -- the work loop shared by both executors ------------------------------------------------------


def _claimable(
    db: Store, groups: Sequence[list[Unit]], owner: str, attempted: set[str], retry: bool
) -> tuple[list[list[Unit]], bool]:
    """(groups with units this process may take, whether other live processes hold some)."""
    states = db.states([u.unit_key for g in groups for u in g])
    free, held = [], False
    for group in groups:
        mine = []
        for unit in group:
            status, who, beat = states.get(unit.unit_key, (None, None, None))
            if unit.unit_key in attempted or status == "done":
                continue
            if status == "failed" and not retry:
                continue
            if status == "running" and who != owner and owner_alive(who, beat):
                held = True
                continue
            mine.append(unit)
        if mine:
            free.append(mine)
    return free, held


def _rounds(
    db: Store, groups: Sequence[list[Unit]], owner: str, retry: bool, attempted: set[str]
) -> Iterator[list[Unit]]:
    """Groups of units to compute, each claimed; ends when every unit is finished or this
    process tried it (waiting for units that other live processes hold)."""
    while True:
        free, held = _claimable(db, groups, owner, attempted, retry)
        for group in free:
            claimed = db.claim(group, owner, retry_failed=retry)
            attempted.update(u.unit_key for u in claimed)
            if claimed:
                yield claimed
        if not free and not held:
            return
        if not free:
            time.sleep(WAIT_S)


def _local(
    space: Workspace,
    db: Store,
    groups: Sequence[list[Unit]],
    owner: str,
    retry: bool,
    bar: _Bar,
) -> int:
    computed = 0
    attempted: set[str] = set()
    try:
        for claimed in _rounds(db, groups, owner, retry, attempted):
            ctx = space.context(claimed[0].dataset, claimed[0].detector)
            for unit, rows in evaluate_units(ctx, claimed):
                if db.commit(unit, owner, rows, versions()):
                    computed += 1
                    bar.advance(rows)
    finally:
        db.release(owner)
    return computed


# -- Ray -----------------------------------------------------------------------------------------

_WORKER_SPACES: dict[str, Workspace] = {}


def _ray_group(suite_json: str, units: list[Unit]) -> list[tuple[Unit, UnitRows]]:
    """A Ray task: the rows of one image's units (the workspace built once per worker)."""
    key = hashlib.sha256(suite_json.encode()).hexdigest()
    if key not in _WORKER_SPACES:
        _WORKER_SPACES[key] = Workspace.open(Suite.model_validate(json.loads(suite_json)))
    space = _WORKER_SPACES[key]
    ctx = space.context(units[0].dataset, units[0].detector)
    return list(evaluate_units(ctx, units))


def _ray(
    space: Workspace,
    db: Store,
    groups: Sequence[list[Unit]],
    owner: str,
    retry: bool,
    bar: _Bar,
) -> int:
    try:
        import ray
    except ImportError as err:
        raise RuntimeError(
            "executor ray needs Ray: pip install 'xaibench[ray]' (or pip install ray)"
        ) from err
    spec = space.suite.executor
    if not ray.is_initialized():
        if spec.address:
            ray.init(address=spec.address, log_to_driver=False)
        else:
            ray.init(num_cpus=spec.num_cpus, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpus = (spec.gpus_per_task or 1.0) if resources.get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_ray_group)
    width = max(1, int(resources.get("CPU", 1)))
    suite_json = space.suite.model_dump_json()
    computed = 0
    attempted: set[str] = set()
    pending: dict[Any, list[Unit]] = {}
    try:
        rounds = _rounds(db, groups, owner, retry, attempted)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * width:
                claimed = next(rounds, None)
                if claimed is None:
                    exhausted = True
                else:
                    pending[task.remote(suite_json, claimed)] = claimed
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                units = pending.pop(ref)
                for unit, rows in _ray_rows(ray, ref, units):
                    if db.commit(unit, owner, rows, versions()):
                        computed += 1
                        bar.advance(rows)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        db.release(owner)
    return computed


def _ray_rows(ray: Any, ref: Any, units: list[Unit]) -> Iterable[tuple[Unit, UnitRows]]:
    """A task's rows; a task that died (worker crash) fails its units with the reason."""
    try:
        return ray.get(ref)
    except Exception as err:
        reason = f"ray task failed: {type(err).__name__}: {err}"
        return [(u, UnitRows("failed", reason=reason, stage="image")) for u in units]


# -- progress and the report ---------------------------------------------------------------------


class _Bar:
    """Units done / total, ETA and failures so far (rich)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.done = 0
        self.failed = 0
        self.task = None if progress is None else progress.add_task("units", total=total, failed=0)

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=self.done + self.failed, failed=self.failed)

    def advance(self, rows: UnitRows) -> None:
        self.update(done=rows.status == "done", failed=rows.status == "failed")


@contextmanager
def _progress(show: bool, console: Console | None, total: int) -> Iterator[_Bar]:
    if not show:
        yield _Bar(None, total)
        return
    columns = (
        TextColumn("units"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("failed: {task.fields[failed]}"),
    )
    with Progress(*columns, console=console or Console(stderr=True)) as progress:
        bar = _Bar(progress, total)
        yield bar


def _report(
    db: Store,
    run_id: str,
    folder: Path,
    units: Sequence[Unit],
    computed: int,
    skipped: int,
    started: float,
    images: int,
) -> RunReport:
    keys = [u.unit_key for u in units]
    states = db.states(keys)
    rows = db.conn.execute(
        "SELECT u.dataset, u.detector, u.method, u.image_id, u.stage, u.reason FROM plan p "
        "JOIN units u ON u.unit_key = p.unit_key WHERE p.run_id = ? AND u.status = 'failed' "
        "ORDER BY p.position",
        (run_id,),
    ).fetchall()
    failures = pd.DataFrame(
        rows, columns=["dataset", "detector", "method", "image_id", "stage", "reason"]
    )
    return RunReport(
        run_id,
        folder,
        len(units),
        sum(1 for s in states.values() if s[0] == "done"),
        sum(1 for s in states.values() if s[0] == "failed"),
        computed,
        skipped,
        time.perf_counter() - started,
        failures,
        images,
    )
