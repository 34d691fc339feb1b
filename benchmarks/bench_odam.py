"""ODAM speed: all targets of an image together against (a) one autograd backward per target
and (b) the detector's plain forward pass, measured in one run.

    python benchmarks/bench_odam.py [--size 512] [--detections 100] [--repeats 3] [--device cpu]

Detectors: FCOS and Faster R-CNN, ResNet50-FPN, random weights with the score threshold at 0
so that there are exactly ``--detections`` predictions to explain. Targets: ODAM fast >= 20x
faster than the loop, and within 1.5x of one forward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torchvision.models import detection as tvd
from xaibench.detectors.torchvision import wrap
from xaibench.methods.odam import ODAM

from xaibench.types import Target


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(family: str, size: int, detections: int, device: str):
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 91}
    kwargs |= {"min_size": size, "max_size": size}
    if family == "fcos":
        model = tvd.fcos_resnet50_fpn(**kwargs, detections_per_img=detections, score_thresh=0.0)
    else:
        model = tvd.fasterrcnn_resnet50_fpn(
            **kwargs, box_detections_per_img=detections, box_score_thresh=0.0
        )
    return model.eval().to(device), wrap(model, device=device)


def measure(family: str, image: np.ndarray, args: argparse.Namespace) -> list[str]:
    """One table row: forward, ODAM fast and the per-target loop for ``family``."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, detector = build(family, args.size, args.detections, args.device)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(args.device)
    n = len(detector.detect([image])[0])
    targets = [Target(i, "score") for i in range(n)]

    def forward() -> None:
        with torch.no_grad():
            model([tensor])
        sync()

    def fast() -> None:
        ODAM(mode="fast").explain(detector, image, targets)
        sync()

    def loop() -> None:
        ODAM(mode="exact").explain(detector, image, targets)
        sync()

    t_forward = timed(forward, args.repeats)
    t_fast = timed(fast, args.repeats)
    t_loop = timed(loop, args.loop_repeats)
    return [
        f"{family} ({n} det.)",
        f"{t_forward:.3f}",
        f"{t_fast:.3f}",
        f"{t_loop:.3f}",
        f"{t_loop / t_fast:.1f}x",
        f"{t_fast / t_forward:.2f}x",
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
        "detector",
        "forward s",
        "ODAM fast s",
        "per-target loop s",
        "loop / fast",
        "fast / forward",
    ):
        table.add_column(col, justify="right")
    for family in ("fcos", "frcnn"):
        table.add_row(*measure(family, image, args))
    Console().print(table)


if __name__ == "__main__":
    main()
