"""RTMDet and RTMDet-Ins through the real CLI on the recorded visdet goldens (../shared/goldens/rtmdet): ``flaxdet
presets``, ``convert`` (raw state dict + YAML, runner checkpoint + preset-style YAML taking its class count from the
checkpoint), ``export`` (bit-identical round trip), ``parity`` against reference/, ``infer`` (the same detections as
the Python API and as reference/ on the same resized image), ``eval`` and the bad-input errors.

Each command is a subprocess on real files. The conversions are module fixtures shared by the tests; the session's
XLA cache (conftest.py) keeps every compilation, also the ~50 small random-init programs building a model compiles.
"""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import flaxdet
from flaxdet.config import load_config
from flaxdet.data.synthetic import make_synthetic_coco
from flaxdet.data.transforms import prepare_test_image
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_reference import build_detector as build_ref
from flaxdet_reference.models import load_state_dict_strict
from parity_tests.goldens import GOLDENS

pytestmark = pytest.mark.goldens

CASES = ("rtmdet_tiny", "rtmdet_ins_tiny")  # 5 and 4 classes
PRESETS = [f"rtmdet_{ins}{size}" for ins in ("", "ins_") for size in ("tiny", "s", "m", "l", "x")]
PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args, rc=0):
    r = subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == rc, f"flaxdet {args[0]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _one_error_line(r, command):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flaxdet {command}: error: "), r.stderr
    return lines[0]


def golden(case, name):
    return GOLDENS / "rtmdet" / case / name


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """The goldens' 'color' photo (288x512, the same in both cases) as a PNG: resized to 360x640 by the test
    pipeline."""
    with np.load(golden("rtmdet_tiny", "color.npz")) as z:
        img = z["input_bgr_uint8"]
    path = tmp_path_factory.mktemp("img") / "color.png"
    cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> flaxdet model dir converted from the golden raw state dict with the golden YAML."""
    out = {}
    for case in CASES:
        model = tmp_path_factory.mktemp(case) / "model"
        r = _cli("convert", golden(case, "state_dict.pth"), "--config", golden(case, "config.yaml"), "--out", model)
        assert f"wrote {model}" in r.stdout and "num_classes" not in r.stdout, r.stdout  # the YAML sets it
        out[case] = model
    return out


def test_presets_lists_the_ten_rtmdet_presets():
    lines = _cli("presets").stdout.splitlines()
    rtm = [line.split()[0] for line in lines if line.split()[1] == "RTMDet"]
    assert sorted(rtm) == sorted(PRESETS), lines
    ins = [line for line in lines if line.startswith("rtmdet_ins_tiny ")][0]
    assert "RTMDetInsSepBNHead" in ins and "classes from the checkpoint" in ins


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip_is_bit_identical(case, converted, tmp_path):
    """golden state dict -> convert -> export: the same keys in the same order (each shared conv under all its
    names), dtypes and bits."""
    back = tmp_path / "back.pth"
    r = _cli("export", converted[case], "--out", back)
    want = torch.load(golden(case, "state_dict.pth"), map_location="cpu")
    assert f"wrote {len(want)} keys to {back}" in r.stdout
    got = load_checkpoint(back).state_dict
    assert list(got) == list(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == v.numpy().dtype and np.array_equal(g, v.numpy()), k
    shared = [k for k in want if k.startswith(("bbox_head.cls_convs.2.", "bbox_head.reg_convs.1.")) and ".conv." in k]
    assert len(shared) == 4  # share_conv: levels 1 and 2 reuse level 0's convs (their BNs are their own)
    for k in shared:
        assert np.array_equal(np.asarray(got[k]), want[k.replace("s.2.", "s.0.").replace("s.1.", "s.0.")].numpy())


def test_convert_runner_checkpoint_takes_num_classes_from_it(tmp_path):
    """A preset-style YAML (visdet's presets leave bbox_head.num_classes out) + the runner checkpoint: the class
    count comes from bbox_head.rtm_cls, the class names from meta; --num-classes disagreeing is one error line."""
    case = "rtmdet_ins_tiny"
    text = golden(case, "config.yaml").read_text()
    assert "  num_classes: 4\n" in text
    preset_style = tmp_path / "rtmdet_ins_tiny_preset.yaml"
    preset_style.write_text(text.replace("  num_classes: 4\n", ""))
    model = tmp_path / "model"
    r = _cli("convert", golden(case, "checkpoint.pth"), "--config", preset_style, "--out", model)
    assert "num_classes: 4 (from the checkpoint's bbox_head.rtm_cls.0.weight)" in r.stdout.splitlines(), r.stdout
    meta = json.loads((model / "meta.json").read_text())
    assert meta["classes"] == [f"class_{i}" for i in range(4)]

    r = _cli("convert", golden(case, "checkpoint.pth"), "--config", preset_style, "--num-classes", 3,
             "--out", tmp_path / "bad", rc=2)
    assert "--num-classes is 3 but" in _one_error_line(r, "convert") and "has 4 classes" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_family_mismatch_is_one_error_line(photo, tmp_path):
    r = _cli("convert", golden("rtmdet_tiny", "checkpoint.pth"), "--config", "mask_rcnn_r50", "--out", tmp_path / "a",
             rc=2)
    assert "is an RTMDet checkpoint" in _one_error_line(r, "convert")
    r = _cli("infer", "--checkpoint", GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth", "--config", "rtmdet_tiny",
             "--images", photo, "--out", tmp_path / "b", rc=2)
    assert "is a two-stage checkpoint" in _one_error_line(r, "infer")
    # an RTMDet-Ins checkpoint with an RTMDet (boxes only) config: a conversion error (kernel_convs.* unexpected)
    # before any PyTorch model is built
    det_cfg = tmp_path / "rtmdet_tiny_preset.yaml"
    det_cfg.write_text(golden("rtmdet_tiny", "config.yaml").read_text().replace("  num_classes: 5\n", ""))
    r = _cli("parity", "--checkpoint", golden("rtmdet_ins_tiny", "checkpoint.pth"), "--config", det_cfg,
             "--image", photo, "--out", tmp_path / "c", rc=2)
    assert r.stderr.startswith("flaxdet parity: error: checkpoint does not fit RTMDet") and "Traceback" not in r.stderr
    assert "bbox_head.kernel_convs.0.0.conv.weight" in r.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("case", CASES)
def test_parity_against_reference(case, photo, tmp_path):
    out = tmp_path / "parity"
    r = _cli("parity", "--checkpoint", golden(case, "checkpoint.pth"), "--config", golden(case, "config.yaml"),
             "--image", photo, "--out", out)
    stages = ["preprocessed", "backbone.2", "neck.0", "cls_scores.0", "bbox_preds.2", "det.order", "det.bboxes",
              "det.scores", "det.labels"]
    if case == "rtmdet_ins_tiny":
        stages += ["mask_feats", "kernel_preds.1", "det.masks", "det.mask_logits_first16"]
    for stage in stages:
        assert any(line.split()[0] == stage and "PASS" in line for line in r.stdout.splitlines() if line), stage
    assert "\nPASS: " in r.stdout
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["img_shape"] == [360, 640] and report["ori_shape"] == [288, 512]
    assert not any(s["stage"].startswith(("proposals", "rpn_head", "bbox_roi")) for s in report["stages"])
    assert (out / "parity.png").read_bytes()[:8] == PNG


def _xyxy(results):
    boxes = np.array([d["bbox"] for d in results], np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


@pytest.mark.parametrize("case", CASES)
def test_infer_equals_api_and_reference(case, converted, photo, tmp_path):
    """`flaxdet infer` on the converted model dir == flaxdet.load(runner checkpoint) on the same file, and ==
    reference/ on the same resized image (visdet's test pipeline) to the parity contract."""
    out = tmp_path / "infer"
    r = _cli("infer", "--checkpoint", converted[case], "--images", photo, "--out", out, "--no-progress")
    res = json.loads((out / "results.json").read_text())
    assert f"{len(res)} detections on 1 image(s)" in r.stdout
    assert json.loads((out / "images.json").read_text())["images"][0]["height"] == 288
    assert (out / "overlays" / "color.png").read_bytes()[:8] == PNG
    labels = np.array([d["category_id"] for d in res])  # the label index, as for Mask R-CNN
    scores = np.array([d["score"] for d in res])
    assert len(res) > 20 and np.all(np.diff(scores) <= 0)

    api = flaxdet.load(golden(case, "checkpoint.pth"), config=golden(case, "config.yaml"))(photo)
    assert len(api) == len(res) and api.class_names[0] == f"class_{labels[0]}"
    np.testing.assert_array_equal(labels, api.labels)
    np.testing.assert_array_equal(scores.astype(np.float32), api.scores)
    np.testing.assert_array_equal(_xyxy(res).astype(np.float32), api.boxes)

    cfg = load_config(golden(case, "config.yaml"))
    ref = build_ref(cfg)
    load_state_dict_strict(ref, load_checkpoint(golden(case, "checkpoint.pth")).state_dict)
    img, meta = prepare_test_image(photo, (640, 640))
    want = {k: v.numpy() for k, v in
            ref.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous()], [meta])[0].items()}
    assert len(res) == len(want["scores"])
    np.testing.assert_array_equal(labels, want["labels"])
    np.testing.assert_allclose(_xyxy(res), want["bboxes"], atol=1e-2)
    np.testing.assert_allclose(scores, want["scores"], atol=1e-4)

    if case == "rtmdet_ins_tiny":
        from pycocotools import mask as mask_utils

        masks = np.stack([mask_utils.decode(d["segmentation"]).astype(bool) for d in res])
        assert masks.shape == (len(res), 288, 512) and masks.any()
        np.testing.assert_array_equal(masks, api.masks)
        assert (masks != want["masks"]).sum() <= 64  # flaxdet.parity.MASK_PIXELS_PER_IMAGE
    else:
        assert api.masks is None and all("segmentation" not in d for d in res)


def test_eval_on_a_coco_set(converted, tmp_path):
    """A 4-image synthetic COCO set with 5 categories: rtmdet_tiny (5 classes) evaluates, boxes only;
    rtmdet_ins_tiny (4 classes) is refused with one line."""
    ann = make_synthetic_coco(tmp_path / "coco", 4, seed=0, classes=("circle", "square", "triangle", "t4", "t5"),
                              min_size=(288, 512), max_size=(288, 512))  # the photo's size: its compiled shape
    out = tmp_path / "eval"
    r = _cli("eval", "--checkpoint", converted["rtmdet_tiny"], "--ann", ann, "--out", out, "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["num_detections"] > 0, metrics
    assert "bbox_mAP" in metrics and "segm_mAP" not in metrics and "bbox_mAP" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert {d["category_id"] for d in results} <= {1, 2, 3, 4, 5}  # the annotation file's ids

    assert metrics["dtype"] == "float32"
    # bf16 (mixed precision): the same set evaluates, the dtype recorded; the reference backend refuses it
    r = _cli("eval", "--checkpoint", converted["rtmdet_tiny"], "--ann", ann, "--out", tmp_path / "bf16",
             "--dtype", "bfloat16", "--no-progress")
    m16 = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert m16["dtype"] == "bfloat16" and m16["num_images"] == 4 and m16["num_detections"] > 0, m16
    assert m16["bbox_mAP"] is not None
    r = _cli("eval", "--checkpoint", converted["rtmdet_tiny"], "--ann", ann, "--out", tmp_path / "e3",
             "--dtype", "bfloat16", "--backend", "reference", rc=2)
    assert "--dtype bfloat16 is a flaxdet option" in _one_error_line(r, "eval")

    r = _cli("eval", "--checkpoint", converted["rtmdet_ins_tiny"], "--ann", ann, "--out", tmp_path / "e2", rc=2)
    assert "the model predicts 4 classes but" in _one_error_line(r, "eval") and "has 5 categories" in r.stderr
