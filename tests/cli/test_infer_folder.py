"""Pipelined inference over many images (issue 18 item 5): folders and globs as inputs, batches by shape bucket,
results in input order and the same as the one-by-one path; `flaxdet infer` on a folder and a glob.

Model: the golden tiny RTMDet-Ins (../shared/goldens; one jit per shape, masks) converted into a model
directory -- the pipeline only calls ``Detector.detect``, the same for every family. Photos: the goldens' recorded
images written as files (two shape buckets at the test scale), an unreadable file and a file that is not an image
by its suffix.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from flaxdet.inference import Detector, _round_up, expand_inputs, plan_batches
from parity_tests.goldens import GOLDENS

CASE = GOLDENS / "rtmdet" / "rtmdet_ins_tiny"
SCALE = (480, 320)


def test_plan_batches():
    """By bucket, full batches first; a batch whose first image falls ``window`` positions behind goes early."""
    keys = ["a", "b", "a", None, "a", "b", "c", "a", "a"]
    assert plan_batches(keys, 2) == [[0, 2], [1, 5], [4, 7], [6], [8]]
    assert plan_batches(keys, 1) == [[0], [1], [2], [4], [5], [6], [7], [8]]
    assert plan_batches(keys, 3, window=4) == [[0, 2, 4], [1, 5], [6], [7, 8]]
    assert sorted(i for b in plan_batches(keys, 4, window=2) for i in b) == [0, 1, 2, 4, 5, 6, 7, 8]


def test_expand_inputs(tmp_path):
    for name in ("b.JPG", "a.png", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    got = expand_inputs([tmp_path, str(tmp_path / "*.png"), tmp_path / "c.txt", empty, str(tmp_path / "*.gif")])
    assert got[:4] == [tmp_path / "a.png", tmp_path / "b.JPG", tmp_path / "a.png", tmp_path / "c.txt"]
    assert "folder without image files" in str(got[4]) and "no file matches" in str(got[5])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from flaxdet.api import convert

    d = tmp_path_factory.mktemp("model") / "m"
    convert(CASE / "state_dict.pth", d, CASE / "config.yaml")
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """5 inputs in a folder (sorted): 3 landscape photos of one bucket, 1 portrait, 1 unreadable (+ a .txt)."""
    root = tmp_path_factory.mktemp("photos")
    with np.load(CASE / "coco_test_12510.npz") as z:
        land = z["input_bgr_uint8"]  # 320 x 480
    with np.load(CASE / "voc_000001.npz") as z:
        port = z["input_bgr_uint8"]  # 500 x 353: 453 x 320 at the test scale
    cv2.imwrite(str(root / "a.jpg"), land)
    cv2.imwrite(str(root / "b.png"), land[::-1])
    cv2.imwrite(str(root / "c.png"), port)
    (root / "d.jpg").write_bytes(b"not an image")
    cv2.imwrite(str(root / "e.png"), land[:, ::-1])
    (root / "notes.txt").write_text("not an input")
    return root


def _same(a, b):
    for k in ("boxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


@pytest.mark.goldens
def test_stream_equals_one_by_one_and_same_batches(model_dir, photos):
    import flaxdet

    det = flaxdet.load(model_dir)
    assert isinstance(det, Detector)
    # batch 1: the pipeline gives what one image at a time gives, in input order, the unreadable one in place
    got = list(det.stream(photos, batch_size=1, scale=SCALE, workers=2))
    assert [s.name for s, _ in got] == ["a.jpg", "b.png", "c.png", "d.jpg", "e.png"]
    assert isinstance(got[3][1], ValueError) and "cannot decode" in str(got[3][1])
    for (src, r) in got[:3] + got[4:]:
        assert len(r) > 0 and r.masks.shape[1:] == cv2.imread(str(src)).shape[:2]
        _same(r, det(src, scale=SCALE))
    # batch 2: batches by bucket as plan_batches forms them, each the same as Detector.detect on those images
    files = [photos / n for n in ("a.jpg", "b.png", "c.png", "d.jpg", "e.png")]
    pipelined = list(det.stream([str(photos / "*.*")], batch_size=2, scale=SCALE, workers=1))
    assert [s.name for s, _ in pipelined] == ["a.jpg", "b.png", "c.png", "d.jpg", "e.png", "notes.txt"]
    assert all(isinstance(r, ValueError) for _, r in pipelined[3::2])
    from flaxdet.data.transforms import load_image, resize_keep_ratio

    prepared = {i: resize_keep_ratio(load_image(f), SCALE) for i, f in enumerate(files) if f.name != "d.jpg"}
    keys = [tuple(_round_up(v, 32) for v in prepared[i][0].shape[:2]) if i in prepared else None for i in range(5)]
    groups = plan_batches(keys, 2)
    assert groups == [[0, 1], [2], [4]]
    for g in groups:
        want = det.detect([prepared[i][0] for i in g], [prepared[i][1] for i in g])
        for i, w in zip(g, want):
            r = pipelined[i][1]
            for k, v in (("boxes", "bboxes"), ("scores", "scores"), ("labels", "labels"), ("masks", "masks")):
                np.testing.assert_array_equal(getattr(r, k), w[v])


@pytest.mark.goldens
def test_cli_infer_on_a_folder_and_a_glob(model_dir, photos, tmp_path, capsys):
    from flaxdet.cli import main

    rc = main(["infer", "--checkpoint", str(model_dir), "--images", str(photos), str(photos / "a.*"), "--out",
               str(tmp_path / "o"), "--scale", *map(str, SCALE), "--no-progress", "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and f"skipping: cannot decode image {photos / 'd.jpg'}" in out, out
    images = json.loads((tmp_path / "o" / "images.json").read_text())
    assert [im["file_name"] for im in images["images"]] == [str(photos / n) for n in
                                                            ("a.jpg", "b.png", "c.png", "e.png", "a.jpg")]
    assert [im["overlay"] for im in images["images"]][-1] == "overlays/a-2.png"
    assert images["skipped"] == [str(photos / "d.jpg")]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    first = [r for r in res if r["image_id"] == 1]
    assert first == [dict(r, image_id=1) for r in res if r["image_id"] == 5]  # a.jpg twice: the same rows
    assert len(first) > 0 and "segmentation" in first[0]
