"""COCO and CrowdHuman loaders: synthetic files round-trip to what the generator drew."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaibench.datasets import (
    AnnotationError,
    CocoDataset,
    CrowdHumanDataset,
    generate_synthetic,
)
from xaibench.images import ImageLoadError
from xaibench.registry import DATASETS


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("mask_format", ["rle", "polygon"])
def test_synthetic_round_trip(tmp_path, mask_format):
    split = generate_synthetic(tmp_path, 6, seed=1, mask_format=mask_format)
    dataset = CocoDataset(split.annotation_file, split.images_dir)
    assert len(dataset) == 6 and dataset.image_ids == [1, 2, 3, 4, 5, 6]
    assert dataset.class_names == ["__background__", "circle", "square", "triangle"]
    for i, sample in enumerate(dataset):
        scene = split.scene(i)
        np.testing.assert_array_equal(sample.image, scene.image)
        assert sample.image_id == i + 1 and sample.file_name == f"{i:06d}.png"
        assert len(sample.instances) == len(scene.objects)
        for instance, drawn in zip(sample.instances, scene.objects, strict=True):
            np.testing.assert_array_equal(instance.box, drawn.box)  # xyxy, original pixels
            assert instance.label == drawn.label and not instance.ignore
            assert instance.mask.dtype == bool and instance.mask.shape == (160, 160)
            assert mask_iou(instance.mask, drawn.mask) > 0.9  # polygons: exact in practice
            if mask_format == "rle":
                np.testing.assert_array_equal(instance.mask, drawn.mask)


def test_crowd_round_trip_ignore_and_visible_boxes(tmp_path):
    split = generate_synthetic(tmp_path, 4, seed=2, mode="crowd")
    dataset = CocoDataset(split.annotation_file, split.images_dir)
    assert dataset.class_names == ["__background__", "person"]
    ignored = 0
    for i, sample in enumerate(dataset):
        for instance, drawn in zip(sample.instances, split.scene(i).objects, strict=True):
            assert instance.ignore == drawn.ignore
            np.testing.assert_array_equal(instance.visible_box, drawn.box)
            np.testing.assert_array_equal(instance.mask, drawn.mask)
            ignored += instance.ignore
    assert ignored > 0


def write_coco(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    Image.new("RGB", (10, 8), "white").save(tmp_path / "a.png")
    data = {
        "images": images or [{"id": 5, "file_name": "a.png", "width": 10, "height": 8}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def annotation(ann_id: int, bbox: list[float], **extra) -> dict:
    return {"id": ann_id, "image_id": 5, "category_id": 3, "bbox": bbox, **extra}


def test_labels_are_contiguous_in_category_id_order(tmp_path):
    dataset = CocoDataset(write_coco(tmp_path, [annotation(1, [1, 2, 3, 4])]), tmp_path)
    assert dataset.class_names == ["__background__", "dog", "cat"]
    assert dataset.category_id_for_label(1) == 1 and dataset.category_id_for_label(2) == 3
    assert dataset.label_for_category_id(3) == 2
    (instance,) = dataset[0].instances
    np.testing.assert_array_equal(instance.box, [1, 2, 4, 6])  # xywh -> xyxy
    assert instance.label == 2 and instance.id == 1 and instance.mask is None
    with pytest.raises(ValueError, match=r"label must be in 1..2"):
        dataset.category_id_for_label(3)


def test_polygon_and_both_rle_forms_decode_to_the_same_mask(tmp_path):
    polygon = [[2.0, 1.0, 6.0, 1.0, 6.0, 5.0, 2.0, 5.0]]  # pixel edges: columns 2..5, rows 1..4
    expected = np.zeros((8, 10), dtype=bool)
    expected[1:5, 2:6] = True
    # column-major runs of 0s and 1s: 2 empty columns + 1 row, then 4 ones, 4 zeros, ...
    uncompressed = {"size": [8, 10], "counts": [17, 4, 4, 4, 4, 4, 4, 4, 35]}
    compressed = {"size": [8, 10], "counts": "a04400000o0"}  # the same, pycocotools-encoded
    anns = [
        annotation(1, [2, 1, 4, 4], segmentation=polygon),
        annotation(2, [2, 1, 4, 4], segmentation=uncompressed, iscrowd=1),
        annotation(3, [2, 1, 4, 4], segmentation=compressed),
    ]
    masks = [i.mask for i in CocoDataset(write_coco(tmp_path, anns), tmp_path)[0].instances]
    for mask in masks:
        np.testing.assert_array_equal(mask, expected)


def test_degenerate_boxes_are_skipped_with_a_warning(tmp_path):
    anns = [annotation(7, [1, 1, 0, 3]), annotation(8, [1, 1, 3, -1]), annotation(9, [0, 0, 2, 2])]
    with pytest.warns(UserWarning, match=r"annotation id\(s\) 7, 8"):
        dataset = CocoDataset(write_coco(tmp_path, anns), tmp_path)
    assert [i.id for i in dataset[0].instances] == [9]


def test_image_without_annotations_has_no_instances(tmp_path):
    assert CocoDataset(write_coco(tmp_path, []), tmp_path)[0].instances == []


def test_missing_image_file_names_the_file(tmp_path):
    images = [{"id": 5, "file_name": "gone.jpg", "width": 10, "height": 8}]
    dataset = CocoDataset(write_coco(tmp_path, [], images), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg \(file_name of image id 5"):
        dataset[0]


def test_malformed_annotation_files_name_the_file_and_field(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(AnnotationError, match=r"broken\.json is not valid json"):
        CocoDataset(broken, tmp_path)
    with pytest.raises(AnnotationError, match=r"missing\.json does not exist"):
        CocoDataset(tmp_path / "missing.json", tmp_path)
    no_bbox = write_coco(tmp_path, [{"id": 1, "image_id": 5, "category_id": 3}])
    with pytest.raises(AnnotationError, match=r"annotations\[0\] lacks field\(s\) \['bbox'\]"):
        CocoDataset(no_bbox, tmp_path)
    unknown_category = write_coco(tmp_path, [{**annotation(4, [0, 0, 1, 1]), "category_id": 9}])
    with pytest.raises(AnnotationError, match="annotation id 4 field 'category_id' = 9"):
        CocoDataset(unknown_category, tmp_path)


def test_registry_builds_coco_and_synthetic(tmp_path):
    dataset = DATASETS.build("synthetic", root=tmp_path, num_images=3, seed=4)
    assert isinstance(dataset, CocoDataset) and len(dataset) == 3
    written = (tmp_path / "annotations" / "train.json").stat().st_mtime_ns
    again = DATASETS.build("synthetic", root=tmp_path, num_images=3, seed=4)  # reused
    assert (tmp_path / "annotations" / "train.json").stat().st_mtime_ns == written
    assert len(again) == 3
    coco = DATASETS.build(
        "coco",
        annotation_file=tmp_path / "annotations" / "train.json",
        image_dir=tmp_path / "train",
    )
    np.testing.assert_array_equal(coco[2].image, dataset[2].image)
    assert len(DATASETS.build("synthetic", root=tmp_path, num_images=5, seed=4)) == 5  # remade


def test_crowdhuman_loader_ignore_flags_and_boxes(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "img1.jpg")
    record = {
        "ID": "img1",
        "gtboxes": [
            {"tag": "person", "fbox": [1, 2, 3, 4], "vbox": [1, 2, 3, 2], "extra": {"ignore": 0}},
            {"tag": "person", "fbox": [0, 0, 5, 5], "extra": {"ignore": 1}},
            {"tag": "mask", "fbox": [10, 0, 10, 10], "vbox": [10, 0, 10, 10]},
            {"tag": "person", "fbox": [4, 4, 0, 2]},
        ],
    }
    odgt = tmp_path / "train.odgt"
    odgt.write_text(json.dumps(record) + "\n\n")
    with pytest.warns(UserWarning, match=r"img1\[3\]"):
        dataset = DATASETS.build("crowdhuman", odgt_file=odgt, image_dir=tmp_path)
    sample = dataset[0]
    assert sample.image_id == "img1" and sample.image.shape == (10, 20, 3)
    assert [i.ignore for i in sample.instances] == [False, True, True]
    np.testing.assert_array_equal(sample.instances[0].box, [1, 2, 4, 6])  # fbox as xyxy
    np.testing.assert_array_equal(sample.instances[0].visible_box, [1, 2, 4, 4])
    assert sample.instances[1].visible_box is None


def test_crowdhuman_loader_reads_the_synthetic_odgt(tmp_path):
    split = generate_synthetic(tmp_path, 3, seed=5, mode="crowd")
    dataset = CrowdHumanDataset(split.odgt_file, split.images_dir)
    for i, sample in enumerate(dataset):
        drawn = split.scene(i).objects
        assert [inst.ignore for inst in sample.instances] == [o.ignore for o in drawn]
        for instance, obj in zip(sample.instances, drawn, strict=True):
            np.testing.assert_array_equal(instance.box, obj.full_box)
            np.testing.assert_array_equal(instance.visible_box, obj.box)


def test_crowdhuman_errors_name_file_line_and_id(tmp_path):
    odgt = tmp_path / "bad.odgt"
    odgt.write_text('{"ID": "x", "gtboxes": []}\n{"ID": "y", "gtboxes": [{"fbox": [1, 2]}]}\n')
    with pytest.raises(ValueError, match=r"bad.odgt line 2 \(ID y\) gtboxes\[0\]: field 'fbox'"):
        CrowdHumanDataset(odgt, tmp_path)
    odgt.write_text('{"ID": "x", "gtboxes": []}\n')
    with pytest.raises(FileNotFoundError, match="no image file for ID 'x'"):
        CrowdHumanDataset(odgt, tmp_path)[0]


# -- wrong but plausible data ---------------------------------------------------------------


def test_boxes_outside_the_image_are_skipped_or_clipped_with_a_warning(tmp_path):
    anns = [
        annotation(1, [20, 2, 3, 3]),  # entirely right of the 10 px wide image
        annotation(2, [-4, -5, 3, 3]),  # entirely above and left of it
        annotation(3, [6, 4, 8, 8]),  # reaches 4 px beyond the right and bottom edges
        annotation(4, [0, 0, 10.4, 8]),  # 0.4 px beyond: rounding, clipped silently
    ]
    with pytest.warns(UserWarning) as caught:
        dataset = CocoDataset(write_coco(tmp_path, anns), tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("skipping 2" in m and "entirely outside" in m and "1, 2" in m for m in messages)
    assert any("clipping" in m and "partly outside" in m and "id(s) 3" in m for m in messages)
    boxes = {i.id: i.box.tolist() for i in dataset[0].instances}
    assert boxes == {3: [6, 4, 10, 8], 4: [0, 0, 10, 8]}


@pytest.mark.parametrize("bbox", [[float("nan"), 1, 2, 2], [1, 1, float("inf"), 2], [1, "2", 3, 4]])
def test_non_finite_boxes_are_an_error(tmp_path, bbox):
    with pytest.raises(AnnotationError, match=r"annotation id 6 field 'bbox' .*finite numbers"):
        CocoDataset(write_coco(tmp_path, [annotation(6, bbox)]), tmp_path)


def test_repeated_annotation_and_image_ids_are_an_error(tmp_path):
    images = [
        {"id": 5, "file_name": "a.png", "width": 10, "height": 8},
        {"id": 6, "file_name": "a.png", "width": 10, "height": 8},
    ]
    anns = [annotation(1, [0, 0, 2, 2]), {**annotation(1, [3, 3, 2, 2]), "image_id": 6}]
    with pytest.raises(AnnotationError, match=r"annotations id 1 .* \(image ids 5 and 6\)"):
        CocoDataset(write_coco(tmp_path, anns, images), tmp_path)
    with pytest.raises(AnnotationError, match=r"images id 5 appears more than once"):
        CocoDataset(write_coco(tmp_path, [], [images[0], images[0]]), tmp_path)


def test_rle_that_does_not_fit_the_image_is_an_error(tmp_path):
    short = {"size": [8, 10], "counts": [17, 4, 4, 4, 4, 4, 4, 4, 30]}  # 75 of 80 pixels
    with pytest.raises(AnnotationError, match=r"id 2 field 'segmentation.counts' sums to 75, exp"):
        CocoDataset(
            write_coco(tmp_path, [annotation(2, [2, 1, 4, 4], segmentation=short)]), tmp_path
        )
    other_size = {"size": [10, 8], "counts": "a04400000o0"}
    with pytest.raises(
        AnnotationError, match=r"'segmentation.size' = \[10, 8\], expected .*\[8, 10\]"
    ):
        CocoDataset(
            write_coco(tmp_path, [annotation(2, [2, 1, 4, 4], segmentation=other_size)]), tmp_path
        )


@pytest.mark.parametrize(("size", "expected"), [((1, 1), "1x1 px"), ((10000, 10), "1000:1")])
def test_images_no_detector_can_see_are_an_error_naming_them(tmp_path, size, expected):
    width, height = size
    Image.new("RGB", size, "white").save(tmp_path / "odd.png")
    images = [{"id": 5, "file_name": "odd.png", "width": width, "height": height}]
    dataset = CocoDataset(write_coco(tmp_path, [], images), tmp_path)
    with pytest.raises(ImageLoadError, match=rf"odd\.png \(image id 5\) is .*{expected}"):
        dataset[0]


def test_image_sizes_in_the_json_must_be_positive_integers(tmp_path):
    images = [{"id": 5, "file_name": "a.png", "width": 10, "height": 0}]
    with pytest.raises(AnnotationError, match=r"image id 5 field 'height' must be a positive"):
        CocoDataset(write_coco(tmp_path, [], images), tmp_path)
