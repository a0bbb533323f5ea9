"""`flaxdet eval` reports a statistic pycocotools cannot compute (its -1) as undefined, with the reason -- not as
mAP 0.0000 (issue 19). The model is replaced by canned detections: this is about the bookkeeping."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

import flaxdet.evaluation as evaluation
import flaxdet.tools as tools
from flaxdet.cli import main
from flaxdet.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_synthetic_coco(root, num_images=2, seed=0, min_size=(64, 64), max_size=(64, 64))


def _fake_model(monkeypatch, dets):
    """evaluate() on canned detections: ``dets`` maps nothing -> the same list of (box, score, label) per image."""
    monkeypatch.setattr(evaluation, "num_classes_of", lambda cfg: 3)

    def predict_fn(model, backend, classes, bucket="exact", dtype=None):
        def run(img, meta):
            return dict(bboxes=np.array([d[0] for d in dets], np.float32).reshape(-1, 4),
                        scores=np.array([d[1] for d in dets], np.float32), labels=np.array([d[2] for d in dets]))
        return run

    monkeypatch.setattr(evaluation, "_predict_fn", predict_fn)
    return types.SimpleNamespace(cfg=None)


def _without_annotations(coco, tmp_path):
    data = json.loads(coco.read_text())
    data["annotations"] = []
    p = tmp_path / "empty.json"
    p.write_text(json.dumps(data))
    return p


def test_no_ground_truth_is_undefined(coco, tmp_path, monkeypatch):
    model = _fake_model(monkeypatch, [([2, 2, 30, 30], 0.9, 0)])
    m = evaluation.evaluate(model, _without_annotations(coco, tmp_path), coco.parent / "images", (64, 64),
                            progress=False)
    assert m["bbox_mAP"] is None and "no ground-truth objects" in m["undefined"]["bbox_mAP"]


def test_no_detections_with_ground_truth_is_zero(coco, monkeypatch):
    model = _fake_model(monkeypatch, [])
    m = evaluation.evaluate(model, coco, None, (64, 64), progress=False)
    assert m["bbox_mAP"] == 0.0 and m["num_detections"] == 0
    assert m["bbox_mAP_l"] is None and "large" in m["undefined"]["bbox_mAP_l"]  # 64x64 images: no large objects


def test_cli_prints_undefined(coco, tmp_path, monkeypatch, capsys):
    model = _fake_model(monkeypatch, [([2, 2, 30, 30], 0.9, 0)])
    monkeypatch.setattr(tools, "load_any_model", lambda *a, **k: (model, None))
    rc = main(["eval", "--checkpoint", str(tmp_path), "--ann", str(_without_annotations(coco, tmp_path)),
               "--images", str(coco.parent / "images"), "--out", str(tmp_path / "ev"), "--scale", "64", "64",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "0.0000" not in out
    assert any(line.startswith("bbox_mAP ") and "undefined" in line for line in out.splitlines()), out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["bbox_mAP"] is None and m["undefined"]["bbox_mAP"]
