"""Overhead of the suite runner and its results store against the bare evaluation loop on the
same work, and the store's write rate, measured in one run.

    XAIBENCH_CACHE=... python benchmarks/bench_runner.py [--detector synthetic-fcos]
                                                         [--images 8] [--repeats 5]

The work: the first ``--images`` synthetic validation scenes, one demo detector, ODAM and
Grad-CAM (the cheapest methods, so the runner's share is the largest), the pointing games,
compactness, ODI and deletion (official protocol: 11 detector reads per curve), the paper's
selection, at most 2 instances per image, one torch thread (``--threads``: several threads
that wait for each other make both paths slow and erratic on a loaded machine). Both paths
get the same built detector and opened dataset and build the suite's methods and metrics
(``Workspace.open``):

- bare: ``evaluate_units`` on each image's units, rows kept in memory (no plan, no store);
- runner: ``run_suite`` into a fresh store (a real SQLite file): the plan with its content
  hashes, the run and plan rows, claims, one commit per unit, heartbeats, the report.

The two take turns in each of ``--repeats`` rounds (after a warm-up round); reported: the
median seconds of each and the overhead, median runner / median bare - 1, in wall time and
in this process's CPU time (all threads; the steadier figure where other processes load the
machine). Target: under 5%.

Write rate: the rows of one bare pass committed again and again (``--copies`` times, under
new unit keys) into a fresh store file, as the runner does: the run and its plan, then per
image one claim of its units and one commit per unit; units/s and rows/s (results, curve
points and instance rows), the median of ``--repeats`` stores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from timing import interleaved_times

from xaibench.evaluate import evaluate_units
from xaibench.plan import Workspace, versions
from xaibench.registry import DETECTORS
from xaibench.runner import run_suite
from xaibench.store import STORE_FILE, Store, Unit, UnitRows, load_results, new_owner
from xaibench.suite import Suite, validate_suite


def make_suite(detector: str, images: int, folder: Path) -> Suite:
    return validate_suite(
        {
            "name": "bench-runner",
            "datasets": [
                {"name": "synth", "kind": "synthetic", "num_images": images, "seed": 2025}
            ],
            "detectors": [{"name": detector}],
            "methods": [{"name": "odam"}, {"name": "gradcam"}],
            "metrics": ["pointing-game", "energy-pg", "compactness", "odi", "deletion"],
            "selection": {"mode": "paper"},
            "limits": {"instances": 2},
            "store": str(folder / "store"),
        },
        "bench_runner",
    )


def bare_units(space: Workspace) -> list[list[Unit]]:
    """Each image's units, built by hand (no plan: no hashing of files or weights)."""
    suite = space.suite
    dataset, detector = suite.datasets[0].name, suite.detectors[0].name
    data = space.datasets[dataset]
    groups: list[list[Unit]] = []
    for i in range(space.image_count(dataset)):
        image_id = str(data.image_ids[i])
        group = []
        for m in suite.methods:
            at = sum(map(len, groups)) + len(group)
            unit = Unit(f"{m.name}-{i}", dataset, detector, m.name, m.registered, image_id,
                        None, i, "{}", at)  # fmt: skip
            group.append(unit)
        groups.append(group)
    return groups


def bare(suite: Suite, factory, datasets) -> list[tuple[Unit, UnitRows]]:
    """The evaluation loop alone: the rows of every unit, in memory."""
    space = Workspace.open(suite, "bench_runner", factory, datasets)
    out = []
    for group in bare_units(space):
        ctx = space.context(group[0].dataset, group[0].detector)
        out += list(evaluate_units(ctx, group))
    return out


def cpu_seconds(fn, *args) -> float:
    """CPU seconds of this process (all its threads) spent in ``fn(*args)``: less disturbed
    than wall time by other processes on a loaded machine."""
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def rows_of(rows: UnitRows) -> int:
    return len(rows.results) + len(rows.curves) + len(rows.instances)


def write_rate(
    suite: Suite, computed: list[tuple[Unit, UnitRows]], copies: int, folder: Path
) -> tuple[float, float, int, int]:
    """(units/s, rows/s, units, rows) of committing ``copies`` copies of ``computed`` into a
    fresh store under ``folder``: the run and plan, then per image a claim and the commits."""
    groups: dict[tuple[int, int], list[tuple[Unit, UnitRows]]] = {}
    for c in range(copies):
        for unit, rows in computed:
            copy = replace(unit, unit_key=f"{c}/{unit.unit_key}", position=len(groups))
            groups.setdefault((c, unit.index), []).append((copy, rows))
    units = [u for g in groups.values() for u, _ in g]
    owner, meta = new_owner(), versions()
    started = time.perf_counter()
    db = Store(folder / STORE_FILE)
    try:
        db.start_run(suite.model_dump(mode="json"), units, meta, "local")
        for group in groups.values():
            db.claim([u for u, _ in group], owner)
            for unit, rows in group:
                assert db.commit(unit, owner, rows, meta)
    finally:
        db.close()
    seconds = time.perf_counter() - started
    total = copies * sum(rows_of(r) for _, r in computed)
    return len(units) / seconds, total / seconds, len(units), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", default="synthetic-fcos")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=20, help="copies of the rows per store")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        suite = make_suite(args.detector, args.images, folder)
        built = DETECTORS.build(args.detector)
        space = Workspace.open(suite, "bench_runner", lambda _: built)
        datasets = dict(space.datasets)  # generated once into folder/store/data

        def factory(_label: str):
            return built

        stores = iter(range(10**6))
        cpu: dict[str, list[float]] = {"bare": [], "runner": []}

        def runner() -> None:
            store = folder / f"run{next(stores)}"
            report = run_suite(
                suite, store=store, progress=False, detector_factory=factory, datasets=datasets
            )
            assert report.failed == 0 and report.computed == report.total

        computed = bare(suite, factory, datasets)  # warm-up, and the rows to compare
        first = folder / "check"
        run_suite(suite, store=first, progress=False, detector_factory=factory, datasets=datasets)
        results, _ = load_results(first / STORE_FILE)
        assert len(results) == sum(len(r.results) for _, r in computed) > 0
        units = len(computed)
        rows = sum(rows_of(r) for _, r in computed)
        times = interleaved_times(
            {
                "bare": lambda: cpu["bare"].append(cpu_seconds(bare, suite, factory, datasets)),
                "runner": lambda: cpu["runner"].append(cpu_seconds(runner)),
            },
            args.repeats,
        )
        bare_s, runner_s = (statistics.median(times[k]) for k in ("bare", "runner"))
        bare_cpu, runner_cpu = (statistics.median(cpu[k]) for k in ("bare", "runner"))
        print(
            f"work: {args.images} images x {len(suite.methods)} methods = {units} units, "
            f"{rows} rows ({len(results)} metric values), {args.detector}"
        )
        print(f"rounds: {args.repeats} (interleaved, after a warm-up); medians")
        print(f"bare evaluation loop: {bare_s:.3f} s ({1000 * bare_s / units:.1f} ms per unit)")
        print(f"runner + store:       {runner_s:.3f} s ({1000 * runner_s / units:.1f} ms per unit)")
        overhead = runner_s / bare_s - 1
        print(
            f"runner overhead (wall): {100 * overhead:+.1f}% "
            f"({1000 * (runner_s - bare_s) / units:+.1f} ms per unit; target: under 5%)"
        )
        print(
            f"runner overhead (CPU):  {100 * (runner_cpu / bare_cpu - 1):+.1f}% "
            f"(bare {bare_cpu:.3f} s, runner {runner_cpu:.3f} s of this process's CPU time)"
        )
        rates = [
            write_rate(suite, computed, args.copies, folder / f"write{r}")
            for r in range(args.repeats)
        ]
        unit_rate = statistics.median(r[0] for r in rates)
        row_rate = statistics.median(r[1] for r in rates)
        print(
            f"store write rate: {unit_rate:.0f} units/s, {row_rate:.0f} rows/s "
            f"({rates[0][2]} units, {rates[0][3]} rows per store; claim per image, commit per "
            f"unit; median of {args.repeats} stores)"
        )


if __name__ == "__main__":
    main()
