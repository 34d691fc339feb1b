"""Deletion + insertion of one explanation: batched perturbations against an unbatched loop,
measured in one run.

    python benchmarks/bench_metrics.py [--detector synthetic-fcos] [--batch-size 32]
                                       [--repeats 5] [--scene 0]

One ODAM map of the best detection of a held-out demo scene; the official protocol (100
steps, the detector read every 10: 11 points per curve, 22 perturbed images for both
curves). Rows: the registered metrics (one call each, all points of a curve batched), both
curves through one ``PerturbationCurves.scores`` call, and the loop that runs the detector on
one perturbed image at a time. Forward passes are counted with a hook on the detector's first
parameterised top-level module (its backbone), which runs once per forward pass. The paths
take turns in each of ``--repeats`` rounds; the ratio uses each path's fastest round (the
least disturbed by other load). The loop's curves must equal the batched ones. Target:
batched at least 2x faster than the loop.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import interleaved_times
from xaibench.detectors.zoo import demo_data
from xaibench.metrics.faithfulness import PerturbationCurves, pixel_ranking, target_score

from xaibench.detector import Detector
from xaibench.metric import ExplainedBatch
from xaibench.registry import DETECTORS, METHODS, METRICS
from xaibench.types import Target


def first_parameterised_child(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for _, m in module.named_children() if any(True for _ in m.parameters()))


def count_passes(fn: Callable[[], object], detector: Detector) -> int:
    """Forward passes of one call of ``fn``."""
    passes = []
    hook = first_parameterised_child(detector.torch_module()).register_forward_pre_hook(
        lambda *_: passes.append(1)
    )
    try:
        fn()
    finally:
        hook.remove()
    return len(passes)


def unbatched_curves(
    curves: PerturbationCurves, detector: Detector, image: np.ndarray, heat, box, label
) -> dict[str, np.ndarray]:
    """The same raw scores, one perturbed image per detector call."""
    ranking = pixel_ranking(heat)
    out = {}
    for mode in ("deletion", "insertion"):
        base, source = curves.sources(image, mode)
        scores = []
        for count in curves.counts(box, image.shape[:2]):
            perturbed = base.copy().reshape(-1, 3)
            perturbed[ranking[:count]] = source.reshape(-1, 3)[ranking[:count]]
            (det,) = detector.detect([perturbed.reshape(image.shape)], batch_size=1, nms=False)
            scores.append(target_score(det, box, label, curves.iou_thresh))
        out[mode] = np.asarray(scores)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="synthetic-fcos")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scene", type=int, default=0)
    args = parser.parse_args()

    detector = DETECTORS.build(args.detector, progress=False)
    sample = demo_data()["val"][args.scene]
    image = sample.image
    trace = detector.trace(image)
    target = Target(int(torch.argmax(trace.detections.scores)))
    (saliency,) = METHODS.build("odam").explain(detector, image, [target], trace=trace)
    heat = saliency.map
    box = trace.detections.boxes[target.index].numpy()
    label = int(trace.detections.labels[target.index])
    batch = ExplainedBatch(image, heat[None], [target], trace.detections, [], np.array([-1]))
    curves = PerturbationCurves(batch_size=args.batch_size)
    deletion = METRICS.build("deletion", batch_size=args.batch_size)
    insertion = METRICS.build("insertion", batch_size=args.batch_size)

    batched = curves.scores(detector, image, heat[None], box[None], np.array([label]))
    looped = unbatched_curves(curves, detector, image, heat, box, label)
    for mode in ("deletion", "insertion"):
        np.testing.assert_allclose(batched[mode][0], looped[mode], rtol=1e-4, atol=1e-6)

    rows = {
        "metrics deletion + insertion (batched)": lambda: (
            deletion.compute(batch, detector),
            insertion.compute(batch, detector),
        ),
        "both curves in one call (batched)": lambda: curves.scores(
            detector, image, heat[None], box[None], np.array([label])
        ),
        "unbatched loop (1 image per pass)": lambda: unbatched_curves(
            curves, detector, image, heat, box, label
        ),
    }
    passes = {name: count_passes(fn, detector) for name, fn in rows.items()}  # also warms up
    times = interleaved_times(rows, args.repeats)
    loop = "unbatched loop (1 image per pass)"
    table = Table(
        "path", "forward passes", "seconds (min)", "seconds (median)", "loop time / this (min)",
        title=f"deletion + insertion of one ODAM map, {args.detector}, "
        f"{image.shape[0]}x{image.shape[1]} px, batch size {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds",
    )  # fmt: skip
    for name, values in times.items():
        table.add_row(
            name,
            str(passes[name]),
            f"{min(values):.3f}",
            f"{statistics.median(values):.3f}",
            f"{min(times[loop]) / min(values):.2f}x",
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
