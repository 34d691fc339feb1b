"""COCO-format detection datasets (real COCO, or anything written in its json format).

Boxes come out xyxy in original-image pixels (COCO's ``bbox`` field is xywh); labels are
contiguous, 1..K in increasing category-id order (0 is the background, torchvision's
convention); masks are (H, W) bool, decoded from polygons or RLE by pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from xaibench.images import load_image
from xaibench.registry import DATASETS
from xaibench.types import Instance, Sample


class AnnotationError(ValueError):
    """An annotation file is missing, not valid json, or lacks a field it needs."""


def read_json(path: Path) -> Any:
    """Parse the json file ``path``; errors name the file and the position."""
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"annotation file {path} is not valid json: {err}") from err


@DATASETS.register("coco")
class CocoDataset:
    """A COCO json file plus the folder its ``file_name``s are relative to.

    ``dataset[i]`` is a ``Sample`` (uint8 RGB image, instances with xyxy boxes in original
    pixels, contiguous labels, bool masks, ``ignore`` = iscrowd, ``id`` = annotation id).
    Annotations with a non-positive box width or height are skipped with a warning.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        data = read_json(self.annotation_file)
        self._validate(data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        category_ids = sorted(self.coco.cats)
        self._label_of = {cat_id: i + 1 for i, cat_id in enumerate(category_ids)}
        self._category_of = dict(enumerate(category_ids, start=1))
        self.class_names: list[str] = ["__background__"] + [
            str(self.coco.cats[c]["name"]) for c in category_ids
        ]
        self.image_ids: list[int] = [int(image["id"]) for image in data["images"]]
        self._skip_degenerate(data["annotations"])

    @property
    def num_classes(self) -> int:
        """Number of classes including the background (len(class_names))."""
        return len(self.class_names)

    def category_id_for_label(self, label: int) -> int:
        """The COCO category id of contiguous label ``label`` (1..K), for writing results."""
        if label not in self._category_of:
            raise ValueError(f"label must be in 1..{len(self._category_of)}, got {label}")
        return self._category_of[label]

    def label_for_category_id(self, category_id: int) -> int:
        """The contiguous label (1..K) of COCO category ``category_id``."""
        if category_id not in self._label_of:
            raise ValueError(
                f"category_id {category_id} is not in {self.annotation_file} "
                f"(known: {sorted(self._label_of)})"
            )
        return self._label_of[category_id]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image file {path} (file_name of image id {image_id} in "
                f"{self.annotation_file}) does not exist"
            )
        image = load_image(path)
        expected = (int(info["height"]), int(info["width"]))
        if image.shape[:2] != expected:
            raise ValueError(
                f"image file {path} is {image.shape[0]}x{image.shape[1]} (HxW) but "
                f"{self.annotation_file} says height={expected[0]}, width={expected[1]}"
            )
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        instances = [self._instance(ann) for ann in anns if ann["id"] not in self._degenerate]
        return Sample(image=image, image_id=image_id, instances=instances, file_name=path.name)

    def _instance(self, ann: dict[str, Any]) -> Instance:
        x, y, w, h = (float(v) for v in ann["bbox"])
        visible = ann.get("vbox")
        return Instance(
            box=np.array([x, y, x + w, y + h], dtype=np.float32),
            label=self._label_of[ann["category_id"]],
            mask=self._mask(ann),
            ignore=bool(ann.get("iscrowd", 0)),
            id=ann["id"],
            visible_box=None
            if visible is None
            else np.array(
                [visible[0], visible[1], visible[0] + visible[2], visible[1] + visible[3]],
                dtype=np.float32,
            ),
        )

    def _mask(self, ann: dict[str, Any]) -> np.ndarray | None:
        """The (H, W) bool mask of ``ann``; None when it has no segmentation."""
        if not ann.get("segmentation"):
            return None
        try:
            return self.coco.annToMask(ann).astype(bool)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise AnnotationError(
                f"{self.annotation_file}: annotation id {ann['id']} has a malformed "
                f"'segmentation' (expected polygons or RLE): {err}"
            ) from err

    def _validate(self, data: Any) -> None:
        """Check the fields this loader relies on; errors name the file and the field."""
        where = self.annotation_file
        if not isinstance(data, dict):
            raise AnnotationError(f"{where}: expected a json object at the top level")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise AnnotationError(f"{where}: missing or non-list field {key!r}")
        required = {
            "images": ("id", "file_name", "width", "height"),
            "annotations": ("id", "image_id", "category_id", "bbox"),
            "categories": ("id", "name"),
        }
        for key, names in required.items():
            for i, record in enumerate(data[key]):
                missing = [n for n in names if not isinstance(record, dict) or n not in record]
                if missing:
                    raise AnnotationError(f"{where}: {key}[{i}] lacks field(s) {missing}")
        image_ids = {image["id"] for image in data["images"]}
        category_ids = {cat["id"] for cat in data["categories"]}
        for ann in data["annotations"]:
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'bbox' must be [x, y, w, h], "
                    f"got {bbox!r}"
                )
            if ann["image_id"] not in image_ids:
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'image_id' = {ann['image_id']} "
                    "names no entry of 'images'"
                )
            if ann["category_id"] not in category_ids:
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'category_id' = "
                    f"{ann['category_id']} names no entry of 'categories'"
                )

    def _skip_degenerate(self, annotations: list[dict[str, Any]]) -> None:
        self._degenerate = {a["id"] for a in annotations if a["bbox"][2] <= 0 or a["bbox"][3] <= 0}
        if self._degenerate:
            ids = sorted(self._degenerate)
            shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
            warnings.warn(
                f"{self.annotation_file}: skipping {len(ids)} annotation(s) with zero or "
                f"negative box width/height, annotation id(s) {shown}",
                stacklevel=3,
            )
