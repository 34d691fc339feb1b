"""What a torchvision detector's weights are, said to the user.

- ``weights=None`` builds random weights, which detect nothing meaningful: ``warn_random``
  says so and how to give weights;
- ``weights="DEFAULT"`` loads torchvision's pretrained file from torch.hub's checkpoint
  folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``),
  downloading it first if missing; without the internet, ``pretrained`` raises a
  ``WeightsError`` naming the file, its URL and the folder to copy it into.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model_weights


class WeightsError(ValueError):
    """Pretrained weights that are not on disk and cannot be downloaded, or do not load."""

    option = "--weights"
    """The command-line option the error concerns."""


def pretrained_file(factory: Callable[..., nn.Module]) -> tuple[str, Path]:
    """(URL, local path) of the DEFAULT weights of a torchvision model builder: the file
    torch.hub looks for in ``<torch.hub.get_dir()>/checkpoints``."""
    url = get_model_weights(factory).DEFAULT.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return url, folder / os.path.basename(urlparse(url).path)


def pretrained(factory: Callable[..., nn.Module], name: str, **kwargs: Any) -> nn.Module:
    """``factory(weights="DEFAULT", **kwargs)``; a missing file that cannot be downloaded, or
    a file that does not load, raises ``WeightsError`` saying which file and where."""
    url, path = pretrained_file(factory)
    try:
        return factory(weights="DEFAULT", **kwargs)
    except URLError as err:
        raise WeightsError(
            f"{name} --weights DEFAULT: {path.name} is not in {path.parent} and cannot be "
            f"downloaded ({err.reason}); copy {url} into {path.parent} (the folder follows "
            "$TORCH_HOME), or give a checkpoint file with --weights PATH"
        ) from err
    except Exception as err:
        if isinstance(err, TypeError) or not path.is_file():  # not about the file
            raise
        raise WeightsError(
            f"{name} --weights DEFAULT: {path} cannot be loaded ({' '.join(str(err).split())}); "
            f"delete it and copy {url} there again, or give --weights PATH"
        ) from err


def warn_random(name: str) -> None:
    """Warn that detector ``name`` was built with random weights and how to give some."""
    warnings.warn(
        f"{name} has random weights (none given): its detections mean nothing. Give "
        "torchvision's pretrained COCO weights with --weights DEFAULT (weights='DEFAULT' in "
        "Python) or a checkpoint with --weights PATH",
        stacklevel=3,
    )
