"""``xaibench demo``: the main job on the embedded default.

Makes synthetic scenes, trains (first run) or loads the demo detectors, explains a few
images and prints where the outputs are.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xaibench.datasets.synthetic import generate_synthetic
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
) -> None:
    """Synthetic data -> demo detectors -> heat maps for a few images."""
    console = Console()
    split = generate_synthetic(out / "data", num_images, seed=seed, split="demo")
    console.print(f"synthetic scenes: {split.images_dir} (COCO json {split.annotation_file})")
    explainer = METHODS.build(method)
    table = Table("detector", "image", "detections", "explained", "output")
    for name in detector:
        wrapped = DETECTORS.build(name)
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
