"""Deterministic synthetic scenes: the embedded default dataset (no internet needed).

Two modes, both written as PNG images plus a real COCO json (and, in crowd mode, a
CrowdHuman-style ``.odgt``) that the ordinary loaders read back:

- ``objects``: circles, squares and triangles (labels 1, 2, 3 = ``CLASS_NAMES``; 0 is the
  background) with saturated, solid or lightly striped fills, partial occlusion (later shapes
  cover earlier ones; masks are the visible pixels), background clutter (gradient, noise,
  small blobs and lines) and unannotated distractors (thin crosses and rings).
- ``crowd``: one class, ``person`` (a head disc on a body ellipse, outlined), standing in rows
  that overlap heavily; each person has a full box (may extend beyond the image), a visible
  box and a head box. Far-away groups of tiny, blurred figures are ignore regions
  (CrowdHuman tag ``"mask"``, COCO ``iscrowd=1``); a person less visible than
  ``min_person_visible`` is kept but marked ignore (``extra.ignore = 1``, ``iscrowd = 1``).

Every image is rendered from its own random stream, seeded by ``(seed, split, index)``, so the
same arguments give byte-identical files and ``SyntheticSplit.scene(i)`` re-renders image
``i`` with its exact ground truth. Pixel ``(row r, column c)`` covers ``[c, c+1] x [r, r+1]``;
boxes are xyxy on those pixel edges (a mask spanning columns 10..19 has x1 = 10, x2 = 20), and
COCO/odgt fields are the same boxes as xywh.
"""

from __future__ import annotations

import colorsys
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageFilter

from xaibench.cache import atomic_write
from xaibench.datasets.coco import CocoDataset, read_json
from xaibench.registry import DATASETS

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
CROWD_CLASS_NAMES: tuple[str, ...] = ("person",)
MODES: tuple[str, ...] = ("objects", "crowd")
MASK_FORMATS: tuple[str, ...] = ("rle", "polygon")

Mode = Literal["objects", "crowd"]
Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SyntheticOptions:
    """Generator knobs. Sizes are fractions of the shorter image side (0.125 = 20 px at 160).

    ``mask_format``: how non-crowd masks are written (``"rle"`` compressed RLE or
    ``"polygon"``); ``iscrowd=1`` annotations are always uncompressed RLE, as in COCO.
    ``min_visible`` (objects): a shape that would leave itself or an earlier shape less
    visible than this fraction is not drawn. ``clutter`` scales noise, blobs and lines
    (0 = plain gradient). ``min_person_visible`` (crowd): below it a person is ignore.
    """

    mask_format: str = "rle"
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 0.125
    max_size: float = 0.44
    min_visible: float = 0.3
    max_distractors: int = 3
    clutter: float = 1.0
    texture_prob: float = 0.5
    max_rows: int = 3
    max_per_row: int = 6
    max_ignore_regions: int = 2
    min_person_visible: float = 0.1

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be 'rle' or 'polygon', got {self.mask_format!r}")
        _check_int("min_objects", self.min_objects, low=0)
        _check_int("max_objects", self.max_objects, low=max(self.min_objects, 1))
        _check_fraction("min_size", self.min_size, low=0.05, high=0.9)
        _check_fraction("max_size", self.max_size, low=self.min_size, high=0.9)
        _check_fraction("min_visible", self.min_visible, low=0.0, high=1.0)
        _check_int("max_distractors", self.max_distractors, low=0)
        _check_fraction("clutter", self.clutter, low=0.0, high=10.0)
        _check_fraction("texture_prob", self.texture_prob, low=0.0, high=1.0)
        _check_int("max_rows", self.max_rows, low=1)
        _check_int("max_per_row", self.max_per_row, low=1)
        _check_int("max_ignore_regions", self.max_ignore_regions, low=0)
        _check_fraction("min_person_visible", self.min_person_visible, low=0.0, high=1.0)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_fraction(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


@dataclass
class SceneObject:
    """Ground truth of one drawn thing, as the generator drew it.

    ``box``: xyxy tight box of the visible pixels; ``full_box``: xyxy box of the whole shape,
    occluded and out-of-image parts included; ``head_box`` (persons only) likewise for the head;
    ``mask``: (H, W) bool visible pixels (for an ignore region: its whole rectangle);
    ``tag``: class name, or ``"mask"`` for a crowd ignore region.
    """

    label: int
    tag: str
    box: np.ndarray
    full_box: np.ndarray
    mask: np.ndarray
    ignore: bool = False
    head_box: np.ndarray | None = None


@dataclass
class Scene:
    """One rendered image (uint8 RGB, H x W x 3) and everything annotated in it."""

    image: np.ndarray
    objects: list[SceneObject]


@dataclass
class SyntheticSplit:
    """Where ``generate_synthetic`` wrote a split, and how to re-render its ground truth."""

    root: Path
    images_dir: Path
    annotation_file: Path
    odgt_file: Path | None
    num_images: int = 0
    seed: int = 0
    mode: str = "objects"
    image_size: tuple[int, int] = (160, 160)
    split: str = "train"
    options: SyntheticOptions = field(default_factory=SyntheticOptions)

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES if self.mode == "objects" else CROWD_CLASS_NAMES

    def file_name(self, index: int) -> str:
        """File name (inside ``images_dir``) of image ``index``; its COCO image id is index + 1."""
        return f"{index:06d}.png"

    def scene(self, index: int) -> Scene:
        """Re-render image ``index`` (0-based) with its exact ground truth."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index must be in [0, {self.num_images}), got {index}")
        return render_scene(index, self.seed, self.mode, self.image_size, self.split, self.options)


def generate_synthetic(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    mode: Mode = "objects",
    image_size: tuple[int, int] = (160, 160),
    split: str = "train",
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> SyntheticSplit:
    """Render ``num_images`` scenes into ``out_dir`` and write their annotations.

    Layout: ``out_dir/<split>/000000.png ...``, ``out_dir/annotations/<split>.json`` (COCO) and,
    in crowd mode, ``out_dir/annotations/<split>.odgt``. ``image_size`` is (H, W) in pixels.
    ``options`` are the fields of ``SyntheticOptions`` (e.g. ``mask_format="polygon"``).
    ``progress``, if given, is called with the number of images done after each image.
    """
    out = plan_synthetic(out_dir, num_images, seed, mode, image_size, split, **options)
    out.images_dir.mkdir(parents=True, exist_ok=True)
    out.annotation_file.parent.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    odgt_lines: list[str] = []
    for index in range(num_images):
        scene = out.scene(index)
        file_name = out.file_name(index)
        with atomic_write(out.images_dir / file_name) as tmp:  # a reader never sees half
            Image.fromarray(scene.image).save(tmp, format="PNG")
        height, width = out.image_size
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for obj in scene.objects:
            annotations.append(_coco_annotation(obj, len(annotations) + 1, index + 1, out))
        if out.odgt_file is not None:
            record = {"ID": Path(file_name).stem, "gtboxes": [_odgt_box(o) for o in scene.objects]}
            odgt_lines.append(json.dumps(record, separators=(",", ":")))
        if progress is not None:
            progress(index + 1)
    coco = {
        "info": {
            "description": "xaibench synthetic scenes",
            "version": "1",
            "xaibench_synthetic": _parameters(out),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape" if mode == "objects" else name}
            for i, name in enumerate(out.class_names)
        ],
    }
    if out.odgt_file is not None:
        with atomic_write(out.odgt_file) as tmp:
            tmp.write_text("".join(line + "\n" for line in odgt_lines))
    # the COCO json comes last and whole: its presence marks a complete split
    with atomic_write(out.annotation_file) as tmp:
        tmp.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return out


def plan_synthetic(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    mode: Mode = "objects",
    image_size: tuple[int, int] = (160, 160),
    split: str = "train",
    **options: Any,
) -> SyntheticSplit:
    """Validate the arguments of ``generate_synthetic`` and say where it would write; writes
    nothing. Errors name the argument and what was expected."""
    _check_int("num_images", num_images, low=1)
    _check_int("seed", seed, low=0)
    if mode not in MODES:
        raise ValueError(f"mode must be 'objects' or 'crowd', got {mode!r}")
    image_size = _check_image_size(image_size)
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise ValueError(
            f"split must be a non-empty name of letters, digits, '_', '.', '-'; got {split!r}"
        )
    known = [f.name for f in fields(SyntheticOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    root = Path(out_dir)
    return SyntheticSplit(
        root=root,
        images_dir=root / split,
        annotation_file=root / "annotations" / f"{split}.json",
        odgt_file=root / "annotations" / f"{split}.odgt" if mode == "crowd" else None,
        num_images=num_images,
        seed=seed,
        mode=mode,
        image_size=image_size,
        split=split,
        options=SyntheticOptions(**options),
    )


def _parameters(split: SyntheticSplit) -> dict[str, Any]:
    """The arguments that determine a split's content (stored in the COCO ``info``)."""
    return {
        "num_images": split.num_images,
        "seed": split.seed,
        "mode": split.mode,
        "image_size": list(split.image_size),
        "split": split.split,
        "options": asdict(split.options),
    }


def _check_image_size(image_size: Any) -> tuple[int, int]:
    ok = (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in image_size)
    )
    if not ok:
        raise ValueError(
            f"image_size must be (height, width), two integers >= 32; got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


# ---------------------------------------------------------------------------------------------
# Rendering


def render_scene(
    index: int,
    seed: int = 0,
    mode: str = "objects",
    image_size: tuple[int, int] = (160, 160),
    split: str = "train",
    options: SyntheticOptions | None = None,
) -> Scene:
    """Render image ``index`` of a split; the result depends only on the arguments."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'objects' or 'crowd', got {mode!r}")
    options = options or SyntheticOptions()
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    height, width = image_size
    if mode == "objects":
        return _render_objects(rng, height, width, options)
    return _render_crowd(rng, height, width, options)


@dataclass
class _Shape:
    """A rasterised shape on its own grid: ``local`` covers rows y0.. and columns x0.. ."""

    local: np.ndarray
    y0: int
    x0: int

    def full_box(self) -> np.ndarray:
        """xyxy tight box of the whole shape in image pixels (may extend beyond the image)."""
        return _tight_box(self.local) + np.array([self.x0, self.y0, self.x0, self.y0])

    def in_image(self, height: int, width: int) -> np.ndarray:
        """The shape as an (H, W) bool mask, clipped to the image."""
        out = np.zeros((height, width), dtype=bool)
        h, w = self.local.shape
        ya, yb = max(self.y0, 0), min(self.y0 + h, height)
        xa, xb = max(self.x0, 0), min(self.x0 + w, width)
        if ya < yb and xa < xb:
            out[ya:yb, xa:xb] = self.local[ya - self.y0 : yb - self.y0, xa - self.x0 : xb - self.x0]
        return out


def _rasterize(inside: Inside, box: tuple[float, float, float, float]) -> _Shape:
    """Pixels whose centres satisfy ``inside(x, y)``, searched within the xyxy ``box``."""
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return _Shape(inside(xs + 0.5, ys + 0.5), y0, x0)


def _disc(cx: float, cy: float, r: float) -> Inside:
    return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _ellipse(cx: float, cy: float, a: float, b: float) -> Inside:
    return lambda x, y: ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _convex_polygon(points: np.ndarray) -> Inside:
    """Inside test for a convex polygon given as (N, 2) xy vertices in either orientation."""
    edges = np.roll(points, -1, axis=0) - points
    (ax, ay), (bx, by) = edges[0], points[2] - points[0]
    sign = np.sign(ax * by - ay * bx)

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ok = np.ones(x.shape, dtype=bool)
        for (px, py), (ex, ey) in zip(points, edges, strict=True):
            ok &= sign * (ex * (y - py) - ey * (x - px)) >= 0
        return ok

    return inside


def _bbox_of(points: np.ndarray) -> tuple[float, float, float, float]:
    return (*points.min(axis=0), *points.max(axis=0))


def _saturated_color(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    return np.array(rgb) * 255.0


def _dull_color(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8))
    return np.array(rgb) * 255.0


def _background(rng: np.random.Generator, height: int, width: int, clutter: float) -> np.ndarray:
    """A float (H, W, 3) canvas: linear gradient between two dull colours, blobs and lines."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    a, b = _dull_color(rng), _dull_color(rng)
    image = a + t[:, :, None] * (b - a)
    scale = min(height, width) / 160.0
    for _ in range(rng.poisson(6 * clutter)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(1.5, 4.0) * scale
        shape = _rasterize(_disc(cx, cy, r), (cx - r, cy - r, cx + r, cy + r))
        image[shape.in_image(height, width)] = _saturated_color(rng) * rng.uniform(0.5, 1.0)
    for _ in range(rng.poisson(3 * clutter)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(10, 40) * scale
        steps = np.linspace(0.0, length, int(2 * length) + 2)
        xs_line = np.clip((x0 + steps * np.cos(angle)).astype(int), 0, width - 1)
        ys_line = np.clip((y0 + steps * np.sin(angle)).astype(int), 0, height - 1)
        image[ys_line, xs_line] = _dull_color(rng) * rng.uniform(0.3, 1.2)
    return image


def _finish(image: np.ndarray, rng: np.random.Generator, clutter: float) -> np.ndarray:
    """Add pixel noise (sigma 4 * clutter, 0..255 scale) and quantise to uint8."""
    noise = rng.normal(0.0, 4.0 * clutter, size=image.shape) if clutter > 0 else 0.0
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def _fill(rng: np.random.Generator, shape: _Shape, texture_prob: float) -> np.ndarray:
    """Per-pixel colours (h, w, 3) for ``shape``: a saturated colour, maybe lightly striped."""
    color = _saturated_color(rng)
    h, w = shape.local.shape
    if rng.uniform() >= texture_prob:
        return np.broadcast_to(color, (h, w, 3))
    angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 9.0)
    ys, xs = np.mgrid[0:h, 0:w]
    stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    return color * (1.0 + 0.15 * stripes[:, :, None])


def _paint(image: np.ndarray, shape: _Shape, colors: np.ndarray) -> None:
    """Paint the in-image part of ``shape`` with per-pixel ``colors`` (same grid as ``local``)."""
    height, width = image.shape[:2]
    h, w = shape.local.shape
    ya, yb = max(shape.y0, 0), min(shape.y0 + h, height)
    xa, xb = max(shape.x0, 0), min(shape.x0 + w, width)
    if ya >= yb or xa >= xb:
        return
    local = (slice(ya - shape.y0, yb - shape.y0), slice(xa - shape.x0, xb - shape.x0))
    region = image[ya:yb, xa:xb]
    keep = shape.local[local]
    region[keep] = colors[local][keep]


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


# --- objects mode -----------------------------------------------------------------------------


def _object_shape(
    rng: np.random.Generator, label: int, height: int, width: int, options: SyntheticOptions
) -> _Shape:
    """A circle (1), square (2) or triangle (3) of extent ~size, placed fully inside the image."""
    size = rng.uniform(options.min_size, options.max_size) * min(height, width)
    if label == 1:
        r = size / 2
        points = np.array([[-r, -r], [r, r]])
    elif label == 2:
        half, angle = 0.85 * size / 2, np.deg2rad(rng.uniform(-30, 30))
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        points = corners @ _rotation(angle).T
    else:
        radius, angle = 0.55 * size, rng.uniform(0, 2 * np.pi)
        angles = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        points = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    lo, hi = points.min(axis=0), points.max(axis=0)
    cx = rng.uniform(-lo[0], width - hi[0])
    cy = rng.uniform(-lo[1], height - hi[1])
    points = points + np.array([cx, cy])
    if label == 1:
        return _rasterize(_disc(cx, cy, size / 2), _bbox_of(points))
    return _rasterize(_convex_polygon(points), _bbox_of(points))


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _distractor(rng: np.random.Generator, height: int, width: int) -> _Shape:
    """A thin cross or a ring (never annotated), possibly cut by the image border."""
    scale = min(height, width) / 160.0
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    if rng.uniform() < 0.5:
        arm, half_t = rng.uniform(8, 22) * scale, rng.uniform(1.0, 2.0) * scale
        rot = _rotation(rng.uniform(0, np.pi / 2))

        def cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            u = rot[0, 0] * (x - cx) + rot[1, 0] * (y - cy)
            v = rot[0, 1] * (x - cx) + rot[1, 1] * (y - cy)
            return ((np.abs(u) <= arm) & (np.abs(v) <= half_t)) | (
                (np.abs(v) <= arm) & (np.abs(u) <= half_t)
            )

        return _rasterize(cross, (cx - arm, cy - arm, cx + arm, cy + arm))
    outer = rng.uniform(8, 22) * scale
    inner = outer - rng.uniform(1.5, 3.0) * scale
    ring = lambda x, y: (_disc(cx, cy, outer)(x, y)) & ~(_disc(cx, cy, inner)(x, y))  # noqa: E731
    return _rasterize(ring, (cx - outer, cy - outer, cx + outer, cy + outer))


def _render_objects(
    rng: np.random.Generator, height: int, width: int, options: SyntheticOptions
) -> Scene:
    image = _background(rng, height, width, options.clutter)
    for _ in range(rng.integers(0, options.max_distractors + 1)):
        shape = _distractor(rng, height, width)
        _paint(image, shape, np.broadcast_to(_saturated_color(rng), (*shape.local.shape, 3)))
    owner = np.zeros((height, width), dtype=np.int32)  # index + 1 of the visible shape, 0 none
    drawn: list[tuple[int, _Shape, int]] = []  # label, shape, in-image area
    for _ in range(rng.integers(options.min_objects, options.max_objects + 1)):
        label = int(rng.integers(1, len(CLASS_NAMES) + 1))
        for _attempt in range(20):
            shape = _object_shape(rng, label, height, width, options)
            full = shape.in_image(height, width)
            trial = owner.copy()
            trial[full] = len(drawn) + 1
            visible = np.bincount(trial.ravel(), minlength=len(drawn) + 2)[1:]
            areas = np.array([a for _, _, a in drawn] + [int(full.sum())])
            if (visible >= options.min_visible * areas).all():
                break
        else:
            continue
        owner = trial
        drawn.append((label, shape, int(full.sum())))
        _paint(image, shape, _fill(rng, shape, options.texture_prob))
    objects = []
    for k, (label, shape, _area) in enumerate(drawn):
        mask = owner == k + 1
        objects.append(
            SceneObject(
                label=label,
                tag=CLASS_NAMES[label - 1],
                box=_tight_box(mask),
                full_box=shape.full_box(),
                mask=mask,
            )
        )
    return Scene(image=_finish(image, rng, options.clutter), objects=objects)


# --- crowd mode -------------------------------------------------------------------------------


def _person(cx: float, feet: float, tall: float) -> tuple[_Shape, _Shape]:
    """A figure ``tall`` px high standing at (cx, feet): (whole figure, head) shapes."""
    r = 0.12 * tall
    top = feet - tall
    head = _disc(cx, top + r, r)
    b = (tall - 2 * r) / 2 + 0.03 * tall
    body = _ellipse(cx, feet - b, 0.2 * tall, b)
    box = (cx - 0.2 * tall, top, cx + 0.2 * tall, feet)
    whole = _rasterize(lambda x, y: head(x, y) | body(x, y), box)
    return whole, _rasterize(head, (cx - r, top, cx + r, top + 2 * r))


def _outlined(rng: np.random.Generator, whole: _Shape, head: _Shape) -> np.ndarray:
    """Colours for a figure: saturated body, skin-like head, darker one-pixel outline."""
    h, w = whole.local.shape
    colors = np.empty((h, w, 3))
    colors[:] = _saturated_color(rng)
    skin = np.array([224.0, 172.0, 140.0]) * rng.uniform(0.6, 1.1)
    hy, hx = head.y0 - whole.y0, head.x0 - whole.x0
    hh, hw = head.local.shape
    colors[hy : hy + hh, hx : hx + hw][head.local] = skin
    padded = np.pad(whole.local, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    colors[whole.local & ~interior] *= 0.4
    return colors


def _ignore_region(rng: np.random.Generator, image: np.ndarray) -> SceneObject:
    """A far-away group of tiny blurred figures in the upper part; returns its ignore box."""
    height, width = image.shape[:2]
    rw, rh = int(rng.uniform(0.25, 0.5) * width), int(rng.uniform(0.1, 0.2) * height)
    x0, y0 = int(rng.integers(0, width - rw + 1)), int(rng.integers(0, int(0.45 * height) + 1))
    for _ in range(rng.integers(6, 15)):
        tall = rng.uniform(0.6, 1.0) * rh
        whole, head = _person(rng.uniform(x0, x0 + rw), rng.uniform(y0 + tall, y0 + rh), tall)
        _paint(image, whole, _outlined(rng, whole, head))
    crop = image[y0 : y0 + rh, x0 : x0 + rw]
    blurred = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=1.5)
    )
    image[y0 : y0 + rh, x0 : x0 + rw] = np.asarray(blurred, dtype=np.float64)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0 : y0 + rh, x0 : x0 + rw] = True
    box = np.array([x0, y0, x0 + rw, y0 + rh], dtype=np.float64)
    return SceneObject(label=1, tag="mask", box=box, full_box=box.copy(), mask=mask, ignore=True)


def _render_crowd(
    rng: np.random.Generator, height: int, width: int, options: SyntheticOptions
) -> Scene:
    image = _background(rng, height, width, options.clutter)
    objects = [
        _ignore_region(rng, image) for _ in range(rng.integers(0, options.max_ignore_regions + 1))
    ]
    side = min(height, width)
    rows = int(rng.integers(1, options.max_rows + 1))
    people: list[tuple[_Shape, _Shape]] = []
    owner = np.zeros((height, width), dtype=np.int32)
    for row in range(rows):
        tall = side * rng.uniform(0.35, 0.5) * (1 + 0.25 * row)
        feet = height * (0.55 + 0.45 * (row + 1) / rows)
        x = rng.uniform(-0.3, 0.2) * 0.4 * tall
        placed = []
        while x < width and len(placed) < options.max_per_row:
            placed.append(
                (x, tall * rng.uniform(0.92, 1.08), feet + rng.uniform(-0.03, 0.03) * height)
            )
            x += 0.4 * tall * rng.uniform(0.15, 1.0)
        for i in rng.permutation(len(placed)):
            cx, t, f = placed[i]
            whole, head = _person(cx, f, t)
            _paint(image, whole, _outlined(rng, whole, head))
            owner[whole.in_image(height, width)] = len(people) + 1
            people.append((whole, head))
    for k, (whole, head) in enumerate(people):
        mask = owner == k + 1
        visible = int(mask.sum())
        if visible == 0:
            continue
        objects.append(
            SceneObject(
                label=1,
                tag="person",
                box=_tight_box(mask),
                full_box=whole.full_box(),
                mask=mask,
                ignore=visible < options.min_person_visible * int(whole.local.sum()),
                head_box=head.full_box(),
            )
        )
    return Scene(image=_finish(image, rng, options.clutter), objects=objects)


# ---------------------------------------------------------------------------------------------
# Writing


def _xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _coco_annotation(
    obj: SceneObject, ann_id: int, image_id: int, split: SyntheticSplit
) -> dict[str, Any]:
    """COCO record of ``obj``: bbox xywh (visible box; for persons the full box clipped to the
    image), area = mask pixels, iscrowd = ignore, segmentation per ``mask_format``."""
    height, width = split.image_size
    if obj.tag == "person":
        box = np.clip(obj.full_box, 0, [width, height, width, height])
    else:
        box = obj.box
    if obj.ignore:
        segmentation: Any = _uncompressed_rle(obj.mask)
    elif split.options.mask_format == "polygon":
        segmentation = [mask_to_polygon(obj.mask)]
    else:
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    record = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.label,
        "bbox": _xywh(box),
        "area": int(obj.mask.sum()),
        "iscrowd": int(obj.ignore),
        "segmentation": segmentation,
    }
    if split.mode == "crowd":
        record["vbox"] = _xywh(obj.box)
    return record


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths of 0s and 1s in column-major order, starting with 0s."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _odgt_box(obj: SceneObject) -> dict[str, Any]:
    """CrowdHuman record of ``obj`` (boxes xywh; an ignore region repeats its box thrice)."""
    head = obj.head_box if obj.head_box is not None else obj.full_box
    return {
        "tag": obj.tag,
        "fbox": _xywh(obj.full_box),
        "vbox": _xywh(obj.box),
        "hbox": _xywh(head),
        "extra": {"ignore": int(obj.ignore)},
    }


def mask_to_polygon(mask: np.ndarray) -> list[float]:
    """One COCO polygon ``[x1, y1, x2, y2, ...]`` (pixel-edge coordinates) tracing ``mask``.

    Every boundary loop (outer outlines and holes, of all parts) is chained into a single
    polygon through zero-width bridges that are walked there and back; pycocotools fills
    polygons by the even-odd rule, so the bridges cancel and the decoded mask equals ``mask``.
    """
    loops = _boundary_loops(mask)
    if not loops:
        raise ValueError("mask_to_polygon needs a mask with at least one pixel")
    anchor = loops[0][0]
    points: list[tuple[int, int]] = [*loops[0], anchor]
    for loop in loops[1:]:
        points += [*loop, loop[0], anchor]
    return [float(v) for point in points for v in point]


def _boundary_loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed loops of pixel-edge corners (x, y) around ``mask``, collinear corners removed."""
    padded = np.pad(mask.astype(bool), 1)
    fg = padded[1:-1, 1:-1]
    following: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # (neighbour that must be background, edge start offset, edge end offset)
        (padded[:-2, 1:-1], (0, 0), (1, 0)),
        (padded[1:-1, 2:], (1, 0), (1, 1)),
        (padded[2:, 1:-1], (1, 1), (0, 1)),
        (padded[1:-1, :-2], (0, 1), (0, 0)),
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        rows, cols = np.nonzero(fg & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            following.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
    loops = []
    while following:
        start = next(iter(following))
        loop, point, direction = [], start, None
        while True:
            nxt = following[point].pop()
            if not following[point]:
                del following[point]
            step = (nxt[0] - point[0], nxt[1] - point[1])
            if step != direction:
                loop.append(point)
                direction = step
            point = nxt
            if point == start:
                break
        loops.append(loop)
    return loops


# ---------------------------------------------------------------------------------------------
# Registry entry


@DATASETS.register("synthetic")
def load_synthetic(
    root: str | Path,
    num_images: int = 64,
    seed: int = 0,
    mode: Mode = "objects",
    image_size: tuple[int, int] = (160, 160),
    split: str = "train",
    **options: Any,
) -> CocoDataset:
    """The synthetic split in ``root`` as a ``CocoDataset``, generated first if missing.

    A split already in ``root`` is reused when it was generated with the same arguments and
    regenerated otherwise; a ``<split>.json`` there that this generator did not write is an error.
    """
    wanted = plan_synthetic(root, num_images, seed, mode, image_size, split, **options)
    annotation_file = wanted.annotation_file
    if annotation_file.is_file():
        data = read_json(annotation_file)
        info = data.get("info") if isinstance(data, dict) else None
        if not isinstance(info, dict) or "xaibench_synthetic" not in info:
            raise ValueError(
                f"{annotation_file} exists but was not written by generate_synthetic "
                "(no info.xaibench_synthetic); pick another root"
            )
    else:
        info = {}
    if info.get("xaibench_synthetic") != _parameters(wanted):
        generate_synthetic(root, num_images, seed, mode, image_size, split, **options)
    return CocoDataset(wanted.annotation_file, wanted.images_dir)
