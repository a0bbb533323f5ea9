"""RTMDet / RTMDet-Ins end to end against the visdet goldens: flaxdet.inference.Detector (the production
converter, one jit, static shapes) on the recorded BGR input and metainfo reproduces visdet's preprocessed input,
backbone, neck and head outputs and its detections (count, order, labels, boxes, scores; Ins masks).
Tolerances: flaxdet.parity.TOLERANCES (``e2e.*`` rows for what inherits the convolutions' float32 error).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from flaxdet.config import load_config
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models import build_detector
from flaxdet.parity import MASK_PIXELS_PER_IMAGE, TOLERANCES, compare_array, compare_detections, format_table
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import GOLDENS, IMAGES, WEIGHT_FILES, config_path, golden_image

pytestmark = pytest.mark.goldens

CASES = ("rtmdet/rtmdet_tiny", "rtmdet/rtmdet_ins_tiny")
HEAD_OUTPUTS = ("cls_scores", "bbox_preds", "kernel_preds")


@functools.lru_cache(maxsize=None)
def detector(case, weights="state_dict.pth"):
    model = build_detector(load_config(config_path(case)))
    ck = load_checkpoint(GOLDENS / case / weights)
    report = load_visdet_state_dict(model, ck.state_dict)  # strict: every key, shared convs' duplicates equal
    assert report.ok and not report.differing, report.summary()
    return Detector(model, ck.classes)


def check(rows):
    assert all(r.passed for r in rows), "\n" + format_table(rows)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def golden_dets(g):
    return {k: g[f"det.{k}"] for k in ("bboxes", "scores", "labels", "masks") if f"det.{k}" in g.arrays}


def detection_rows(ours, g):
    return compare_detections("e2e.det", ours, golden_dets(g), box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                              score_atol=TOLERANCES["e2e.det.scores"].rtol, mask_pixels=MASK_PIXELS_PER_IMAGE)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", IMAGES)
def test_end_to_end_stages(case, image):
    g = golden_image(case, image)
    det = detector(case)
    batch = make_batch([g["input_bgr_uint8"]], [g.meta])
    dets, stages = jax.device_get(det.predict_batch(batch, with_stages=True))
    rows = [compare_array("preprocessed", nchw(stages["preprocessed"]), g["preprocessed"])]
    rows += [compare_array(f"{part}.{i}", nchw(stages[f"{part}.{i}"]), g[f"{part}.{i}"])
             for part in ("backbone", "neck") for i in range(3)]
    head = [k for k in (*(f"{n}.{lvl}" for n in HEAD_OUTPUTS for lvl in range(3)), "mask_feats") if k in g.arrays]
    rows += [compare_array(k, nchw(stages[k]), g[k], TOLERANCES["e2e.rtmdet_head"]) for k in head]
    rows += detection_rows(unpad(dets, batch)[0], g)
    check(rows)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weights", WEIGHT_FILES)
def test_detect_weight_files(case, weights):
    """Detector.detect (two-jit split off for one-stage models, numpy results cropped to the original size) from
    each recorded weight container."""
    g = golden_image(case, IMAGES[0])
    ours = detector(case, weights).detect([g["input_bgr_uint8"]], [g.meta])[0]
    assert ours["labels"].dtype == np.int64
    if "det.masks" in g.arrays:
        assert ours["masks"].shape == g["det.masks"].shape and ours["masks"].dtype == bool
    check(detection_rows(ours, g))
