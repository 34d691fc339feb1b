"""CrowdHuman odgt files: wrong but plausible records are refused or skipped, naming the
file, the line or ID and the field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from xaibench.datasets.crowdhuman import CrowdHumanDataset
from xaibench.images import ImageLoadError


def write_odgt(tmp_path, records: list[dict], size: tuple[int, int] = (40, 30)):
    for record in records:
        Image.new("RGB", size, "white").save(tmp_path / f"{record['ID']}.png")
    path = tmp_path / "val.odgt"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def person(fbox: list[float], **extra) -> dict:
    return {"tag": "person", "fbox": fbox, "vbox": fbox, "extra": {}, **extra}


def test_boxes_entirely_outside_are_skipped_and_partly_outside_kept(tmp_path):
    boxes = [person([-10, 5, 20, 20]), person([50, 5, 10, 10]), person([5, -40, 10, 20])]
    dataset = CrowdHumanDataset(write_odgt(tmp_path, [{"ID": "a", "gtboxes": boxes}]), tmp_path)
    with pytest.warns(UserWarning, match=r"ID a: skipping gtboxes \[1, 2\], whose 'fbox'"):
        sample = dataset[0]
    assert [i.id for i in sample.instances] == [0]
    assert sample.instances[0].box.tolist() == [-10, 5, 10, 25]  # a cut-off person: kept


@pytest.mark.parametrize("field", ["fbox", "vbox"])
def test_non_finite_boxes_are_an_error(tmp_path, field):
    box = person([1, 1, 5, 5])
    box[field] = [1, float("nan"), 5, 5]
    path = write_odgt(tmp_path, [{"ID": "a", "gtboxes": [box]}])
    with pytest.raises(ValueError, match=rf"line 1 \(ID a\) gtboxes\[0\]: field '{field}' .*fin"):
        CrowdHumanDataset(path, tmp_path)


def test_repeated_ids_are_an_error(tmp_path):
    path = write_odgt(tmp_path, [{"ID": "a", "gtboxes": []}, {"ID": "a", "gtboxes": []}])
    with pytest.raises(ValueError, match=r"line 2: ID 'a' already appears on line 1"):
        CrowdHumanDataset(path, tmp_path)


def test_an_image_no_detector_can_see_is_an_error(tmp_path):
    path = write_odgt(tmp_path, [{"ID": "dot", "gtboxes": []}], size=(1, 1))
    with pytest.raises(ImageLoadError, match=r"dot\.png \(ID dot\) is 1x1 px"):
        CrowdHumanDataset(path, tmp_path)[0]
