"""Speed of the explanation methods on the demo detectors, measured in one run.

    python benchmarks/bench_methods.py [--masks 512] [--bbam-iterations 30] [--threads 1]

1. D-RISE throughput: masks per second of D-RISE (masking, detector calls, weights, sums)
   against the detector's own batched ``detect`` on the same masked images (prepared before
   timing), in alternating rounds, fastest of ``--repeats``. Target: overhead at most 10%.
2. BBAM batching: time per detection with 8 detections optimised together against one at a
   time (same iterations). Target: batched at least 3x faster per detection.
3. Time per explanation (seconds per map, the methods' own ``Saliency.seconds``) of ODAM,
   Grad-CAM, Grad-CAM++, D-RISE (``--drise-n`` masks) and BBAM (``--bbam-full-iterations``)
   for the top ``--targets`` detections of one held-out scene.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import interleaved_times, median_time
from xaibench.detectors.zoo import demo_data
from xaibench.methods.bbam import BBAM
from xaibench.methods.drise import DRISE

from xaibench.registry import DETECTORS, METHODS
from xaibench.types import Target

DETECTOR_NAMES = ("synthetic-fcos", "synthetic-frcnn")


def interleaved(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Fastest wall times (s) of two calls run in alternating rounds after one warm-up
    each, so that drift in the machine's speed affects both alike."""
    first(), second()
    times = interleaved_times({"first": first, "second": second}, repeats)
    return min(times["first"]), min(times["second"])


def drise_overhead(detector, image: np.ndarray, args: argparse.Namespace) -> list[str]:
    drise = DRISE(n=args.masks, batch_size=args.batch_size, progress=False)
    reference = detector.detect([image])[0]
    targets = [Target(i) for i in range(min(args.targets, len(reference)))]
    masks = drise.mask_set(image.shape[:2]).batch(0, args.masks)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))
    masked = list((pixels * masks[..., None]).round().byte().numpy())
    t_detect, t_drise = interleaved(
        lambda: detector.detect(masked, batch_size=args.batch_size),
        lambda: drise.explain(detector, image, targets),
        args.repeats,
    )
    return [
        detector.name,
        f"{args.masks / t_detect:.1f}",
        f"{args.masks / t_drise:.1f}",
        f"{100 * (t_drise / t_detect - 1):+.1f}%",
    ]


def bbam_batching(detector, image: np.ndarray, args: argparse.Namespace) -> list[str]:
    trace = detector.trace(image)
    n = min(8, len(trace.detections))
    targets = [Target(i) for i in range(n)]

    def run(batch_size: int) -> float:
        bbam = BBAM(iterations=args.bbam_iterations, batch_size=batch_size, progress=False)
        return median_time(lambda: bbam.explain(detector, image, targets, trace=trace), 1) / n

    together, alone = run(8), run(1)
    return [detector.name, str(n), f"{together:.3f}", f"{alone:.3f}", f"{alone / together:.2f}x"]


def per_method(detector, image: np.ndarray, args: argparse.Namespace) -> list[str]:
    settings = {
        "odam": {},
        "gradcam": {},
        "gradcampp": {},
        "drise": {"n": args.drise_n, "batch_size": args.batch_size, "progress": False},
        "bbam": {"iterations": args.bbam_full_iterations, "progress": False},
    }
    targets = [Target(i) for i in range(args.targets)]
    row = [detector.name]
    for name, kwargs in settings.items():
        method = METHODS.build(name, **kwargs)
        method.explain(detector, image, targets[:1])  # warm-up
        maps = method.explain(detector, image, targets)
        row.append(f"{maps[0].seconds:.4g}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=512, help="D-RISE masks, part 1")
    parser.add_argument("--batch-size", type=int, default=32, help="masked images per call")
    parser.add_argument("--bbam-iterations", type=int, default=30, help="BBAM steps, part 2")
    parser.add_argument("--drise-n", type=int, default=1000, help="D-RISE masks, part 3")
    parser.add_argument("--bbam-full-iterations", type=int, default=300, help="BBAM, part 3")
    parser.add_argument("--targets", type=int, default=5, help="detections explained, part 3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scene", type=int, default=6, help="held-out demo scene")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    image = demo_data()["val"][args.scene].image
    detectors = [DETECTORS.build(name, progress=False) for name in DETECTOR_NAMES]
    console.print(f"torch threads: {torch.get_num_threads()}, image {image.shape[:2]}")

    table = Table("detector", "detect masks/s", "D-RISE masks/s", "D-RISE overhead")
    table.title = f"1. D-RISE, {args.masks} masks, batch {args.batch_size} (target <= +10%)"
    for detector in detectors:
        table.add_row(*drise_overhead(detector, image, args))
    console.print(table)

    table = Table("detector", "detections", "s/det batched", "s/det one by one", "speed-up")
    table.title = f"2. BBAM, {args.bbam_iterations} iterations (target >= 3x)"
    for detector in detectors:
        table.add_row(*bbam_batching(detector, image, args))
    console.print(table)

    table = Table("detector", "odam", "gradcam", "gradcampp", "drise", "bbam")
    table.title = (
        f"3. seconds per map, {args.targets} detections (D-RISE {args.drise_n} masks, "
        f"BBAM {args.bbam_full_iterations} iterations)"
    )
    for detector in detectors:
        table.add_row(*per_method(detector, image, args))
    console.print(table)


if __name__ == "__main__":
    main()
