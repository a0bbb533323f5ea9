"""The COCO-format dataset (flaxdet.data.coco.CocoDataset): bad files and bad entries are named."""
from __future__ import annotations

import json

import pytest

from flaxdet.data.coco import CocoDataset, DatasetError
from flaxdet.data.synthetic import make_synthetic_coco


def test_bad_data_is_named(tmp_path):
    ann = make_synthetic_coco(tmp_path / "d", num_images=3, seed=1)
    data = json.loads(ann.read_text())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset(tmp_path / "bad.json", tmp_path / "d" / "images")
    (tmp_path / "nococo.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="no 'annotations' list"):
        CocoDataset(tmp_path / "nococo.json")
    data["images"].append(dict(id=99, file_name="missing.png", height=10, width=10))
    data["annotations"].append(dict(id=999, image_id=1, category_id=1, bbox=[5, 5, 0, 10], iscrowd=0,
                                    segmentation=[[5, 5, 5, 15, 5, 15]], area=0))
    (tmp_path / "d" / "x.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning) as w:
        ds = CocoDataset(tmp_path / "d" / "x.json")
    msgs = " | ".join(str(x.message) for x in w)
    assert "missing image" in msgs and "missing.png" in msgs
    assert "degenerate box" in msgs and "999" in msgs
    assert len(ds) == 3
