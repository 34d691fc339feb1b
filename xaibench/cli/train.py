"""``xaibench train``: train a detector with a registered recipe (``baseline``,
``odam-train``, ...), with checkpoints, resuming, progress and a closing validation AP50."""

from __future__ import annotations

import json
import time
import typing
from pathlib import Path
from typing import Any

import torch
import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from torch import nn

from xaibench.cli.errors import user_errors
from xaibench.cli.explain import parse_params
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.crowdhuman import CrowdHumanDataset, CrowdRecord
from xaibench.registry import DETECTORS, RECIPES

SYNTHETIC = {"synthetic": "objects", "synthetic-crowd": "crowd"}
"""``--dataset`` names of the synthetic splits the demo detectors train on (mode)."""


def load_split(dataset: str, images: Path | None, split: str) -> Any:
    """A training or validation set: ``synthetic`` / ``synthetic-crowd`` (the demo
    detectors' split ``split``), or a COCO .json or CrowdHuman .odgt file with ``images``."""
    if dataset in SYNTHETIC:
        from xaibench.detectors.zoo import demo_data

        data = demo_data(mode=SYNTHETIC[dataset])[split]
        if dataset == "synthetic-crowd":
            return CrowdHumanDataset(data.annotation_file.with_suffix(".odgt"), data.image_dir)
        return data
    path = Path(dataset)
    option = "--dataset" if split == "train" else "--val-dataset"
    if images is None:
        raise typer.BadParameter(f"{option} {path} needs the folder of its images (--images)")
    if path.suffix == ".odgt":
        return CrowdHumanDataset(path, images)
    if path.suffix == ".json":
        return CocoDataset(path, images)
    raise typer.BadParameter(
        f"{option} {path}: expected a COCO .json, a CrowdHuman .odgt, "
        f"or one of {', '.join(SYNTHETIC)}"
    )


def config_class(recipe: Any, name: str) -> type[BaseModel]:
    """The pydantic config class of a recipe ``(model, dataset, config, checkpoint_dir,
    progress, log_every)``: its ``config_type`` (a ``FitRecipe``), else read from its type
    hints; recipes of another shape are refused."""
    if isinstance(getattr(recipe, "config_type", None), type):
        return recipe.config_type
    hints = typing.get_type_hints(recipe)
    first = next(iter(hints.values()), None)
    config = hints.get("config")
    classes = [c for c in typing.get_args(config) or (config,) if isinstance(c, type)]
    models = [c for c in classes if issubclass(c, BaseModel)]
    if first is not nn.Module or not models:
        raise typer.BadParameter(
            f"recipe {name!r} does not train a detector module (it is not "
            "recipe(model, dataset, config, checkpoint_dir, progress, log_every))"
        )
    return models[0]


def read_config_file(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML file's ``config`` (recipe settings) and ``detector_params`` sections."""
    if path is None:
        return {}, {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"--config {path}: cannot read it ({err})") from err
    if not isinstance(data, dict):
        raise typer.BadParameter(
            f"--config {path}: expected a mapping of sections config, detector_params (and "
            f"description); got a {type(data).__name__}"
        )
    stray = sorted(map(str, set(data) - {"config", "detector_params", "description"}))
    if stray:
        raise typer.BadParameter(
            f"--config {path}: expected sections config, detector_params (and description); "
            f"got {', '.join(stray)}"
        )
    return dict(data.get("config") or {}), dict(data.get("detector_params") or {})


def validation_ap50(detector: Any, data: Any, batch_size: int = 8) -> float:
    """AP50 of ``detector`` on ``data``: COCO's (pycocotools) for a COCO set, CrowdHuman's
    (fbox, ignore regions) for an odgt set."""
    detections = detector.detect([data[i].image for i in range(len(data))], batch_size)
    if isinstance(data, CrowdHumanDataset):
        from xaibench.metrics.crowd import evaluate_crowd

        records = [
            CrowdRecord.from_sample(data[i], d.boxes.cpu().numpy(), d.scores.cpu().numpy(), 1)
            for i, d in enumerate(detections)
        ]
        return float(evaluate_crowd(records).ap50)
    from xaibench.coco_eval import evaluate_coco

    return float(evaluate_coco(detections, data)["AP50"])


def train(
    recipe: str = typer.Argument(..., help="registered training recipe, e.g. odam-train"),
    detector: str = typer.Option(
        "small-fcos", "--detector", "-d", help="registered detector architecture to train"
    ),
    detector_param: list[str] = typer.Option(
        [], "--detector-param", help="builder setting key=value, e.g. image_size=320 (repeatable)"
    ),
    dataset: str = typer.Option(
        "synthetic", "--dataset", help="COCO .json, CrowdHuman .odgt, synthetic, synthetic-crowd"
    ),
    images: Path | None = typer.Option(None, "--images", "-i", help="folder of its images"),
    val_dataset: str | None = typer.Option(
        None, "--val-dataset", help="validation set (default: the synthetic val split)"
    ),
    val_images: Path | None = typer.Option(None, "--val-images", help="its images' folder"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML with config: and detector_params: sections"
    ),
    setting: list[str] = typer.Option(
        [], "--set", "-s", help="recipe setting key=value, e.g. iterations=500 (repeatable)"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", min=1, help="write a checkpoint every N steps"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoints/last.pt"),
    device: str | None = typer.Option(None, "--device", help="torch device (default: cuda if any)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
    out: Path = typer.Option(Path("outputs/train"), "--out", "-o", help="output folder"),
    debug: bool = typer.Option(False, "--debug", help="tracebacks (also XAIBENCH_DEBUG=1)"),
) -> None:
    """Train ``--detector`` with RECIPE on ``--dataset`` (default: the synthetic training
    split), checkpointing into OUT/checkpoints; write OUT/weights.pt (load it with
    ``--detector-param weights=OUT/weights.pt``) and OUT/info.json with the validation AP50."""
    console = Console(stderr=True)
    with user_errors("RECIPE", debug):
        fn = RECIPES.get(recipe)
    config_type = config_class(fn, recipe)
    file_config, file_params = read_config_file(config)
    overrides = parse_params(setting)
    values = {**file_config, **overrides}
    if checkpoint_every is not None:
        values["checkpoint_every"] = checkpoint_every
    if device is not None:
        values["device"] = device
    try:
        settings = config_type(**values)
    except ValidationError as err:
        raise typer.BadParameter(f"recipe {recipe!r} settings (--config / --set): {err}") from err

    checkpoints = out / "checkpoints"
    last = checkpoints / "last.pt"
    if last.exists() and not resume:
        raise typer.BadParameter(
            f"{last} exists: pass --resume to continue that run, or choose another --out"
        )
    if resume and not last.exists():
        raise typer.BadParameter(f"--resume: there is no checkpoint {last} to resume from")

    if val_dataset is None and dataset not in SYNTHETIC:
        raise typer.BadParameter(f"--dataset {dataset} needs a --val-dataset for the AP50")
    with user_errors("--dataset", debug):
        train_data = load_training_data(dataset, images)
    with user_errors("--val-dataset" if val_dataset else "--dataset", debug):
        val_data = load_split(val_dataset or dataset, val_images, "val")
    class_names = list(train_data.class_names)
    params = {**file_params, **parse_params(detector_param)}
    with user_errors("--detector", debug):
        DETECTORS.get(detector)  # an unknown name lists the known ones
    try:
        model = DETECTORS.build(detector, class_names=class_names, **params).torch_module()
    except TypeError as err:
        raise typer.BadParameter(
            f"--detector {detector}: cannot build it untrained for {len(class_names) - 1} "
            f"classes with {sorted(params) or 'no settings'} ({err})"
        ) from err

    console.print(
        f"xaibench train: {recipe} on {detector}, {len(train_data)} images, "
        f"{settings.total_iterations(len(train_data))} steps; checkpoints in {checkpoints}"
    )
    result = fn(model, train_data, settings, checkpoints, progress, 0 if progress else 50)
    weights = out / "weights.pt"
    torch.save({"model": model.state_dict()}, weights)
    trained = DETECTORS.build(
        detector, class_names=class_names, **{**params, "weights": str(weights)}
    )
    started = time.perf_counter()
    ap50 = validation_ap50(trained, val_data)
    info = {
        "recipe": recipe,
        "detector": detector,
        "detector_params": params,
        "dataset": dataset,
        "config": settings.model_dump(),
        "iterations": result.iterations,
        "train_seconds": result.seconds,
        "final_loss": result.losses[-1] if result.losses else None,
        "val": {"dataset": val_dataset or dataset, "images": len(val_data), "AP50": ap50},
        "val_seconds": time.perf_counter() - started,
        "weights": str(weights),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    console.print(
        f"trained in {result.seconds:.0f} s ({result.iterations} steps); validation AP50 "
        f"{ap50:.3f} on {len(val_data)} images; weights {weights}, summary {out / 'info.json'}"
    )


def load_training_data(dataset: str, images: Path | None) -> Any:
    """The training set named by ``--dataset`` (see ``load_split``)."""
    return load_split(dataset, images, "train")
