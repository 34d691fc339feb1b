"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Wall times (s) of each function, the functions taking turns in every round, so that
    a change of machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (s) of each function over ``repeats`` interleaved rounds, after one
    warm-up call each."""
    for fn in fns.values():
        fn()
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats).items()}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of ``repeats`` calls after one warm-up call."""
    return median_times({"fn": fn}, repeats)["fn"]
