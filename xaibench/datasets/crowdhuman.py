"""CrowdHuman annotations (``.odgt``: one json object per line) as ``Sample``s.

Each line is ``{"ID": ..., "gtboxes": [{"tag", "fbox", "vbox", "hbox", "extra"}, ...]}`` with
boxes xywh in pixels. Following the CrowdDet evaluation, instances use the full-body box
(``fbox``, may extend beyond the image), converted to xyxy; a box is ignored when its tag is
not ``"person"`` or ``extra.ignore != 0``.

Checks, each naming the file, the line, the ID and the field: errors for a line that is not
json, an ``ID`` used twice, an ``fbox``/``vbox``/``hbox`` that is not four finite numbers, and
(when read) an image that ``check_detectable`` refuses; warning and skip for an fbox with
zero or negative width or height and for one entirely outside its image. An fbox partly
outside the image is kept as it is: full-body boxes of cut-off people extend beyond the image
by design.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xaibench.cache import atomic_write
from xaibench.images import check_detectable, load_image
from xaibench.registry import DATASETS
from xaibench.types import Instance, Sample

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def read_odgt(path: str | Path) -> list[dict[str, Any]]:
    """Records of an odgt file (blank lines skipped); errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"odgt file {path} does not exist")
    records = []
    lines: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid json: {err}") from err
        if not isinstance(record, dict) or "ID" not in record:
            raise ValueError(f"{path} line {number}: expected an object with field 'ID'")
        if not isinstance(record.get("gtboxes", []), list):
            raise ValueError(f"{path} line {number} (ID {record['ID']}): 'gtboxes' must be a list")
        first = lines.setdefault(str(record["ID"]), number)
        if first != number:
            raise ValueError(
                f"{path} line {number}: ID {record['ID']!r} already appears on line {first}; "
                "IDs must be unique"
            )
        for k, box in enumerate(record.get("gtboxes", [])):
            where = f"{path} line {number} (ID {record['ID']}) gtboxes[{k}]"
            _check_box(box, "fbox", where)
            for optional in ("vbox", "hbox"):
                if isinstance(box, dict) and optional in box:
                    _check_box(box, optional, where)
        records.append(record)
    return records


def _check_box(record: Any, field: str, where: str) -> None:
    value = record.get(field) if isinstance(record, dict) else None
    ok = isinstance(value, list) and len(value) == 4
    if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
        raise ValueError(
            f"{where}: field {field!r} must be [x, y, w, h] of finite numbers, got {value!r}"
        )


def _xyxy(box: list[float]) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x, y, x + w, y + h], dtype=np.float32)


@DATASETS.register("crowdhuman")
class CrowdHumanDataset:
    """CrowdHuman-style ``odgt_file`` plus the folder holding ``<ID>.jpg`` (or .jpeg/.png).

    ``dataset[i]`` is a ``Sample`` whose instances have label 1 (person), ``box`` = fbox and
    ``visible_box`` = vbox (xyxy, pixels), ``ignore`` as in the CrowdDet evaluation, and
    ``id`` = the box's index in the record's ``gtboxes``. Boxes with a non-positive fbox width
    or height are skipped with a warning.
    """

    class_names: tuple[str, ...] = ("__background__", "person")

    def __init__(self, odgt_file: str | Path, image_dir: str | Path) -> None:
        self.odgt_file = Path(odgt_file)
        self.image_dir = Path(image_dir)
        self.records = read_odgt(self.odgt_file)
        self.image_ids: list[str] = [str(r["ID"]) for r in self.records]
        degenerate = [
            f"{r['ID']}[{k}]"
            for r in self.records
            for k, b in enumerate(r.get("gtboxes", []))
            if b["fbox"][2] <= 0 or b["fbox"][3] <= 0
        ]
        if degenerate:
            warnings.warn(
                f"{self.odgt_file}: skipping {len(degenerate)} box(es) with zero or negative "
                f"fbox width/height: {', '.join(degenerate[:20])}",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        record = self.records[index]
        path = self.image_path(str(record["ID"]))
        image = load_image(path)
        check_detectable(image, f"image file {path} (ID {record['ID']})")
        height, width = image.shape[:2]
        instances, outside = [], []
        for k, box in enumerate(record.get("gtboxes", [])):
            x, y, w, h = box["fbox"]
            if w <= 0 or h <= 0:
                continue
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                outside.append(k)
                continue
            extra = box.get("extra") or {}
            visible = box.get("vbox")
            instances.append(
                Instance(
                    box=_xyxy(box["fbox"]),
                    label=1,
                    ignore=box.get("tag") != "person" or extra.get("ignore", 0) != 0,
                    id=k,
                    visible_box=None if visible is None else _xyxy(visible),
                )
            )
        if outside:
            warnings.warn(
                f"{self.odgt_file} ID {record['ID']}: skipping gtboxes {outside}, whose 'fbox' "
                f"lies entirely outside the {width}x{height} (W x H) image",
                stacklevel=2,
            )
        return Sample(
            image=image,
            image_id=str(record["ID"]),
            instances=instances,
            file_name=path.name,
        )

    def image_path(self, image_id: str) -> Path:
        """The image file of record ``image_id`` (``ID`` plus a known extension, or ``ID``)."""
        candidates = [self.image_dir / image_id] + [
            self.image_dir / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS
        ]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"no image file for ID {image_id!r} of {self.odgt_file}: tried "
            + ", ".join(str(p) for p in candidates)
        )


# ---------------------------------------------------------------------------------------------
# CrowdDet result files: what the CrowdDet evaluation (and other tools) score


@dataclass
class CrowdRecord:
    """Ground truth and detections of one image, as the CrowdDet evaluation reads them.

    Boxes xyxy in original-image pixels (GT boxes are full-body boxes and may extend beyond
    the image: the evaluation clips them); ``gt_ignore`` (M,) marks ignore GTs (CrowdDet tag
    -1); ``dt_scores`` (N,) the detections' scores; ``height``/``width`` the image size in px.
    """

    image_id: str
    height: int
    width: int
    gt_boxes: np.ndarray
    gt_ignore: np.ndarray
    dt_boxes: np.ndarray
    dt_scores: np.ndarray

    def __post_init__(self) -> None:
        self.image_id = str(self.image_id)
        self.gt_boxes = np.asarray(self.gt_boxes, dtype=np.float64).reshape(-1, 4)
        self.gt_ignore = np.asarray(self.gt_ignore, dtype=bool).reshape(-1)
        self.dt_boxes = np.asarray(self.dt_boxes, dtype=np.float64).reshape(-1, 4)
        self.dt_scores = np.asarray(self.dt_scores, dtype=np.float64).reshape(-1)
        if len(self.gt_ignore) != len(self.gt_boxes):
            raise ValueError(
                f"image {self.image_id}: {len(self.gt_boxes)} GT boxes but "
                f"{len(self.gt_ignore)} ignore flags"
            )
        if len(self.dt_scores) != len(self.dt_boxes):
            raise ValueError(
                f"image {self.image_id}: {len(self.dt_boxes)} detection boxes but "
                f"{len(self.dt_scores)} scores"
            )

    @staticmethod
    def from_sample(
        sample: Sample, boxes: Any = (), scores: Any = (), label: int | None = None
    ) -> CrowdRecord:
        """A record of ``sample``'s ground truth (instances of ``label`` or, with None, all;
        others count as ignore) and detections ``boxes`` (N, 4) xyxy with ``scores`` (N,)."""
        height, width = sample.size
        gts = sample.instances
        return CrowdRecord(
            image_id=str(sample.image_id),
            height=height,
            width=width,
            gt_boxes=np.array([g.box for g in gts], dtype=np.float64).reshape(-1, 4),
            gt_ignore=np.array(
                [g.ignore or (label is not None and g.label != label) for g in gts], dtype=bool
            ),
            dt_boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            dt_scores=np.asarray(scores, dtype=np.float64).reshape(-1),
        )


def _xywh_list(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def write_crowddet_results(path: str | Path, records: Sequence[CrowdRecord]) -> Path:
    """Write ``records`` as a CrowdDet result file (json lines): ``ID``, ``height``, ``width``,
    ``gtboxes`` [{``box`` xywh, ``tag`` 1 or -1 (ignore)}], ``dtboxes`` [{``box`` xywh,
    ``score``, ``tag`` 1}]. Written atomically; returns the path."""
    lines = []
    for r in records:
        record = {
            "ID": r.image_id,
            "height": int(r.height),
            "width": int(r.width),
            "gtboxes": [
                {"box": _xywh_list(b), "tag": -1 if ig else 1}
                for b, ig in zip(r.gt_boxes, r.gt_ignore, strict=True)
            ],
            "dtboxes": [
                {"box": _xywh_list(b), "score": float(s), "tag": 1}
                for b, s in zip(r.dt_boxes, r.dt_scores, strict=True)
            ],
        }
        lines.append(json.dumps(record, separators=(",", ":")))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return path


def read_crowddet_results(path: str | Path) -> list[CrowdRecord]:
    """Records of a CrowdDet result file (see ``write_crowddet_results``); a GT whose ``tag``
    is not 1 is ignore. Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CrowdDet result file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid json: {err}") from err
        missing = [
            k for k in ("ID", "height", "width") if not isinstance(raw, dict) or k not in raw
        ]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        gts, dts = raw.get("gtboxes", []), raw.get("dtboxes", [])
        for field_name, boxes in (("gtboxes", gts), ("dtboxes", dts)):
            if not isinstance(boxes, list):
                raise ValueError(f"{where}: {field_name!r} must be a list")
            for k, box in enumerate(boxes):
                _check_box(box, "box", f"{where} (ID {raw['ID']}) {field_name}[{k}]")
        for k, box in enumerate(dts):
            if not isinstance(box.get("score"), (int, float)):
                raise ValueError(f"{where} (ID {raw['ID']}) dtboxes[{k}]: 'score' must be a number")
        records.append(
            CrowdRecord(
                image_id=str(raw["ID"]),
                height=int(raw["height"]),
                width=int(raw["width"]),
                gt_boxes=np.array([_xyxy(b["box"]) for b in gts]).reshape(-1, 4),
                gt_ignore=np.array([b.get("tag") != 1 for b in gts], dtype=bool),
                dt_boxes=np.array([_xyxy(b["box"]) for b in dts]).reshape(-1, 4),
                dt_scores=np.array([float(b["score"]) for b in dts]),
            )
        )
    return records
