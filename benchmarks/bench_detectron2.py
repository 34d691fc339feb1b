"""detectron2 wrappers: the black-box view against detectron2's own ``DefaultPredictor``, and
ODAM's fast path against one autograd backward per target, measured in one run.

    python benchmarks/bench_detectron2.py [--size 320] [--detections 50] [--repeats 3]

Detectors: Faster R-CNN and RetinaNet R50-FPN (detectron2's shipped configs), random weights
with calibrated frozen BatchNorm and the score threshold at 0, so that there are exactly
``--detections`` predictions to explain. Columns: ``DefaultPredictor`` on the image; the
wrapper's ``detect`` (same boxes, plus provenance); ODAM of every detection's score (fast
mode) including its own trace and given the trace; the exact per-target loop given the trace.
Targets: ``detect`` within 1.2x of ``DefaultPredictor``; ODAM's fast path >= 10x faster than
the loop.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from detectron2.engine import DefaultPredictor
from rich.console import Console
from rich.table import Table
from timing import median_time
from xaibench.detectors import detectron2 as d2
from xaibench.methods.odam import ODAM

from xaibench.types import Target


def measure(family: str, image: np.ndarray, args: argparse.Namespace) -> list[str]:
    config = f"COCO-Detection/{family}_R_50_FPN_3x.yaml"
    torch.manual_seed(0)
    opts = ["TEST.DETECTIONS_PER_IMAGE", args.detections]  # both families read it
    detector = d2.build(config, min_size=args.size, max_size=args.size, score_thresh=0.0, opts=opts)
    d2.calibrate_frozen_batchnorm(detector, [image])
    cfg = d2.load_config(config, opts)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = args.size, args.size
    predictor = DefaultPredictor(cfg)
    predictor.model = detector.model
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    trace = detector.trace(image)
    targets = [Target(i) for i in range(len(trace.detections))]
    fast, exact = ODAM(), ODAM(mode="exact")
    t_predictor = median_time(lambda: predictor(bgr), args.repeats)
    t_detect = median_time(lambda: detector.detect([image]), args.repeats)
    t_fast = median_time(lambda: fast.explain(detector, image, targets), args.repeats)
    t_given = median_time(lambda: fast.explain(detector, image, targets, trace=trace), args.repeats)
    t_exact = median_time(lambda: exact.explain(detector, image, targets, trace=trace), 1)
    return [
        family,
        str(len(targets)),
        f"{t_predictor * 1e3:.0f}",
        f"{t_detect * 1e3:.0f} ({t_detect / t_predictor:.2f}x)",
        f"{t_fast * 1e3:.0f}",
        f"{t_given * 1e3:.0f}",
        f"{t_exact * 1e3:.0f} ({t_exact / t_given:.0f}x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320, help="test-time image size (px)")
    parser.add_argument("--detections", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    table = Table(
        "detector",
        "targets",
        "DefaultPredictor ms",
        "detect ms (vs predictor)",
        "ODAM fast ms (with trace)",
        "ODAM fast ms (given trace)",
        "exact loop ms (vs fast)",
        title=f"detectron2 R50-FPN, {args.size} px, CPU threads {torch.get_num_threads()}",
    )
    for family in ("faster_rcnn", "retinanet"):
        table.add_row(*measure(family, image, args))
    Console().print(table)


if __name__ == "__main__":
    main()
