"""The README's Python example runs as written, and the Python API it shows gives what the CLI's path gives.

The example names ``checkpoint.pth`` and ``photo.jpg`` in the working directory: the test runs it in a fresh
folder holding a real visdet runner checkpoint (it carries its config) and a real photo, in a new interpreter.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from parity_tests.goldens import GOLDENS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.goldens


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "checkpoint.pth").write_bytes((GOLDENS / "runner_tiny_r18" / "epoch_1.pth").read_bytes())
    with np.load(GOLDENS / "mask_rcnn_tiny_r18" / "color.npz") as z:
        cv2.imwrite(str(d / "photo.jpg"), z["input_bgr_uint8"])
    return d


def test_readme_python_example_runs_as_written(workdir):
    code = readme_python_example()
    assert "flaxdet.load(" in code
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2, r.stdout
    assert re.fullmatch(r"\(\d+, \d+, \d+\)", lines[-1]), lines[-1]  # the masks' shape: a Mask R-CNN
    h, w = cv2.imread(str(workdir / "photo.jpg")).shape[:2]
    assert lines[-1].endswith(f", {h}, {w})")


def test_api_matches_the_detector_on_the_test_pipeline(workdir):
    import flaxdet
    from flaxdet.data.transforms import prepare_test_image

    det = flaxdet.load(workdir / "checkpoint.pth")
    one = det(workdir / "photo.jpg")
    img, meta = prepare_test_image(workdir / "photo.jpg")
    ref = det.detect([img], [meta])[0]
    np.testing.assert_array_equal(one.boxes, ref["bboxes"])
    np.testing.assert_array_equal(one.labels, ref["labels"])
    np.testing.assert_array_equal(one.masks, ref["masks"])
    assert len(one) == len(ref["scores"]) > 0
    assert set(one.class_names) <= set(det.classes)
    # a list of paths and arrays: one result each, the same as one at a time
    both = det([workdir / "photo.jpg", cv2.imread(str(workdir / "photo.jpg"))])
    assert len(both) == 2
    for r in both:
        np.testing.assert_array_equal(r.boxes, one.boxes)
    # the weights as a pytree named like visdet's keys
    leaves = {".".join(map(str, p)) for p, _ in det.params.flat_state()}
    assert "roi_head.bbox_head.fc_cls.weight" in leaves
    with pytest.raises(ValueError, match="uint8"):
        det(np.zeros((8, 8), np.float32))
