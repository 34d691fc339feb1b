"""Seconds per image of each NMS pipeline (detector included) on the synthetic crowd, with the
crowd metrics of the same run.

    python benchmarks/bench_nms.py [--detector synthetic-crowd-fcos] [--images 50]
                                   [--strategies nms,softnms,featurenms,odamnms]

Each strategy's whole pipeline (``strategy.run``: pre-NMS candidates, then the strategy) on
the first ``--images`` scenes of the crowd demo val split; strategies take turns on every
image so that machine load hits them alike. Reported: AP50 / JI / MR^-2 (%), the median
seconds per image and its ratio to classic NMS (target: Odam-NMS at most 1.2x), and the
median of the Odam-NMS stages (one trace of the candidates, their ODAM maps, correlation and
rule), and the maps stage alone against the NMS pipeline. Target: Odam-NMS pipeline <= 1.2 x the
NMS pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from xaibench.detectors.zoo import demo_data
from xaibench.metrics.nms_comparison import compare_strategies, results_frame, table5

from xaibench.registry import DETECTORS, NMS


def odam_stages(detector, images) -> dict[str, float]:
    """Median seconds of each Odam-NMS stage over ``images``: the trace of the pre-NMS
    candidates (the one detector pass), the ODAM maps of those above the score threshold, and
    the correlations with the rule."""
    strategy = NMS.build("odamnms")
    stages: dict[str, list[float]] = {"trace of candidates": [], "maps": [], "rule": []}
    counts = []
    for image in images:
        t0 = time.perf_counter()
        trace = detector.trace_candidates(image)
        pre = strategy.above_threshold(trace.detections)
        t1 = time.perf_counter()
        maps = strategy.maps_on(detector, image, trace, pre.tolist())
        t2 = time.perf_counter()
        strategy.keep_from(trace.detections.index(pre), strategy.correlations(maps))
        t3 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            stages[name].append(seconds)
        counts.append(len(pre))
    out = {name: statistics.median(v) for name, v in stages.items()}
    out["candidates per image"] = statistics.median(counts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="synthetic-crowd-fcos")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--strategies", default="nms,softnms,featurenms,odamnms")
    args = parser.parse_args()
    console = Console()
    detector = DETECTORS.build(args.detector)
    val = demo_data(mode="crowd")["val"]
    samples = [val[i] for i in range(min(args.images, len(val)))]
    names = args.strategies.split(",")
    runs = compare_strategies(detector, samples, names)
    table = table5(results_frame(runs, args.detector))
    medians = {name: statistics.median(run.seconds) for name, run in runs.items()}
    base = medians.get("nms")
    out = Table("strategy", "AP50", "JI", "MR-2", "mean s/img", "median s/img", "x NMS")
    for row in table.itertuples(index=False):
        ratio = f"{medians[row.strategy] / base:.2f}" if base else "-"
        out.add_row(
            row.strategy,
            f"{row.AP50:.1f}",
            f"{row.JI:.1f}",
            f"{row._4:.1f}",
            f"{row._5:.4f}",
            f"{medians[row.strategy]:.4f}",
            ratio,
        )
    threads = torch.get_num_threads()
    console.print(f"{args.detector}, {len(samples)} crowd val images, torch threads {threads}")
    console.print(out)
    stages = odam_stages(detector, [s.image for s in samples])
    count = stages.pop("candidates per image")
    parts = ", ".join(f"{k} {v:.4f}" for k, v in stages.items())
    console.print(f"Odam-NMS stages (median s): {parts}; candidates per image {count:g}")
    if base:  # the 1.2x target leaves the maps at most 0.2x of the whole NMS pipeline
        console.print(f"Odam-NMS maps alone: {stages['maps'] / base:.2f}x the NMS pipeline")


if __name__ == "__main__":
    main()
