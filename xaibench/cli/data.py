"""``xaibench data``: make the embedded synthetic datasets (COCO json, CrowdHuman odgt)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from xaibench.datasets.synthetic import generate_synthetic

app = typer.Typer(
    help="Make datasets: synthetic scenes written as COCO json (and CrowdHuman odgt).",
    add_completion=False,
    no_args_is_help=True,
)


class SceneMode(str, Enum):
    objects = "objects"
    crowd = "crowd"


class MaskFormat(str, Enum):
    rle = "rle"
    polygon = "polygon"


@app.callback()
def data() -> None:
    """Make datasets: synthetic scenes written as COCO json (and CrowdHuman odgt)."""


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="output folder (created if missing)")],
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", min=1, help="images to render")
    ] = 200,
    seed: Annotated[int, typer.Option(min=0, help="random seed; same seed, same bytes")] = 0,
    mode: Annotated[SceneMode, typer.Option(help="shapes, or crowds of persons")] = (
        SceneMode.objects
    ),
    size: Annotated[
        tuple[int, int],
        typer.Option(
            "--size", show_default=False, help="image height and width in pixels (default 160 160)"
        ),
    ] = (0, 0),
    height: Annotated[
        int, typer.Option(min=0, show_default=False, help="image height (or --size)")
    ] = 0,
    width: Annotated[
        int, typer.Option(min=0, show_default=False, help="image width (or --size)")
    ] = 0,
    split: Annotated[str, typer.Option(help="split name: images go to OUT/SPLIT/")] = "train",
    mask_format: Annotated[MaskFormat, typer.Option(help="how masks are written")] = (
        MaskFormat.rle
    ),
) -> None:
    """Render synthetic scenes into OUT (default 160 x 160 pixels)."""
    if size != (0, 0) and (height or width):
        raise typer.BadParameter("give either --size H W or --height/--width, not both")
    image_size = size if size != (0, 0) else (height or 160, width or 160)
    console = Console(stderr=True)
    columns = (TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("render", total=num_images)
        try:
            result = generate_synthetic(
                out,
                num_images,
                seed=seed,
                mode=mode.value,
                image_size=image_size,
                split=split,
                progress=lambda done: progress.update(task, completed=done),
                mask_format=mask_format.value,
            )
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    height, width = result.image_size
    typer.echo(f"wrote {num_images} {mode.value} images ({height}x{width}) to {result.images_dir}")
    typer.echo(f"COCO annotations: {result.annotation_file}")
    if result.odgt_file is not None:
        typer.echo(f"CrowdHuman odgt: {result.odgt_file}")
