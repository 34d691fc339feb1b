"""Small detectors built from torchvision parts, and the demo detectors trained on synthetic scenes.

``build_small_fcos`` / ``build_small_frcnn`` return plain torchvision ``FCOS`` / ``FasterRCNN``
models over a small ResNet-like body with an FPN (levels "0", "1", "2", "pool" at strides
8, 16, 32, 64 px), sized for 160 x 160 px images with objects of 12-80 px.

The registered demo detectors ``synthetic-fcos`` and ``synthetic-frcnn`` are trained on first
use with the ``baseline`` recipe on synthetic ``objects`` scenes and cached under
``<cache>/detectors/<name>/`` (``weights.pt`` and ``info.json`` with the validation AP).
``small-fcos`` and ``small-frcnn`` register the same architectures untrained, or with the
weights ``xaibench train`` wrote.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation
from xaibench.detectors.odam_train import OdamTrainConfig
from xaibench.detectors.torchvision import load_checkpoint as load_weights_file
from xaibench.detectors.torchvision import wrap
from xaibench.detectors.training import BaselineConfig, CheckpointError, load_checkpoint

import xaibench
from xaibench import cache
from xaibench.coco_eval import evaluate_coco
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import CLASS_NAMES, CROWD_CLASS_NAMES, load_synthetic
from xaibench.detector import Detector
from xaibench.progress import say
from xaibench.registry import DETECTORS, RECIPES

WIDTHS = (16, 32, 64, 96, 128)
"""Channels of the stem (stride 2) and of the four stages (strides 4, 8, 16, 32)."""
FPN_CHANNELS = 64
"""FPN width; a multiple of 32 because FCOS's head uses GroupNorm(32)."""


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """One residual BasicBlock that halves the resolution."""
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
    )
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride=2, downsample=downsample))


def small_backbone(
    widths: tuple[int, ...] = WIDTHS, fpn_channels: int = FPN_CHANNELS
) -> BackboneWithFPN:
    """A ResNet-like body (strides 2-32) with an FPN on strides 8, 16, 32 (+ max-pool, 64)."""
    stem, *stages = widths
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=Conv2dNormActivation(3, stem, stride=2))
    for i, (cin, cout) in enumerate(zip(widths[:-1], stages, strict=True), start=1):
        layers[f"layer{i}"] = _stage(cin, cout)
    return BackboneWithFPN(
        nn.Sequential(layers),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=list(widths[2:]),
        out_channels=fpn_channels,
    )


def build_small_fcos(
    num_classes: int, image_size: int = 160, head_convs: int = 2, **backbone: Any
) -> FCOS:
    """A small FCOS for ``image_size`` px images; ``num_classes`` includes the background;
    ``backbone``: ``small_backbone``'s ``widths`` and ``fpn_channels``.

    Anchor sizes are half the strides and the centre-sampling radius is doubled, so objects
    reaching up to 32 px from a location go to stride 8, up to 64 px to stride 16, with the
    usual sampling radius of 1.5 strides.
    """
    body = small_backbone(**backbone)
    anchors = AnchorGenerator(((4,), (8,), (16,), (32,)), ((1.0,),) * 4)
    return FCOS(
        body,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        anchor_generator=anchors,
        head=FCOSHead(body.out_channels, 1, num_classes, num_convs=head_convs),
        center_sampling_radius=3.0,
        score_thresh=0.05,
    )


def build_small_frcnn(
    num_classes: int, image_size: int = 160, representation: int = 256, **backbone: Any
) -> FasterRCNN:
    """A small Faster R-CNN for ``image_size`` px images; ``num_classes`` includes the
    background; ``representation`` is the width of the box head's two fully connected layers;
    ``backbone``: ``small_backbone``'s ``widths`` and ``fpn_channels``."""
    body = small_backbone(**backbone)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    roi_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=1)
    return FasterRCNN(
        body,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(body.out_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_batch_size_per_image=64,
    )


# ---------------------------------------------------------------------------------------------
# Demo detectors

DEMO_CLASS_NAMES = ["__background__", *CLASS_NAMES]
DEMO_DATA = {"train": (2000, 0), "val": (500, 1)}
"""Synthetic ``objects`` splits (160 x 160 px) of the demo detectors: (images, seed)."""
CROWD_DEMO_CLASS_NAMES = ["__background__", *CROWD_CLASS_NAMES]
CROWD_DEMO_DATA = {"train": (2000, 0), "val": (200, 1)}
"""Synthetic ``crowd`` splits (160 x 160 px) of the crowd demo detectors: (images, seed)."""


@dataclass(frozen=True)
class DemoSpec:
    """How a demo detector is built (torch seed ``model_seed``) and trained (with the
    registered recipe ``recipe`` and its ``config``)."""

    build: Callable[[int], nn.Module]
    config: BaselineConfig
    model_seed: int = 0
    mode: str = "objects"
    recipe: str = "baseline"
    about: str = "A demo detector"

    @property
    def class_names(self) -> list[str]:
        return DEMO_CLASS_NAMES if self.mode == "objects" else CROWD_DEMO_CLASS_NAMES

    @property
    def splits(self) -> dict[str, tuple[int, int]]:
        return DEMO_DATA if self.mode == "objects" else CROWD_DEMO_DATA


ODAM_TRAIN_ITERATIONS = {"objects": 2500, "crowd": 1250}
"""Steps of the Odam-Train demo detectors (half the baselines')."""
_ADAMW = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 4}
DEMOS: dict[str, DemoSpec] = {
    "synthetic-fcos": DemoSpec(
        build_small_fcos,
        BaselineConfig(iterations=5000, **_ADAMW),
        about=(
            "Small FCOS trained from scratch on synthetic shapes (circle, square, triangle): about "
            "6 minutes on two CPU cores, val AP50 about 0.95"
        ),
    ),
    "synthetic-frcnn": DemoSpec(
        build_small_frcnn,
        BaselineConfig(iterations=3000, **_ADAMW),
        about=(
            "Small Faster R-CNN trained from scratch on synthetic shapes (circle, square, "
            "triangle): about 5.5 minutes on two CPU cores, val AP50 about 0.95"
        ),
    ),
}


def _crowd(base: DemoSpec, about: str) -> DemoSpec:
    """``base``'s architecture and recipe on the synthetic crowd split, for half its
    iterations (a crowd iteration costs 1.0-1.1 times an objects one)."""
    config = base.config.model_copy(update={"iterations": base.config.iterations // 2})
    return replace(base, config=config, mode="crowd", about=about)


_FOR_NMS = (
    "trained from scratch on synthetic crowds (one class, person), for comparing NMS strategies"
)
CROWD_DEMOS: dict[str, DemoSpec] = {
    "synthetic-crowd-fcos": _crowd(DEMOS["synthetic-fcos"], f"Small FCOS {_FOR_NMS}"),
    "synthetic-crowd-frcnn": _crowd(DEMOS["synthetic-frcnn"], f"Small Faster R-CNN {_FOR_NMS}"),
}
"""The crowd demo detectors (one class, person), trained on the synthetic crowd split."""


def _odam_trained(base: DemoSpec, about: str) -> DemoSpec:
    """``base`` (same architecture, initial weights and data) trained with ``odam-train`` for
    ``ODAM_TRAIN_ITERATIONS`` steps instead."""
    config = OdamTrainConfig(iterations=ODAM_TRAIN_ITERATIONS[base.mode], **_ADAMW)
    return replace(base, config=config, recipe="odam-train", about=about)


ODAM_TRAIN_DEMOS: dict[str, DemoSpec] = {
    "synthetic-fcos-odamtrain": _odam_trained(
        DEMOS["synthetic-fcos"],
        "``synthetic-fcos``'s architecture, initial weights and data, trained with Odam-Train "
        "(``odam-train``, weight 0.5)",
    ),
    "synthetic-crowd-fcos-odamtrain": _odam_trained(
        CROWD_DEMOS["synthetic-crowd-fcos"],
        "``synthetic-crowd-fcos`` trained with Odam-Train instead (for Odam-NMS with and "
        "without Odam-Train)",
    ),
}
"""The demo FCOS of each synthetic split trained with ``odam-train`` (reference weight 0.5)
instead of ``baseline``, from the same initial weights and data, for comparing heat maps and
Odam-NMS with and without Odam-Train; fewer steps than the baselines so that each trains in
at most 10 CPU minutes (an Odam-Train step costs about twice a baseline one)."""


def demo_data(cache_dir: str | Path | None = None, mode: str = "objects") -> dict[str, CocoDataset]:
    """The demo detectors' synthetic splits (``"train"``, ``"val"``), generated if missing;
    ``mode="crowd"``: the crowd demo detectors' splits (CrowdHuman odgt beside the COCO json)."""
    root = Path(cache_dir) if cache_dir is not None else cache.cache_dir()
    folder, splits = ("demo", DEMO_DATA) if mode == "objects" else ("demo-crowd", CROWD_DEMO_DATA)
    return {
        split: load_synthetic(
            root / "synthetic" / folder, num_images=n, seed=seed, mode=mode, split=split
        )
        for split, (n, seed) in splits.items()
    }


def load_demo(
    name: str,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> Detector:
    """Demo detector ``name`` with cached weights; trains and validates it first if needed.

    The weights live in ``<cache_dir>/detectors/<name>/weights.pt`` beside ``info.json`` (val
    AP, training time, config, versions); the default cache is ``xaibench.cache.cache_dir()``.
    An interrupted training run resumes from its checkpoint; ``retrain=True`` discards all of
    them and trains from scratch. ``device`` is where it trains and runs (None: CUDA if
    available); ``progress`` shows the training progress bar.
    """
    spec = {**DEMOS, **CROWD_DEMOS, **ODAM_TRAIN_DEMOS}[name]
    root = Path(cache_dir) if cache_dir is not None else cache.cache_dir()
    weights = root / "detectors" / name / "weights.pt"
    if retrain:
        shutil.rmtree(weights.parent, ignore_errors=True)
    torch.manual_seed(spec.model_seed)
    model = spec.build(len(spec.class_names))
    if weights.exists():
        _load_weights(model, weights)
        return wrap(model, spec.class_names, name, device)
    return _train_demo(name, spec, model, root, device, progress)


def _load_weights(model: nn.Module, path: Path) -> None:
    hint = "train it again with --detector-param retrain=true (retrain=True in Python)"
    state = load_checkpoint(path, hint=hint)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the current model ({exc}); {hint}") from exc


def _train_demo(
    name: str,
    spec: DemoSpec,
    model: nn.Module,
    root: Path,
    device: str | torch.device | None,
    progress: bool,
) -> Detector:
    """Train, validate and cache a demo detector; the files appear only when all succeeded."""
    folder = root / "detectors" / name
    config = spec.config
    steps = config.total_iterations(spec.splits["train"][0])
    say(
        f"xaibench: training the demo detector {name} on first use ({steps} steps on synthetic "
        f"scenes, minutes on a CPU; an interrupted run resumes); it will be cached in {folder}"
    )
    data = demo_data(root, spec.mode)
    if device is not None:
        config = config.model_copy(update={"device": str(device)})
    checkpoints = folder / "checkpoints"
    log_every = 0 if progress else max(1, steps // 10)
    recipe = RECIPES.get(spec.recipe)
    result = recipe(model, data["train"], config, checkpoints, progress, log_every)
    detector = wrap(model, spec.class_names, name, device)
    val = data["val"]
    started = time.perf_counter()
    metrics = evaluate_coco(detector.detect([val[i].image for i in range(len(val))]), val)
    info = {
        "name": name,
        "recipe": spec.recipe,
        "val": {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"]},
        "val_seconds": time.perf_counter() - started,
        "train_seconds": result.seconds,
        "train_final_loss": statistics.fmean(result.losses[-50:]),
        "config": config.model_dump(),
        "data": {split: {"images": n, "seed": seed} for split, (n, seed) in spec.splits.items()},
        "model_seed": spec.model_seed,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "xaibench": xaibench.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with cache.atomic_write(folder / "info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    with cache.atomic_write(folder / "weights.pt") as tmp:
        torch.save({"model": model.state_dict()}, tmp)
    shutil.rmtree(folder / "checkpoints")
    say(
        f"xaibench: {name} trained in {result.seconds:.0f} s (val AP50 {metrics['AP50']:.3f}), "
        f"cached in {folder}"
    )
    return detector


def _small_builder(build: Callable[..., nn.Module], name: str) -> Callable[..., Detector]:
    def builder(
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        weights: str | Path | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        **model_kwargs: Any,
    ) -> Detector:
        """The demo detectors' architecture, untrained (torch seed ``seed``) or with a
        checkpoint ``weights`` (a state dict, or a dict holding one under "model", such as
        ``xaibench train`` writes); ``num_classes`` includes the background (default
        ``len(class_names)``, else 4); ``model_kwargs`` go to the builder (``image_size``,
        ``widths``, ``fpn_channels``, ...)."""
        if num_classes is None:
            num_classes = len(class_names) if class_names is not None else 4
        if "widths" in model_kwargs:
            model_kwargs["widths"] = tuple(model_kwargs["widths"])
        torch.manual_seed(seed)
        model = build(num_classes, **model_kwargs)
        if weights is not None:
            load_weights_file(model, Path(weights))
        return wrap(model, class_names, name, device)

    builder.__name__ = f"build_{name.replace('-', '_')}"
    return builder


def _demo_builder(name: str, spec: DemoSpec) -> Callable[..., Detector]:
    def build(
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        retrain: bool = False,
        progress: bool = True,
    ) -> Detector:
        return load_demo(name, cache_dir, device, retrain, progress)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = (
        f"{spec.about}. Trained on first use and cached in ``<cache_dir>/detectors/{name}/``; "
        "see ``load_demo`` for the arguments."
    )
    return build


for _name, _spec in {**DEMOS, **CROWD_DEMOS, **ODAM_TRAIN_DEMOS}.items():
    DETECTORS.register(_name, _demo_builder(_name, _spec))
DETECTORS.register("small-fcos", _small_builder(build_small_fcos, "small-fcos"))
DETECTORS.register("small-frcnn", _small_builder(build_small_frcnn, "small-frcnn"))
