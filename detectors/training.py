"""The training loop shared by the recipes, and the ``baseline`` recipe: plain supervised
training of a torchvision detection model.

The model follows torchvision's detection API: in train mode ``model(images, targets)``
returns a dict of losses, where images are float CHW tensors in [0, 1] and targets hold
``boxes`` (N, 4) float xyxy in image pixels and ``labels`` (N,) int64 in 1..K.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from xaibench.cache import atomic_write
from xaibench.progress import progress_bar
from xaibench.registry import RECIPES
from xaibench.types import Sample

CHECKPOINT_NAME = "last.pt"
_RESUME_FREE_FIELDS = {
    "device",
    "checkpoint_every",
    "amp",
}  # may differ between a run and its resume


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not match the run resuming from it."""

    option = "--detector"
    """The command-line option the error concerns (a detector's cached weights)."""


class BaselineConfig(BaseModel):
    """Hyper-parameters of the baseline recipe (validated once, stored with the checkpoints)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int | None = Field(1000, ge=1, description="optimizer steps; or set epochs")
    epochs: int | None = Field(None, ge=1, description="passes over the dataset")
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iterations: int = Field(100, ge=0, description="linear warm-up from lr / 1000")
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[float, ...] = Field(
        (0.75, 0.9), description="fractions of training where the step schedule multiplies by gamma"
    )
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(10.0, gt=0, description="max L2 norm of all gradients")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    seed: int = 0
    device: str | None = Field(None, description="torch device; None: cuda if available")
    checkpoint_every: int = Field(0, ge=0, description="iterations; 0: only the final one")
    amp: bool = Field(True, description="float16 autocast and loss scaling on CUDA (not CPU)")

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_iterations(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None and "iterations" not in data:
            return {**data, "iterations": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> BaselineConfig:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("BaselineConfig: set exactly one of iterations and epochs")
        return self

    def total_iterations(self, dataset_size: int) -> int:
        """Optimizer steps of the whole run on a dataset of ``dataset_size`` samples."""
        if self.iterations is not None:
            return self.iterations
        assert self.epochs is not None
        return self.epochs * math.ceil(dataset_size / self.batch_size)

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
        if self.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
        elif self.schedule == "step":
            factor = self.gamma ** sum(step >= m * total for m in self.milestones)
        else:
            factor = 1.0
        if step < self.warmup_iterations:
            alpha = step / self.warmup_iterations
            factor *= 1e-3 * (1 - alpha) + alpha
        return self.lr * factor


@dataclass
class TrainResult:
    """A finished run: optimizer steps, training wall time (s, resumed runs included) and the
    total loss of every step."""

    iterations: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


def sample_to_target(
    sample: Sample, flip: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``Sample`` as a torchvision (image, target) pair; ignore instances and boxes without
    area are dropped.

    Image: float32 (3, H, W) in [0, 1]. Target: ``boxes`` float32 (N, 4) xyxy pixels and
    ``labels`` int64 (N,). ``flip`` mirrors image and boxes horizontally.
    """
    image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float() / 255
    kept = [inst for inst in sample.instances if not inst.ignore]
    boxes = torch.tensor(np.array([inst.box for inst in kept], np.float32).reshape(-1, 4))
    labels = torch.tensor([int(inst.label) for inst in kept], dtype=torch.int64)
    if flip:
        image = image.flip(-1)
        width = image.shape[-1]
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, {"boxes": boxes[valid], "labels": labels[valid]}


def batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """Dataset indices of step ``step``: a new permutation per epoch, fixed by the arguments."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [
        int(_permutation(p // dataset_size, dataset_size, seed)[p % dataset_size])
        for p in positions
    ]


@lru_cache(maxsize=4)
def _permutation(epoch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(size)


def _flips(step: int, batch_size: int, probability: float, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, step, 1]).random(batch_size) < probability


def load_checkpoint(path: Path, hint: str = "") -> dict:
    """Read a checkpoint written by this module onto the CPU; an unreadable file raises
    ``CheckpointError`` naming it, with ``hint`` saying what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        hint = hint or "delete it to start over"
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is corrupt or incomplete "
            f"({type(exc).__name__}); {hint}"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an xaibench checkpoint (no 'model' entry)")
    check_finite(state["model"], path, hint)
    return state


def check_finite(weights: Mapping[str, Any], path: Path, hint: str = "") -> None:
    """Raise ``CheckpointError`` naming ``path`` and the entries of the state dict
    ``weights`` that hold NaN or inf (such a model detects nothing, or NaN boxes); anything
    but a mapping is left to the loader to refuse."""
    if not isinstance(weights, Mapping):
        return
    bad = [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for name, t in weights.items()
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} holds NaN or inf weights in {shown}" + (f"; {hint}" if hint else "")
        )


def _make_optimizer(model: nn.Module, config: BaselineConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: BaselineConfig,
    device: torch.device,
) -> tuple[int, list[float], float]:
    """Restore a run from ``path``; returns its step, losses so far and training seconds."""
    state = load_checkpoint(path)
    saved, current = state["config"], config.model_dump()
    changed = sorted(
        k for k in current if k not in _RESUME_FREE_FIELDS and saved.get(k) != current[k]
    )
    if changed:
        raise CheckpointError(
            f"{path} was written with a different config ({', '.join(changed)}); "
            "use another checkpoint_dir or delete the file to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state["losses"]), float(state["seconds"])


def _save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    losses: list[float],
    seconds: float,
    config: BaselineConfig,
    device: torch.device,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "losses": losses,
        "seconds": seconds,
        "config": config.model_dump(),
        "rng": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


Images = list[torch.Tensor]
"""A batch's images, each (3, H, W) float in [0, 1]."""
Targets = list[dict[str, torch.Tensor]]
"""A batch's targets, torchvision's: ``boxes`` (G, 4) x1y1x2y2 input pixels, ``labels`` (G,)."""
StepLosses = Callable[[nn.Module, Images, Targets], dict]
"""A recipe's loss terms for one batch: ``(model in train mode, images, targets)`` ->
``{name: scalar tensor}``, summed into the loss that is minimised."""


def detector_losses(model: nn.Module, images: Images, targets: Targets) -> dict[str, torch.Tensor]:
    """The detector's own training losses (torchvision's ``model(images, targets)``)."""
    return model(images, targets)


@dataclass(frozen=True)
class FitRecipe:
    """A registered recipe that trains with ``fit``, minimising the terms of
    ``losses(model, config)`` (a ``StepLosses``); ``config_type`` is its settings class.

    Called as ``recipe(model, dataset, config=None, checkpoint_dir=None, progress=True,
    log_every=0)``: trains ``model`` in place (``config`` default: ``config_type()``) and
    returns a ``TrainResult``, the model in eval mode."""

    name: str
    config_type: type[BaselineConfig]
    losses: Callable[[nn.Module, Any], StepLosses]

    def __call__(
        self,
        model: nn.Module,
        dataset: Sequence[Sample],
        config: BaselineConfig | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        log_every: int = 0,
    ) -> TrainResult:
        config = config or self.config_type()
        losses = self.losses(model, config)
        return fit(model, dataset, config, losses, self.name, checkpoint_dir, progress, log_every)


train = RECIPES.register(
    "baseline", FitRecipe("baseline", BaselineConfig, lambda model, config: detector_losses)
)
"""The ``baseline`` recipe: the detector's own losses; see ``fit`` for checkpoints, progress
and devices."""


def fit(
    model: nn.Module,
    dataset: Sequence[Sample],
    config: BaselineConfig,
    step_losses: StepLosses,
    name: str,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    log_every: int = 0,
) -> TrainResult:
    """The training loop shared by the recipes: minimise the sum of ``step_losses`` of each
    batch; ``model`` is trained in place and returned in eval mode.

    Runs on ``config.device`` (None: CUDA if available, else the CPU); on CUDA with
    ``config.amp`` the forward passes run under float16 autocast with loss scaling.
    ``progress`` shows a tqdm bar (on stderr) with each smoothed loss term and the ETA;
    ``log_every`` > 0 also writes one plain line per that many steps to stderr (step,
    smoothed loss terms, seconds), for logs without a terminal.

    With ``checkpoint_dir``, the model, optimizer, loss scaler, step and RNG state are written
    to ``checkpoint_dir/last.pt`` every ``config.checkpoint_every`` steps and at the end, and
    a run finding that file resumes from it; a resumed run ends with the same weights as an
    uninterrupted one. Data order and flips are a function of ``config.seed`` and the step;
    torch's global RNG (used inside the model, e.g. by RoI sampling) is seeded with it too.
    """
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).train()
    optimizer = _make_optimizer(model, config)
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    total = config.total_iterations(len(dataset))
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    torch.manual_seed(config.seed)
    step, losses, previous_seconds = 0, [], 0.0
    if path is not None and path.exists():
        step, losses, previous_seconds = _resume(path, model, optimizer, scaler, config, device)

    start = time.perf_counter() - previous_seconds
    smoothed: dict[str, float] = {}
    with progress_bar(total=total, initial=step, desc=name, disable=not progress) as bar:
        while step < total:
            indices = batch_indices(step, config.batch_size, len(dataset), config.seed)
            flips = _flips(step, config.batch_size, config.hflip, config.seed)
            pairs = [
                sample_to_target(dataset[i], bool(f)) for i, f in zip(indices, flips, strict=True)
            ]
            images = [image.to(device) for image, _ in pairs]
            targets = [{k: v.to(device) for k, v in target.items()} for _, target in pairs]
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, total)

            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss_dict = step_losses(model, images, targets)
                loss = sum(v.float() for v in loss_dict.values())
            if not torch.isfinite(loss):
                parts = {k: round(float(v), 4) for k, v in loss_dict.items()}
                raise FloatingPointError(f"loss is {float(loss)} at iteration {step}: {parts}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()

            step += 1
            losses.append(loss.item())
            terms = {"loss": losses[-1], **{k: float(v.detach()) for k, v in loss_dict.items()}}
            smoothed = {
                k: v if k not in smoothed else 0.95 * smoothed[k] + 0.05 * v
                for k, v in terms.items()
            }
            shown = {_short(k): f"{v:.3f}" for k, v in smoothed.items()}
            bar.set_postfix(shown, lr=f"{optimizer.param_groups[0]['lr']:.2g}")
            bar.update()
            if log_every and (step % log_every == 0 or step == total):
                elapsed = time.perf_counter() - start
                line = ", ".join(f"{k} {v}" for k, v in shown.items())
                bar.write(f"{name}: step {step}/{total}, {line}, {elapsed:.0f} s", file=sys.stderr)
            every = config.checkpoint_every
            if path is not None and (step == total or (every and step % every == 0)):
                seconds = time.perf_counter() - start
                _save(path, model, optimizer, scaler, step, losses, seconds, config, device)
    model.eval()
    return TrainResult(step, time.perf_counter() - start, losses, path)


def _short(term: str) -> str:
    """A loss term's name for the progress bar: torchvision's ``loss_`` prefix dropped."""
    return term.removeprefix("loss_") if term != "loss" else term
