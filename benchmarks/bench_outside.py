"""The outside adapter: the README's CenterNet-style ``DenseModel`` (seeded weights) through
``xaibench.adapter.DenseDetector``, ODAM's fast path (crops of the declared window) against
the exact one (one autograd backward per target), measured in one run.

    python benchmarks/bench_outside.py [--size 320] [--targets 50] [--repeats 15]

Columns: ``detect``; a trace; ODAM of ``--targets`` detections' scores given the trace, fast
and exact; their ratio; the smallest Pearson correlation of a fast map with its exact one.
Target: the fast path >= 5x faster than the exact loop, with the same maps (Pearson 1.0000);
on a model this small, placing the maps on the image (common to both paths) bounds the ratio.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import median_times
from xaibench.methods.odam import ODAM

from xaibench.types import Target

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_centernet() -> types.ModuleType:
    """The Python example of the README's "A new detector" section, as a module."""
    section = README.read_text().split("## A new detector", 1)[1]
    start = section.index("```python\n") + len("```python\n")
    module = types.ModuleType("tiny_centernet")
    exec(
        compile(section[start : section.index("```\n", start)], "README.md", "exec"),
        module.__dict__,
    )
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320, help="image size (px)")
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    detector = readme_centernet().build(seed=3)
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    trace = detector.trace(image)
    targets = [Target(i) for i in range(min(args.targets, len(trace.detections)))]
    fast, exact = ODAM(), ODAM(mode="exact")
    times = median_times(
        {
            "detect": lambda: detector.detect([image]),
            "trace": lambda: detector.trace(image),
            "fast": lambda: fast.explain(detector, image, targets, trace=trace),
            "exact": lambda: exact.explain(detector, image, targets, trace=trace),
        },
        args.repeats,
    )
    pairs = zip(fast.explain(detector, image, targets, trace=trace),
                exact.explain(detector, image, targets, trace=trace), strict=True)  # fmt: skip
    pearson = min(float(np.corrcoef(f.map.ravel(), e.map.ravel())[0, 1]) for f, e in pairs)
    table = Table(
        "targets",
        "detect ms",
        "trace ms",
        "ODAM fast ms",
        "ODAM exact ms",
        "exact / fast",
        "min Pearson fast vs exact",
        title=f"README CenterNet, {args.size} px, CPU threads {torch.get_num_threads()}",
    )
    ms = {name: f"{t * 1e3:.1f}" for name, t in times.items()}
    table.add_row(str(len(targets)), ms["detect"], ms["trace"], ms["fast"], ms["exact"],
                  f"{times['exact'] / times['fast']:.1f}x", f"{pearson:.4f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
