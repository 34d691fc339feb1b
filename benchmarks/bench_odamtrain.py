"""Odam-Train against the baseline recipe on the demo detectors: one table.

    python benchmarks/bench_odamtrain.py [--images 100] [--crowd-images 50]

Objects split (``synthetic-fcos`` against ``synthetic-fcos-odamtrain``, the first
``--images`` val scenes): AP50 of the detections (pycocotools), and on the instances of the
paper's selection, ODAM score maps with energy PG (box), ODI (box) and the heat-map
separation: the mean cosine correlation (maps resized to short edge 50, as Odam-NMS) of the
maps of every pair of selected instances that matched different objects of one image (lower:
better separated). Crowd split (``synthetic-crowd-fcos`` against
``synthetic-crowd-fcos-odamtrain``, the first ``--crowd-images`` val scenes): AP50, JI and
MR^-2 (%) of classic NMS and Odam-NMS on the same candidates. The Odam-Train demos train with
half the baselines' steps (10 CPU-minute budget), so AP50 differences mix recipe and schedule.
Demo detectors missing from the cache train first.
"""

from __future__ import annotations

import argparse
import copy
import itertools

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from xaibench.detectors.nms import normalized_correlation, resize_short_edge
from xaibench.detectors.zoo import demo_data
from xaibench.metrics.nms_comparison import compare_strategies

from xaibench import METRICS, Target
from xaibench.coco_eval import evaluate_coco
from xaibench.metric import ExplainedBatch
from xaibench.registry import DETECTORS, METHODS
from xaibench.selection import select_instances

PAIRS = {
    "objects": ("synthetic-fcos", "synthetic-fcos-odamtrain"),
    "crowd": ("synthetic-crowd-fcos", "synthetic-crowd-fcos-odamtrain"),
}


def map_measures(detector, samples) -> dict[str, float]:
    """AP50 and, over the paper-selected instances, mean energy PG, ODI and separation."""
    odam, epg, odi = METHODS.build("odam"), METRICS.build("energy-pg"), METRICS.build("odi")
    detections, energy, overlap, separation = [], [], [], []
    for sample in samples:
        trace = detector.trace(sample.image)
        detections.append(trace.detections)
        picked = select_instances(trace.detections, sample.instances)
        if not picked:
            continue
        targets = [Target(s.detection) for s in picked]
        maps = np.stack([m.map for m in odam.explain(detector, sample.image, targets, trace)])
        batch = ExplainedBatch(
            sample.image,
            maps,
            targets,
            trace.detections,
            sample.instances,
            [s.gt for s in picked],
        )
        energy.extend(epg.compute(batch).values["epg_box"])
        overlap.extend(odi.compute(batch).values["odi_box"])
        corr = normalized_correlation(resize_short_edge(torch.from_numpy(maps), 50))
        for i, j in itertools.combinations(range(len(picked)), 2):
            if picked[i].gt != picked[j].gt:
                separation.append(float(corr[i, j]))
    return {
        "AP50": 100 * evaluate_coco(detections, samples.dataset)["AP50"],
        "energy PG box": float(np.nanmean(energy)),
        "ODI box": float(np.nanmean(overlap)),
        "separation (corr)": float(np.mean(separation)),
        "instances": len(energy),
        "pairs": len(separation),
    }


class Subset(list):
    """The first samples of a dataset, with the dataset (for pycocotools) beside them."""

    def __init__(self, dataset, count: int) -> None:
        super().__init__(dataset[i] for i in range(min(count, len(dataset))))
        self.dataset = copy.copy(dataset)
        self.dataset.image_ids = dataset.image_ids[: len(self)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--crowd-images", type=int, default=50)
    args = parser.parse_args()
    console = Console()
    val = demo_data(mode="objects")["val"]
    samples = Subset(val, args.images)
    table = Table("objects val", *PAIRS["objects"])
    measures = [map_measures(DETECTORS.build(name), samples) for name in PAIRS["objects"]]
    for key in measures[0]:
        table.add_row(key, *(f"{m[key]:.4g}" for m in measures))
    console.print(f"objects: first {len(samples)} val scenes")
    console.print(table)
    crowd = demo_data(mode="crowd")["val"]
    crowd_samples = [crowd[i] for i in range(min(args.crowd_images, len(crowd)))]
    table = Table("crowd val", *(f"{n} {s}" for n in PAIRS["crowd"] for s in ("nms", "odamnms")))
    reports = []
    for name in PAIRS["crowd"]:
        runs = compare_strategies(DETECTORS.build(name), crowd_samples, ["nms", "odamnms"])
        reports += [runs["nms"].report, runs["odamnms"].report]
    for key, attr in (("AP50 %", "ap50"), ("JI %", "ji"), ("MR^-2 %", "mr2")):
        table.add_row(key, *(f"{100 * getattr(r, attr):.1f}" for r in reports))
    console.print(f"crowd: first {len(crowd_samples)} val scenes")
    console.print(table)


if __name__ == "__main__":
    main()
