"""``xaibench demo``: the main job on the embedded default.

Makes synthetic scenes, trains (first run) or loads the demo detectors, explains a few
images and prints where the outputs are; then evaluates every registered method with every
metric on a few more scenes (``xaibench evaluate``, scaled down) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xaibench.cli.evaluate import demo_settings, print_table
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.evaluate import run_evaluation
from xaibench.explain import explain_image, write_explanation
from xaibench.images import load_image
from xaibench.registry import DETECTORS, METHODS


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
        4, "--eval-images", min=0, help="scenes of the closing evaluation (0 skips it)"
    ),
) -> None:
    """Synthetic data -> demo detectors -> heat maps for a few images -> evaluation table."""
    console = Console()
    split = generate_synthetic(out / "data", num_images, seed=seed, split="demo")
    console.print(f"synthetic scenes: {split.images_dir} (COCO json {split.annotation_file})")
    explainer = METHODS.build(method)
    table = Table("detector", "image", "detections", "explained", "output")
    built = {}
    for name in detector:
        wrapped = built[name] = DETECTORS.build(name)
        for i in range(num_images):
            path = split.images_dir / split.file_name(i)
            image = load_image(path)
            result = explain_image(wrapped, explainer, image, ("score", "combined"), top_k=top_k)
            json_path = write_explanation(
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
                str(json_path.parent),
            )
    console.print(table)
    console.print(f"overlays (PNG), maps (.npy) and detections.json are under {out}")
    if eval_images:
        scenes = generate_synthetic(out / "data", eval_images, seed=seed + 1, split="eval")
        console.print(f"evaluating every method with every metric on {scenes.images_dir}")
        result = run_evaluation(
            CocoDataset(scenes.annotation_file, scenes.images_dir),
            demo_settings(detector, eval_images),
            out / "evaluate",
            build_detector=built.__getitem__,
        )
        print_table(result, console, title="demo evaluation, mean ± 95% CI")
        console.print(f"per-instance rows, summary and plots are under {out / 'evaluate'}")
