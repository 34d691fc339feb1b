"""Matching a dataset's categories to a detector's classes by name.

Rules of ``label_mapping`` (dataset label -> detector label):

- names match ignoring case, spaces, ``_`` and ``-`` (``"pottedplant"`` = ``"potted plant"``,
  ``"diningtable"`` = ``"dining table"``);
- a label map renames dataset categories first (``{"sofa": "couch", "tvmonitor": "tv"}``); a
  category mapped to ``null`` is ignored on purpose (a warning names it);
- background categories (``_background_``, ``__background__``, ``background``, any case) are
  skipped;
- a name that still matches no detector class is an error listing every such name, unless
  ``unmatched="ignore"``, which warns and ignores those categories;
- a detector without class names (``class1``, ``class2``, ... at their own indices, what the
  wrappers call classes they were given no names for) takes the dataset's labels as its own,
  by index, with a warning.

Skipped and ignored categories map to ``IGNORED`` (-1), a label no detector predicts: their
instances stay in the ground truth but are never matched to a prediction.

A label map file is JSON or YAML: one object from dataset category names to detector class
names or null.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import TypeAdapter, ValidationError

IGNORED = -1
"""The detector label of dataset categories that are skipped or ignored: no class has it."""
BACKGROUND_NAMES = frozenset({"_background_", "__background__", "background"})
"""Category names (compared case-insensitively) that mean the background, never an object."""

LabelMap = Mapping[str, "str | None"]
"""Dataset category name -> detector class name, or None to ignore the category."""

_LABEL_MAP = TypeAdapter(dict[str, str | None])


class LabelMappingError(ValueError):
    """Dataset categories that match no detector class, or an unreadable label map file."""


def load_label_map(path: str | Path) -> dict[str, str | None]:
    """Read a label map file (JSON, or YAML for ``.yaml``/``.yml``): one object of dataset
    category name -> detector class name or null; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise LabelMappingError(f"label map file {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise LabelMappingError(f"label map file {path} cannot be parsed: {err}") from err
    try:
        return _LABEL_MAP.validate_python(data)
    except ValidationError as err:
        raise LabelMappingError(
            f"label map file {path} must hold one object of category name -> class name or "
            f'null, e.g. {{"sofa": "couch", "_void_": null}}: {err}'
        ) from err


def rename_categories(
    names: Sequence[str | None], label_map: LabelMap | str | Path | None
) -> list[str | None]:
    """``names`` renamed through ``label_map`` (a mapping or a file for ``load_label_map``);
    a category mapped to None becomes None (ignored by ``label_mapping``)."""
    if label_map is None:
        return list(names)
    if isinstance(label_map, str | Path):
        label_map = load_label_map(label_map)
    keys = {_key(k): v for k, v in label_map.items()}
    return [keys.get(_key(n), n) if n is not None else None for n in names]


def label_mapping(
    dataset_names: Sequence[str | None],
    detector_names: Sequence[str],
    label_map: LabelMap | str | Path | None = None,
    unmatched: Literal["error", "ignore"] = "error",
) -> dict[int, int]:
    """Dataset label -> detector label (``IGNORED`` for skipped or ignored categories), by
    the rules of the module docstring. ``dataset_names[i]`` names dataset label i (None: a
    category already ignored); ``label_map`` renames first (a mapping or a file)."""
    if unmatched not in ("error", "ignore"):
        raise ValueError(f"unmatched must be 'error' or 'ignore', got {unmatched!r}")
    if unnamed(detector_names):
        warnings.warn(
            f"the detector's classes have no names ({detector_names[-1]!r}, ...): dataset "
            "labels are taken as its labels by index; give the detector class_names to match "
            "by name",
            stacklevel=2,
        )
        return {i: i for i in range(len(dataset_names))}
    renamed = rename_categories(dataset_names, label_map)
    index: dict[str, int] = {}
    for i, name in enumerate(detector_names):
        if not is_background(name):
            index.setdefault(_key(name), i)
    mapping: dict[int, int] = {}
    ignored, missing = [], []
    for i, (original, name) in enumerate(zip(dataset_names, renamed, strict=True)):
        if name is None or is_background(name):
            mapping[i] = IGNORED
            if name is None:
                ignored.append(f"{original!r}" if original is not None else f"label {i}")
        elif _key(name) in index:
            mapping[i] = index[_key(name)]
        else:
            mapping[i] = IGNORED
            missing.append(name)
    if missing and unmatched == "error":
        raise LabelMappingError(
            f"dataset categories that match no detector class: {', '.join(map(repr, missing))}. "
            "Rename them to the detector's classes in a label map (--label-map FILE, a JSON or "
            'YAML object such as {"sofa": "couch"}; null ignores a category). Detector classes: '
            + ", ".join(n for n in detector_names if not is_background(n))
        )
    if missing:
        warnings.warn(
            f"ignoring dataset categories that match no detector class: {', '.join(missing)}",
            stacklevel=2,
        )
    if ignored:
        warnings.warn(
            f"ignoring dataset categories mapped to null: {', '.join(ignored)}", stacklevel=2
        )
    return mapping


def unnamed(detector_names: Sequence[str]) -> bool:
    """Whether every class but the background is named ``class<i>`` at its own index i."""
    return len(detector_names) > 1 and all(
        name == f"class{i}" for i, name in enumerate(detector_names) if i > 0
    )


def is_background(name: str) -> bool:
    """Whether a category name means the background (``BACKGROUND_NAMES``, any case)."""
    return name.strip().lower() in BACKGROUND_NAMES


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).casefold()
