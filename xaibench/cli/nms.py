"""``xaibench nms``: compare NMS strategies in crowds (paper Tables 5 and 7, Fig. 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from xaibench.cli.errors import typed_params, user_errors
from xaibench.cli.evaluate import scoped_params
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.crowdhuman import CrowdHumanDataset, write_crowddet_results
from xaibench.registry import DETECTORS, NMS
from xaibench.types import Sample

DEFAULT_DETECTOR = "synthetic-crowd-fcos"
DEFAULT_STRATEGIES = "nms,softnms,featurenms,odamnms"


def load_dataset(dataset: Path | None, images: Path | None) -> Any:
    """An odgt (CrowdHuman) or COCO json dataset; None: the synthetic crowd val split (odgt)."""
    if dataset is None:
        from xaibench.detectors.zoo import demo_data

        val = demo_data(mode="crowd")["val"]
        return CrowdHumanDataset(val.annotation_file.with_suffix(".odgt"), val.image_dir)
    if images is None:
        raise typer.BadParameter("--images is required with --dataset (the folder of the images)")
    if dataset.suffix == ".odgt":
        return CrowdHumanDataset(dataset, images)
    if dataset.suffix == ".json":
        return CocoDataset(dataset, images)
    raise typer.BadParameter(f"--dataset {dataset}: expected an .odgt or a COCO .json file")


def _table(frame, title: str) -> Table:
    table = Table(*[str(c) for c in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def nms(
    dataset: Path | None = typer.Option(
        None, "--dataset", help="odgt or COCO json (default: the synthetic crowd val split)"
    ),
    images: Path | None = typer.Option(None, "--images", "-i", help="folder of the images"),
    detector: str = typer.Option(DEFAULT_DETECTOR, "--detector", "-d", help="detector name"),
    strategies: str = typer.Option(
        DEFAULT_STRATEGIES, "--strategies", "-s", help="comma-separated NMS strategies"
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="strategy setting, e.g. odamnms.t_low=0.1 (repeatable)"
    ),
    label: int | None = typer.Option(
        None, "--label", help="only this class counts (default: every detection and GT)"
    ),
    max_images: int | None = typer.Option(None, "--max-images", help="the first N images"),
    sweep: bool = typer.Option(False, "--sweep", help="also draw the T_l x T_h JI heat map"),
    figure_score: float = typer.Option(
        0.3, "--figure-score", help="boxes above this score in the kept-boxes figure"
    ),
    out: Path = typer.Option(Path("outputs/nms"), "--out", "-o", help="output folder"),
    debug: bool = typer.Option(False, "--debug", help="tracebacks (also XAIBENCH_DEBUG=1)"),
) -> None:
    """Run each strategy's whole pipeline (detector included) on every image and report
    AP50 / JI / MR^-2 / seconds per image (Table 5) and recall of crowd and sparse people
    (Table 7), as CSV and Markdown; plus a figure of the boxes each strategy kept."""
    from xaibench.metrics.nms_comparison import (
        compare_strategies,
        most_crowded,
        plot_kept,
        plot_sweep,
        results_frame,
        sweep_odam_thresholds,
        table5,
        table7,
    )

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    with user_errors("--strategies", debug):
        for name in names:
            NMS.get(name)  # unknown names fail here, with the known ones
    params = scoped_params(param, "--param")
    stray = sorted(set(params) - set(names) - ({"odamnms"} if sweep else set()))
    if stray:
        raise typer.BadParameter(f"--param names {', '.join(stray)}, not in --strategies")
    params = {
        name: typed_params(NMS.get(name), settings, "--param", f"{name}.")
        for name, settings in params.items()
    }
    with user_errors("--dataset", debug):
        data = load_dataset(dataset, images)
        count = len(data) if max_images is None else min(max_images, len(data))
        if count == 0:
            raise typer.BadParameter("the dataset has no images")
        samples: list[Sample] = [data[i] for i in range(count)]
    console = Console()
    with user_errors("--detector", debug):
        model = DETECTORS.build(detector)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("strategies", total=count)
        runs = compare_strategies(
            model, samples, names, params, label, lambda d: bar.update(task, completed=d)
        )
    out.mkdir(parents=True, exist_ok=True)
    results = results_frame(runs, detector)
    results.to_csv(out / "results.csv", index=False)
    tables = {"table5": table5(results), "table7": table7(results)}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    for name, run in runs.items():
        write_crowddet_results(out / "crowddet" / f"{name}.odgt", run.records)
    console.print(_table(tables["table5"], f"Table 5 layout ({count} images)"))
    console.print(_table(tables["table7"], "Table 7 layout: recall (%) at the best-JI threshold"))
    index = most_crowded(samples)
    figure = plot_kept(samples[index], runs, index, out / "kept_boxes.png", figure_score)
    console.print(f"results: {out / 'results.csv'}, tables: {out}/table5.md, table7.md")
    console.print(f"CrowdDet result files: {out / 'crowddet'}; kept boxes: {figure}")
    if sweep:
        with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("T_l x T_h sweep", total=count)
            grid = sweep_odam_thresholds(
                model,
                samples,
                params.get("odamnms"),
                label=label,
                progress=lambda d: bar.update(task, completed=d),
            )
        grid.insert(0, "detector", detector)
        grid.to_csv(out / "sweep.csv", index=False)
        path = plot_sweep(grid, out / "sweep_ji.png", f"Odam-NMS on {detector}: best JI")
        console.print(f"sweep: {out / 'sweep.csv'}, heat map: {path}")
