"""Real CLI runs of `flaxdet parity` and `flaxdet infer` on a recorded visdet case (../shared/goldens)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from parity_tests.goldens import GOLDENS, require_goldens

pytestmark = pytest.mark.goldens

CASE = "mask_rcnn_tiny_r18"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """The golden 'color' photo as a PNG file (288x512, fed to visdet at its own size)."""
    require_goldens()
    with np.load(GOLDENS / CASE / "color.npz") as z:
        img, dets = z["input_bgr_uint8"], {k[4:]: z[k] for k in z.files if k.startswith("det.")}
    path = tmp_path_factory.mktemp("img") / "color.png"
    cv2.imwrite(str(path), img)
    return path, dets


@pytest.mark.slow  # ~1.5 min on 2 cores (two models, compile); `make demo` runs the same path by default
def test_cli_parity_against_reference(photo, tmp_path):
    img, _ = photo
    out = tmp_path / "parity"
    r = _cli("parity", "--config", GOLDENS / CASE / "config.yaml", "--checkpoint", GOLDENS / CASE / "checkpoint.pth",
             "--image", img, "--out", out, "--scale", 512, 288)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("backbone.3", "proposals.order", "det.bboxes", "det.masks", "mask_head.mask_preds"):
        assert any(line.startswith(stage) and "PASS" in line for line in r.stdout.splitlines()), stage
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["against"] == "reference"
    assert (out / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("visdet") is not None, reason="visdet is installed here")
def test_cli_parity_against_visdet_says_it_is_missing(photo, tmp_path):
    img, _ = photo
    r = _cli("parity", "--config", GOLDENS / CASE / "config.yaml", "--checkpoint", GOLDENS / CASE / "checkpoint.pth",
             "--image", img, "--out", tmp_path / "p", "--against", "visdet")
    assert r.returncode != 0
    assert "visdet is not importable" in r.stderr and "--against reference" in r.stderr
    assert not (tmp_path / "p").exists()


def test_cli_infer_gives_visdets_detections(photo, tmp_path):
    """`flaxdet infer` on the image file (decode, keep-ratio resize to 512x288 = its own size, model) gives
    visdet's recorded detections: same count, labels, boxes within 1e-2 px, scores within 1e-4."""
    img, want = photo
    out = tmp_path / "infer"
    r = _cli("infer", "--checkpoint", GOLDENS / CASE / "checkpoint.pth", "--config", GOLDENS / CASE / "config.yaml",
             "--images", img, "--out", out, "--scale", 512, 288, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert json.loads((out / "images.json").read_text())["images"][0]["height"] == 288
    assert len(res) == len(want["scores"])  # one image: rows in score order, as visdet's
    boxes = np.array([d["bbox"] for d in res])
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    np.testing.assert_allclose(boxes, want["bboxes"], atol=1e-2)
    np.testing.assert_allclose([d["score"] for d in res], want["scores"], atol=1e-4)
    assert [d["category_id"] for d in res] == [int(v) for v in want["labels"]]  # label index, as visdet's
    from pycocotools import mask as mask_utils

    m0 = mask_utils.decode(res[0]["segmentation"]).astype(bool)
    assert m0.shape == want["masks"].shape[1:] and (m0 != want["masks"][0]).sum() <= 64
    assert (out / "overlays" / "color.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
