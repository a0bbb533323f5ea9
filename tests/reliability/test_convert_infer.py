"""convert / export / infer on damaged or unusual models (issue 19): class names fewer than the head's classes, dtypes
other than float32 (warned, recorded, restored on export), NaN/Inf weights, and infer's bookkeeping (results kept
after a crash, no IndexError on short class lists, non-zero exit when nothing was read, empty folders named as such,
unique overlay names, COCO category ids from the model directory). The detector is replaced by canned detections
where only the bookkeeping is under test (no compile)."""
from __future__ import annotations

import json
import shutil

import cv2
import ml_dtypes
import numpy as np
import pytest

import flaxdet.tools as tools
from flaxdet.cli import main
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from parity_tests.goldens import GOLDENS, require_goldens

pytestmark = pytest.mark.goldens
CASE = "mask_rcnn_tiny_r18"  # 5 classes


def G(name):
    return GOLDENS / CASE / name


@pytest.fixture(scope="module")
def source():
    require_goldens()
    return load_checkpoint(G("checkpoint.pth"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("model") / "m"
    tools.convert_checkpoint(G("checkpoint.pth"), G("config.yaml"), out, log=lambda *a: None)
    return out


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------------- convert

def test_fewer_class_names_than_classes_is_an_error_at_convert(source, tmp_path, capsys):
    ck = save_checkpoint(tmp_path / "three.pth", source.state_dict, classes=["a", "b", "c"])
    rc, _, err = _run(["convert", ck, "--config", G("config.yaml"), "--out", tmp_path / "m"], capsys)
    assert rc == 2 and "names 3 classes" in err and "predicts 5" in err and "--classes" in err, err
    assert not (tmp_path / "m").exists()
    rc, _, err = _run(["convert", ck, "--config", G("config.yaml"), "--out", tmp_path / "m", "--classes",
                       *"vwxyz"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["classes"] == list("vwxyz")


def test_dtypes_are_warned_recorded_and_restored(source, tmp_path, capsys):
    sd = dict(source.state_dict)
    keys = [k for k, v in sd.items() if v.dtype == np.float32]
    want = {keys[0]: np.float16, keys[1]: np.float64, keys[2]: np.int32, keys[3]: ml_dtypes.bfloat16}
    for k, dt in want.items():
        sd[k] = (np.round(sd[k] * 100) if dt is np.int32 else sd[k]).astype(dt)
    src = save_checkpoint(tmp_path / "mixed.pth", sd, classes=source.classes)
    rc, out, err = _run(["convert", src, "--config", G("config.yaml"), "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert "warning: 4 tensors stored in another dtype" in out and "float16 -> float32" in out, out
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["source_dtypes"] == {k: np.dtype(dt).name for k, dt in want.items()}
    for ext in ("pth", "safetensors"):
        rc, _, err = _run(["export", tmp_path / "m", "--out", tmp_path / f"back.{ext}"], capsys)
        assert rc == 0, err
        back = load_checkpoint(tmp_path / f"back.{ext}")
        for k, dt in want.items():
            got = back.state_dict[k]
            if ext == "pth" and dt is ml_dtypes.bfloat16:  # the reader widens bfloat16 (and says so)
                assert back.source_dtypes[k] == "bfloat16" and got.dtype == np.float32
                got = got.astype(ml_dtypes.bfloat16)
            assert got.dtype == np.dtype(dt), (ext, k, got.dtype)
            assert np.array_equal(got, sd[k]), (ext, k)


def test_nonfinite_weights_are_reported(source, tmp_path, capsys):
    sd = dict(source.state_dict)
    k = next(k for k, v in sd.items() if v.dtype == np.float32 and v.size > 4)
    sd[k] = sd[k].copy()
    sd[k].flat[:3] = [np.nan, np.inf, -np.inf]
    src = save_checkpoint(tmp_path / "nan.pth", sd, classes=source.classes)
    rc, out, err = _run(["convert", src, "--config", G("config.yaml"), "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert "NaN/Inf" in out and f"{k}: 3 of {sd[k].size} values" in out, out
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["nonfinite"] == 1


def test_overwrite_replaces_a_model_dir(model_dir, tmp_path, capsys):
    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    (target / "stale").write_text("x")
    rc, _, err = _run(["convert", G("checkpoint.pth"), "--config", G("config.yaml"), "--out", target,
                       "--overwrite"], capsys)
    assert rc == 0, err
    assert not (target / "stale").exists() and (target / "meta.json").is_file()


# --------------------------------------------------------------------------------------------------- infer

class FakeDetector:
    """Stands in for flaxdet.inference.Detector: per image, detections with labels 0..4 (and a crash on demand)."""

    crash_on = None
    calls = 0

    def __init__(self, model, classes=None, dtype=None):
        self.classes = classes

    def detect(self, images, metas, bucket="exact"):
        FakeDetector.calls += 1
        if FakeDetector.calls == FakeDetector.crash_on:
            raise RuntimeError("the device went away")
        return [dict(bboxes=np.array([[1, 1, 9, 9]] * 5, np.float32), scores=np.linspace(0.9, 0.5, 5, dtype=np.float32),
                     labels=np.arange(5)) for _ in images]


@pytest.fixture
def fake(monkeypatch):
    FakeDetector.calls, FakeDetector.crash_on = 0, None
    monkeypatch.setattr(tools, "Detector", FakeDetector)
    return FakeDetector


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    img = np.full((24, 32, 3), 127, np.uint8)
    for d in ("a", "b"):
        (root / d).mkdir()
        cv2.imwrite(str(root / d / "x.png"), img)
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def _edit_meta(model_dir, tmp_path, **changes):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _infer(model, images, out, capsys, *extra):
    return _run(["infer", "--checkpoint", model, "--images", *images, "--out", out, "--no-progress", *extra], capsys)


def test_short_class_list_does_not_crash_infer(fake, model_dir, photos, tmp_path, capsys):
    """A model dir from before the convert-time check, naming 3 of 5 classes: labels 3 and 4 get numbers."""
    model = _edit_meta(model_dir, tmp_path, classes=["a", "b", "c"])
    rc, out, err = _infer(model, [photos / "a" / "x.png"], tmp_path / "o", capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["category_name"] for r in res] == ["a", "b", "c", "3", "4"]
    assert "names 3 classes" in out


def test_results_survive_a_crash(fake, model_dir, photos, tmp_path, capsys):
    fake.crash_on = 2
    rc, _, err = _infer(model_dir, [photos / "a" / "x.png", photos / "b" / "x.png"], tmp_path / "o", capsys)
    assert rc == 2 and "the device went away" in err and "Traceback" not in err
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(json.loads(lines[0])["results"]) == 5
    assert json.loads(lines[0])["image"]["file_name"] == str(photos / "a" / "x.png")


def test_nothing_readable_is_an_error(fake, model_dir, photos, tmp_path, capsys):
    empty = tmp_path / "empty"  # a folder is read as its image files (issue 18): this one has none
    empty.mkdir()
    rc, out, err = _infer(model_dir, [empty, photos / "broken.jpg", photos / "nope.jpg"], tmp_path / "o", capsys)
    assert rc == 2 and "none of the 3 input(s) could be read" in err, err
    assert f"skipping: {empty} is a folder without image files" in out, out
    assert "cannot decode image" in out and "image not found" in out
    assert not (tmp_path / "o" / "results.json").exists()


def test_overlay_names_are_unique(fake, model_dir, photos, tmp_path, capsys):
    rc, out, err = _infer(model_dir, [photos / "a" / "x.png", photos / "b" / "x.png", photos / "a" / "x.png"],
                          tmp_path / "o", capsys)
    assert rc == 0, err
    images = json.loads((tmp_path / "o" / "images.json").read_text())["images"]
    assert [im["overlay"] for im in images] == ["overlays/x.png", "overlays/x-2.png", "overlays/x-3.png"]
    assert sorted(p.name for p in (tmp_path / "o" / "overlays").iterdir()) == ["x-2.png", "x-3.png", "x.png"]
    assert not (tmp_path / "o" / "results.jsonl").exists()  # merged into results.json at the end


def test_category_ids_from_the_model_dir(fake, model_dir, photos, tmp_path, capsys):
    model = _edit_meta(model_dir, tmp_path, category_ids=[3, 7, 11, 13, 90])
    rc, _, err = _infer(model, [photos / "a" / "x.png"], tmp_path / "o", capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["category_id"] for r in res] == [3, 7, 11, 13, 90]
    rc, _, err = _infer(model_dir, [photos / "a" / "x.png"], tmp_path / "o2", capsys)  # none kept: 0-based labels
    assert [r["category_id"] for r in json.loads((tmp_path / "o2" / "results.json").read_text())] == [0, 1, 2, 3, 4]
