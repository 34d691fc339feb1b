"""``xaibench demo``: the main job on the embedded default.

Makes synthetic scenes, trains (first run) or loads the demo detectors, explains a few
images and prints where the outputs are; then runs the embedded default suite (``xaibench
run``: every registered method with every metric on a few more scenes, scaled down) into
``OUT/run`` and prints its summary.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xaibench.cli.run import print_report
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.explain import explain_image, write_explanation
from xaibench.images import load_image
from xaibench.registry import DETECTORS, METHODS
from xaibench.runner import run_suite
from xaibench.suite import load_suite


def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", "-o", help="output folder"),
    detector: list[str] = typer.Option(
        ["synthetic-fcos", "synthetic-frcnn"], "--detector", "-d", help="detectors (repeatable)"
    ),
    method: str = typer.Option("odam", "--method", "-m", help="explanation method"),
    num_images: int = typer.Option(3, "--num-images", "-n", min=1, help="images to explain"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="detections explained per image"),
    seed: int = typer.Option(2024, help="seed of the demo scenes"),
    eval_images: int = typer.Option(
        4, "--eval-images", min=0, help="scenes of the closing suite run (0 skips it)"
    ),
) -> None:
    """Synthetic data -> demo detectors -> heat maps for a few images -> the default suite."""
    console = Console()
    split = generate_synthetic(out / "data", num_images, seed=seed, split="demo")
    console.print(f"synthetic scenes: {split.images_dir} (COCO json {split.annotation_file})")
    explainer = METHODS.build(method)
    table = Table("detector", "image", "detections", "explained")
    built = {}
    for name in detector:
        wrapped = built[name] = DETECTORS.build(name)
        for i in range(num_images):
            path = split.images_dir / split.file_name(i)
            image = load_image(path)
            result = explain_image(wrapped, explainer, image, ("score", "combined"), top_k=top_k)
            write_explanation(
                out / name,
                image,
                result,
                wrapped.class_names,
                wrapped.feature_levels,
                image_name=path.stem,
            )
            table.add_row(
                name,
                path.name,
                str(len(result.detections)),
                str(len(result.explained)),
            )
    console.print(table)
    console.print(
        f"overlays (PNG), maps (.npy) and <image>.detections.json: {out}/<detector>/",
        highlight=False,
    )
    if eval_images:
        suite = load_suite(
            None,
            [
                f"limits.images={eval_images}",
                f"datasets[0].num_images={eval_images}",
                f"detectors={[{'name': d} for d in detector]}",
            ],
        )
        console.print("running the default suite (xaibench run): every method, every metric")
        report = run_suite(
            suite, where="default suite", store=out / "run", detector_factory=built.__getitem__
        )
        print_report(console, report)
