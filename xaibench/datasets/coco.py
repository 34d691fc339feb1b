"""COCO-format detection datasets (real COCO, or anything written in its json format).

Boxes come out xyxy in original-image pixels (COCO's ``bbox`` field is xywh); labels are
contiguous, 1..K in increasing category-id order (0 is the background, torchvision's
convention); masks are (H, W) bool, decoded from polygons or RLE by pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from xaibench.images import check_detectable, load_image
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

    Checks, each naming the file, the id and the field:

    - errors: a missing field, a ``bbox`` that is not four finite numbers, an ``image_id`` or
      ``category_id`` naming nothing, an annotation or image id used twice (pycocotools would
      silently keep one of them), an RLE ``segmentation`` whose ``size`` is not the image's
      [height, width] or whose uncompressed ``counts`` do not sum to height x width, and
      (per image, when read) an image file whose size differs from the json or that
      ``check_detectable`` refuses (a side under 8 px, an aspect ratio above 20);
    - warning and skip: a box with zero or negative width or height, a box entirely outside
      its image;
    - warning and clip: a box reaching more than 1 px outside its image is clipped to the
      image (within 1 px it is clipped silently: rounding).
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
        self._skip_outside(data["annotations"])

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
        check_detectable(image, f"image file {path} (image id {image_id})")
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
        info = self.coco.imgs[ann["image_id"]]
        box = np.clip([x, y, x + w, y + h], 0, [info["width"], info["height"]] * 2)
        return Instance(
            box=box.astype(np.float32),
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
        for image in data["images"]:
            for name in ("width", "height"):
                value = image[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise AnnotationError(
                        f"{where}: image id {image['id']} field {name!r} must be a positive "
                        f"integer, got {value!r}"
                    )
        _refuse_repeated_ids(where, "images", data["images"])
        _refuse_repeated_ids(where, "annotations", data["annotations"])
        images = {image["id"]: image for image in data["images"]}
        category_ids = {cat["id"] for cat in data["categories"]}
        for ann in data["annotations"]:
            bbox = ann["bbox"]
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
            ):
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'bbox' must be [x, y, w, h] "
                    f"of finite numbers, got {bbox!r}"
                )
            if ann["image_id"] not in images:
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'image_id' = {ann['image_id']} "
                    "names no entry of 'images'"
                )
            if ann["category_id"] not in category_ids:
                raise AnnotationError(
                    f"{where}: annotation id {ann['id']} field 'category_id' = "
                    f"{ann['category_id']} names no entry of 'categories'"
                )
            _check_rle(where, ann, images[ann["image_id"]])

    def _skip_outside(self, annotations: list[dict[str, Any]]) -> None:
        """Skip boxes entirely outside their image, warn of those reaching beyond it by more
        than 1 px (``_instance`` clips every box to its image)."""
        outside, beyond = [], []
        for ann in annotations:
            if ann["id"] in self._degenerate:
                continue
            x, y, w, h = ann["bbox"]
            info = self.coco.imgs[ann["image_id"]]
            width, height = info["width"], info["height"]
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                outside.append(ann["id"])
            elif min(x, y) < -1 or x + w > width + 1 or y + h > height + 1:
                beyond.append(ann["id"])
        self._degenerate |= set(outside)
        for ids, what in ((outside, "skipping"), (beyond, "clipping to the image")):
            if ids:
                warnings.warn(
                    f"{self.annotation_file}: {what} {len(ids)} annotation(s) whose 'bbox' "
                    f"lies {'entirely' if ids is outside else 'partly'} outside its image "
                    f"(width/height of its 'images' entry), annotation id(s) {_shown(ids)}",
                    stacklevel=3,
                )

    def _skip_degenerate(self, annotations: list[dict[str, Any]]) -> None:
        self._degenerate = {a["id"] for a in annotations if a["bbox"][2] <= 0 or a["bbox"][3] <= 0}
        if self._degenerate:
            ids = sorted(self._degenerate)
            warnings.warn(
                f"{self.annotation_file}: skipping {len(ids)} annotation(s) with zero or "
                f"negative box width/height, annotation id(s) {_shown(ids)}",
                stacklevel=3,
            )


def _shown(ids: list[Any]) -> str:
    """The first 20 ids, comma-separated."""
    return ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")


def _refuse_repeated_ids(where: Path, key: str, records: list[dict[str, Any]]) -> None:
    """An id used twice in ``data[key]`` is an error naming it (and, for annotations, the
    images of its entries)."""
    seen: dict[Any, dict[str, Any]] = {}
    for record in records:
        first = seen.setdefault(record["id"], record)
        if first is not record:
            images = (
                f" (image ids {first['image_id']} and {record['image_id']})"
                if key == "annotations"
                else ""
            )
            raise AnnotationError(
                f"{where}: {key} id {record['id']} appears more than once{images}; ids must "
                "be unique"
            )


def _check_rle(where: Path, ann: dict[str, Any], image: dict[str, Any]) -> None:
    """An RLE ``segmentation`` must have the image's [height, width] as ``size`` and, when
    uncompressed, ``counts`` summing to height x width."""
    rle = ann.get("segmentation")
    if not isinstance(rle, dict):
        return
    size, counts = rle.get("size"), rle.get("counts")
    expected = [image["height"], image["width"]]
    if size != expected:
        raise AnnotationError(
            f"{where}: annotation id {ann['id']} field 'segmentation.size' = {size!r}, "
            f"expected its image's [height, width] = {expected} (image id {ann['image_id']})"
        )
    if isinstance(counts, list) and not all(isinstance(c, int) and c >= 0 for c in counts):
        raise AnnotationError(
            f"{where}: annotation id {ann['id']} field 'segmentation.counts' must be "
            "non-negative integers (or a compressed RLE string)"
        )
    if isinstance(counts, list) and sum(counts) != expected[0] * expected[1]:
        raise AnnotationError(
            f"{where}: annotation id {ann['id']} field 'segmentation.counts' sums to "
            f"{sum(counts)}, expected height x width = {expected[0] * expected[1]} "
            f"(image id {ann['image_id']})"
        )
