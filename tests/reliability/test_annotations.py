"""Damaged training annotations are one DatasetError line naming the file, the annotation and what to do -- raised
when the dataset is read, not as a traceback from the loader thread at some training step (issue 19)."""
from __future__ import annotations

import json

import pytest

from flaxdet.data.coco import CocoDataset, DatasetError
from flaxdet.data.synthetic import make_synthetic_coco


def _damage(data, case):
    a = data["annotations"][0]
    im = next(i for i in data["images"] if i["id"] == a["image_id"])
    if case == "empty_segmentation":
        a["segmentation"] = []
    elif case == "rle_size":
        a["segmentation"] = {"size": [im["height"] + 1, im["width"]], "counts": [im["height"] * im["width"]]}
    elif case == "four_number_polygon":
        a["segmentation"] = [[1, 1, 5, 5]]
    elif case == "no_categories":
        data["categories"] = []
    elif case == "nan_bbox":
        a["bbox"] = [float("nan"), 1, 5, 5]
    elif case == "string_polygon":
        a["segmentation"] = [["1", "2", "3", "4", "5", "6"]]
    return data


CASES = {
    "empty_segmentation": "empty segmentation list",
    "rle_size": "RLE size",
    "four_number_polygon": "a polygon of 4 numbers",
    "no_categories": "'categories' is empty",
    "nan_bbox": "non-finite bbox",
    "string_polygon": "not a list of numbers",
}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_synthetic_coco(root, num_images=2, seed=0, min_size=(64, 64), max_size=(64, 64))


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_annotation_is_one_line(coco, tmp_path, case):
    data = _damage(json.loads(coco.read_text()), case)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))  # json writes NaN as NaN, which Python's json reads back
    with pytest.raises(DatasetError) as e:
        CocoDataset(bad, coco.parent / "images")
    msg = str(e.value)
    assert CASES[case] in msg and str(bad) in msg and "\n" not in msg, msg


def test_good_annotations_still_load(coco):
    ds = CocoDataset(coco)
    assert len(ds) == 2 and all(ds.masks(r).shape[0] == len(r.anns) for r in ds.records)
