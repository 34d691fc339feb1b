"""ODAM speed: all targets of an image together against (a) one autograd backward per target
and (b) the detector's plain forward pass, measured in one run.

    python benchmarks/bench_odam.py [--size 512] [--detections 100] [--repeats 3] [--device cpu]

Detectors: FCOS and Faster R-CNN, ResNet50-FPN, random weights with the score threshold at 0
so that there are exactly ``--detections`` predictions to explain; FCOS also with
``gn_tolerance=inf`` (GroupNorm statistics held fixed except on levels no larger than a
window, which always take the exact route). Columns:
the plain torchvision forward; ODAM (fast mode) including its own forward (the trace) and
given the trace; two per-target autograd loops: the shared one builds the autograd graph of the
heads once, from the trace's levels, and runs one backward per target (its backward part alone
is the loop minus that graph-building forward), the naive one runs a forward and a backward for
each target; the lowest Pearson
correlation between a fast map and its exact one. The forward pass and ODAM with and without
its trace take turns in every timing round (medians over ``--repeats`` rounds).
Targets: ODAM >= 20x faster than the loop, and within 1.5x of one forward pass. Both ODAM and
the shared loop pay one forward pass, so end to end that loop can be at most (F + T b) / F
times slower than ODAM (F forward, b one backward, T targets); the per-target work is compared
in "shared loop backward / ODAM given trace", the whole per-target computation in "naive loop
/ ODAM".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import median_time, median_times
from torchvision.models import detection as tvd
from xaibench.detectors.torchvision import wrap
from xaibench.methods.odam import ODAM

from xaibench.types import Target


def once(fn: Callable[[], object]) -> float:
    """Wall time (s) of one call (for loops that are long and warm themselves)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(family: str, size: int, detections: int, device: str, **options: float):
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 91}
    kwargs |= {"min_size": size, "max_size": size}
    if family == "fcos":
        model = tvd.fcos_resnet50_fpn(**kwargs, detections_per_img=detections, score_thresh=0.0)
    else:
        model = tvd.fasterrcnn_resnet50_fpn(
            **kwargs, box_detections_per_img=detections, box_score_thresh=0.0
        )
    return model.eval().to(device), wrap(model, device=device, **options)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-30))


def measure(
    family: str, image: np.ndarray, args: argparse.Namespace, **options: float
) -> list[str]:
    """One table row for ``family``: plain forward; ODAM fast with and without its own
    forward (the trace); the per-target loop with and without its graph-building forward."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, detector = build(family, args.size, args.detections, args.device, **options)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(args.device)
    trace = detector.trace(image)
    targets = [Target(i, "score") for i in range(len(trace.detections))]

    def run(fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            fn()
            sync()

        return call

    def forward() -> None:
        with torch.no_grad():
            model([tensor])

    t = median_times(
        {
            "forward": run(forward),
            "fast": run(lambda: ODAM().explain(detector, image, targets)),
            "fast given trace": run(lambda: ODAM().explain(detector, image, targets, trace)),
        },
        args.repeats,
    )
    t_forward, t_fast, t_fast_maps = t.values()

    def graph() -> None:  # what the exact path builds before its backward passes
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in trace.features.items()}
            trace._values(leaves, targets)

    t_graph = median_time(run(graph), args.repeats)
    exact = run(lambda: ODAM(mode="exact").explain(detector, image, targets, trace))
    t_loop = median_time(exact, args.loop_repeats)
    t_loop_backward = t_loop - t_graph

    def naive_loop() -> None:
        for target in targets:
            ODAM(mode="exact").explain(detector, image, [target], trace)

    t_naive = once(run(naive_loop))
    fast = ODAM().explain(detector, image, targets, trace)
    exact = ODAM(mode="exact").explain(detector, image, targets, trace)
    worst = min(pearson(f.map, e.map) for f, e in zip(fast, exact, strict=True))
    label = ", ".join(f"{k}={v}" for k, v in options.items())
    return [
        f"{family}{f' ({label})' if label else ''}, {len(targets)} targets",
        f"{t_forward:.3f}",
        f"{t_fast:.3f}",
        f"{t_fast_maps:.3f}",
        f"{t_loop:.3f}",
        f"{t_naive:.3f}",
        f"{t_loop / t_fast:.1f}x",
        f"{t_naive / t_fast:.1f}x",
        f"{t_loop_backward / t_fast_maps:.1f}x",
        f"{t_fast / t_forward:.2f}x",
        f"{worst:.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)

    table = Table(title=f"ODAM, {args.detections} detections, {args.size} px, {args.device}")
    for col in (
        "detector (targets)",
        "forward s",
        "ODAM s",
        "ODAM given trace s",
        "shared loop s",
        "naive loop s",
        "shared loop / ODAM",
        "naive loop / ODAM",
        "shared loop backward / ODAM given trace",
        "ODAM / forward",
        "min Pearson fast vs exact",
    ):
        table.add_column(col, justify="right")
    table.add_row(*measure("fcos", image, args))
    table.add_row(*measure("fcos", image, args, gn_tolerance=float("inf")))
    table.add_row(*measure("frcnn", image, args))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
