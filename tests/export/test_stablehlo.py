"""`flaxdet export --format stablehlo` (issue 18 item 6): the artifact of each model family (Mask R-CNN: the box
jit + one mask jit per row bucket; RTMDet-Ins: one predict), run by its own loader in a fresh interpreter that
imports neither Flax nor flaxdet, gives `flaxdet infer`'s detections on the same photo: boxes, scores, labels
and masks bit for bit."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from flaxdet import fast_paths
from flaxdet.cli import main
from parity_tests.goldens import GOLDENS

CASES = {"mask_rcnn": (GOLDENS / "mask_rcnn_tiny_r18", "checkpoint.pth"),
         "rtmdet_ins": (GOLDENS / "rtmdet" / "rtmdet_ins_tiny", "state_dict.pth")}
SCALE = ("480", "320")  # the photo's own size: 320 x 480, padded bucket 320 x 480

RUN = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import run_artifact
det = run_artifact.Artifact(sys.argv[1])(sys.argv[2])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "flaxdet", "torch"))
assert not bad, bad
np.savez(sys.argv[3], **{k: v for k, v in det.items() if k != "class_names"})
print(json.dumps(det["class_names"]))
"""


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    with np.load(GOLDENS / "mask_rcnn_tiny_r18" / "coco_test_12510.npz") as z:
        img = z["input_bgr_uint8"]
    path = tmp_path_factory.mktemp("img") / "photo.png"
    cv2.imwrite(str(path), img)
    return path


def test_export_options_are_checked(tmp_path, capsys):
    for argv, msg in ((["--format", "stablehlo"], "needs --shape"), (["--format", "stablehlo", "--shape", "32"],
                                                                     "takes HxW"),
                      (["--shape", "320x480"], "--shape is for --format stablehlo")):
        assert main(["export", str(tmp_path), "--out", str(tmp_path / "a"), *argv]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.goldens
@pytest.mark.parametrize("family", list(CASES))
def test_artifact_gives_flaxdet_infers_detections(family, photo, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    from flaxdet.api import convert

    src, weights = CASES[family]
    model = tmp_path / "model"
    convert(src / weights, model, src / "config.yaml")
    art = tmp_path / "artifact"
    assert main(["export", str(model), "--format", "stablehlo", "--shape", "320x480", "--scale", *SCALE,
                 "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["inputs"]["images"] == dict(shape=[1, 320, 480, 3], dtype="uint8", layout="NHWC", channels="BGR",
                                                padding=manifest["inputs"]["images"]["padding"])
    assert manifest["preprocessing"]["resize"]["scale"] == [480, 320] and manifest["canvas"] == [512, 512]
    assert len(manifest["preprocessing"]["mean"]) == 3 and "classes" in manifest and "category_ids" in manifest
    assert sorted(manifest["functions"]) == (["boxes", "masks"] if family == "mask_rcnn" else ["predict"])
    assert main(["export", str(model), "--format", "stablehlo", "--shape", "320x480", "--out", str(art)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # an existing artifact is replaced only on request

    r = subprocess.run([sys.executable, "-c", RUN, str(art), str(photo), str(tmp_path / "dets.npz")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "dets.npz")
    names = json.loads(r.stdout.strip().splitlines()[-1])

    # the artifact is traced without the onednn_conv fast path (an FFI call of flaxdet's own library): bit for bit
    # against infer on XLA's convolutions, up to float rounding against infer's default (oneDNN's, where built)
    with fast_paths.use(fast_paths.active() - {"onednn_conv"}):
        assert main(["infer", "--checkpoint", str(model), "--images", str(photo), "--out", str(tmp_path / "infer"),
                     "--scale", *SCALE, "--no-progress"]) == 0
    want = json.loads((tmp_path / "infer" / "results.json").read_text())
    assert main(["infer", "--checkpoint", str(model), "--images", str(photo), "--out", str(tmp_path / "infer_default"),
                 "--scale", *SCALE, "--no-progress"]) == 0
    default = json.loads((tmp_path / "infer_default" / "results.json").read_text())
    assert [d["category_id"] for d in default] == [d["category_id"] for d in want]
    np.testing.assert_allclose([d["score"] for d in default], [d["score"] for d in want], rtol=0, atol=1e-5)
    np.testing.assert_allclose([d["bbox"] for d in default], [d["bbox"] for d in want], rtol=0, atol=1e-2)
    assert len(want) == len(got["scores"]) > 0
    np.testing.assert_array_equal(got["scores"], np.float32([d["score"] for d in want]))
    assert got["labels"].tolist() == [d["category_id"] for d in want]
    assert names == [d.get("category_name", str(d["category_id"])) for d in want]  # no class names: numbers
    xywh = np.array([d["bbox"] for d in want])
    np.testing.assert_array_equal(got["boxes"][:, :2], np.float32(xywh[:, :2]))
    np.testing.assert_allclose(got["boxes"][:, 2:] - got["boxes"][:, :2], xywh[:, 2:], rtol=0, atol=1e-4)
    masks = np.stack([mask_utils.decode(d["segmentation"]).astype(bool) for d in want])
    np.testing.assert_array_equal(got["masks"], masks)
