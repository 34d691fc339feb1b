"""The synthetic scene generator: deterministic, annotated as drawn, crowded in crowd mode."""

import json
from pathlib import Path

import numpy as np
import pytest

from xaibench.datasets import CLASS_NAMES, generate_synthetic, read_odgt


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("crowd"), 8, seed=3, mode="crowd")


@pytest.mark.parametrize("mode", ["objects", "crowd"])
def test_same_seed_gives_byte_identical_files(tmp_path, mode):
    first = generate_synthetic(tmp_path / "a", 4, seed=7, mode=mode)
    second = generate_synthetic(tmp_path / "b", 4, seed=7, mode=mode)
    assert files_of(first.root) == files_of(second.root)
    assert len(files_of(first.root)) == 4 + (2 if mode == "crowd" else 1)


def test_different_seed_or_split_gives_different_images(tmp_path):
    base = generate_synthetic(tmp_path / "a", 3, seed=0)
    other_seed = generate_synthetic(tmp_path / "b", 3, seed=1)
    other_split = generate_synthetic(tmp_path / "c", 3, seed=0, split="val")
    image = (base.images_dir / "000000.png").read_bytes()
    assert image != (other_seed.images_dir / "000000.png").read_bytes()
    assert image != (other_split.images_dir / "000000.png").read_bytes()


def test_objects_mode_annotations_match_the_drawn_scene(tmp_path):
    split = generate_synthetic(tmp_path, 10, seed=0)
    coco = json.loads(split.annotation_file.read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    scenes = [split.scene(i) for i in range(10)]
    assert len(coco["annotations"]) == sum(len(s.objects) for s in scenes)
    for scene in scenes:
        assert scene.image.shape == (160, 160, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 6
        covered = np.zeros((160, 160), dtype=int)
        for obj in scene.objects:
            covered += obj.mask
            assert obj.label in (1, 2, 3) and obj.tag == CLASS_NAMES[obj.label - 1]
            rows, cols = np.nonzero(obj.mask)
            # box = tight box of the visible pixels, on pixel edges
            assert list(obj.box) == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            width, height = obj.full_box[2:] - obj.full_box[:2]
            assert 15 <= max(width, height) <= 80  # about 20-70 px on a 160 px image
            assert obj.mask.sum() >= 0.3 * 0.5 * width * height  # occluded at most ~70 %
        assert covered.max() <= 1  # visible masks never overlap


def test_polygon_option_writes_polygons(tmp_path):
    split = generate_synthetic(tmp_path, 2, mask_format="polygon")
    annotation = json.loads(split.annotation_file.read_text())["annotations"][0]
    assert isinstance(annotation["segmentation"], list)
    assert len(annotation["segmentation"][0]) >= 8


def test_crowd_mode_has_heavily_overlapping_persons(crowd):
    pairs = 0
    for i in range(crowd.num_images):
        persons = [o for o in crowd.scene(i).objects if o.tag == "person" and not o.ignore]
        boxes = np.array([o.full_box for o in persons])
        pairs += int((np.triu(box_iou(boxes, boxes), k=1) > 0.5).sum())
    assert pairs >= 3


def test_crowd_mode_full_box_contains_visible_and_head_box(crowd):
    for i in range(crowd.num_images):
        for obj in crowd.scene(i).objects:
            if obj.tag == "person":
                assert (obj.full_box[:2] <= obj.box[:2]).all()
                assert (obj.full_box[2:] >= obj.box[2:]).all()
                assert (obj.full_box[:2] <= obj.head_box[:2]).all()


def test_crowd_mode_writes_ignore_regions_as_mask_tags_and_iscrowd(crowd):
    records = read_odgt(crowd.odgt_file)
    assert [r["ID"] for r in records] == [f"{i:06d}" for i in range(8)]
    tags = [box["tag"] for r in records for box in r["gtboxes"]]
    assert "mask" in tags and "person" in tags
    for record in records:
        for box in record["gtboxes"]:
            assert set(box) == {"tag", "fbox", "vbox", "hbox", "extra"}
            if box["tag"] == "mask":
                assert box["extra"]["ignore"] == 1 and box["fbox"] == box["vbox"]

    coco = json.loads(crowd.annotation_file.read_text())
    crowd_annotations = [a for a in coco["annotations"] if a["iscrowd"] == 1]
    assert len(crowd_annotations) == sum(
        box["extra"]["ignore"] for r in records for box in r["gtboxes"]
    )
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowd_annotations)
    assert coco["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]


def test_odgt_boxes_are_the_scene_boxes_as_xywh(crowd):
    record = read_odgt(crowd.odgt_file)[0]
    scene = crowd.scene(0)
    assert len(record["gtboxes"]) == len(scene.objects)
    for box, obj in zip(record["gtboxes"], scene.objects, strict=True):
        x1, y1, x2, y2 = obj.full_box
        assert box["fbox"] == [x1, y1, x2 - x1, y2 - y1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"mode": "people"}, "mode must be 'objects' or 'crowd'"),
        ({"image_size": (16, 160)}, r"image_size must be \(height, width\)"),
        ({"split": "a/b"}, "split must be"),
        ({"mask_format": "png"}, "mask_format must be 'rle' or 'polygon'"),
        ({"max_objects": 0}, "max_objects must be an integer >= 1"),
        ({"colour": "red"}, "unknown option.*colour.*known: mask_format"),
    ],
)
def test_arguments_are_validated(tmp_path, kwargs, message):
    arguments = {"out_dir": tmp_path, "num_images": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_synthetic(**arguments)
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_interrupted_image_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """Images are written whole or not at all: two processes generating one split (two
    ``xaibench run`` on one store) never read an image the other is half-way through."""
    from PIL import Image

    own_save = Image.Image.save
    calls = []

    def save_then_fail(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:  # the second image: some bytes, then the process "dies"
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise OSError("disk full")
        return own_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        generate_synthetic(tmp_path, 3, seed=1)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png"]
