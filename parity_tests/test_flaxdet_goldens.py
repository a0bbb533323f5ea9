"""flaxdet (converted from each golden weight file, run under jax.jit) reproduces the visdet goldens.

End to end through the static-shape predict path, and teacher-forced stage by stage (each stage
fed the recorded output of the previous one). Tolerances: flaxdet.parity.TOLERANCES.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths
from flaxdet.config import load_config
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models import build_detector
from flaxdet.parity import TOLERANCES, compare_array, compare_detections, format_table
from flaxdet.parity.harness import compare_stages, flaxdet_stages, geometry_of
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import CASES, GOLDENS, IMAGES, WEIGHT_FILES, config_path, golden_image

pytestmark = pytest.mark.goldens


@functools.lru_cache(maxsize=None)
def detector(case, weights="state_dict.pth"):
    model = build_detector(load_config(config_path(case)))
    ck = load_checkpoint(GOLDENS / case / weights)
    load_visdet_state_dict(model, ck.state_dict)
    return Detector(model, ck.classes)


def check(rows):
    assert all(r.passed for r in rows), "\n" + format_table(rows)


def nhwc(x):
    return jnp.asarray(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1)))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _e2e_params():
    """state_dict.pth for every case and image; the other two weight files (same tensors, other
    containers) on one image per case by default, on all images under ``-m slow``."""
    out = []
    for case in CASES:
        for image in IMAGES:
            for weights in WEIGHT_FILES:
                slow = weights != "state_dict.pth" and image != "coco_test_12510"
                out.append(pytest.param(case, image, weights, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("case,image,weights", _e2e_params())
def test_end_to_end_jit(case, image, weights):
    g = golden_image(case, image)
    det = detector(case, weights)
    batch = make_batch([g["input_bgr_uint8"]], [g.meta])
    dets, stages = jax.device_get(det.predict_batch(batch, with_stages=True))
    ours = flaxdet_stages(stages, unpad(dets, batch)[0])
    bgeo, mgeo = geometry_of(det.cfg)
    rows = compare_stages(ours, g.arrays, bbox_geometry=bgeo, mask_geometry=mgeo, scale_factor=g.meta["scale_factor"])
    check(rows)
    assert ours["_n_proposals"] == len(g["proposals.bboxes"])


@pytest.mark.parametrize("case", CASES)
def test_end_to_end_jit_plain_paths(case):
    """The same contract with every fast path off (what GPU / TPU run by default): plain convolutions and
    gradients, RoIAlign over whole maps, the mask branch on every detection row."""
    g = golden_image(case, IMAGES[0])
    model = build_detector(load_config(config_path(case)))
    load_visdet_state_dict(model, load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict)
    with fast_paths.use("none"):
        det = Detector(model)
        batch = make_batch([g["input_bgr_uint8"]], [g.meta])
        dets, stages = jax.device_get(det.predict_batch(batch, with_stages=True))
        boxes_only = det.detect([g["input_bgr_uint8"]], [g.meta])[0]  # the two-jit path: boxes, then masks
    ours = flaxdet_stages(stages, unpad(dets, batch)[0])
    bgeo, mgeo = geometry_of(det.cfg)
    check(compare_stages(ours, g.arrays, bbox_geometry=bgeo, mask_geometry=mgeo, scale_factor=g.meta["scale_factor"]))
    np.testing.assert_array_equal(boxes_only["masks"], unpad(dets, batch)[0]["masks"])


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_stages(case, image):
    g = golden_image(case, image)
    det = detector(case)
    m = det.model
    rows = []
    shapes = jnp.asarray([g.meta["img_shape"]], jnp.int32)
    sf = list(g.meta["scale_factor"])
    sfs = jnp.asarray([sf * 2 if len(sf) == 2 else sf], jnp.float32)

    pre = jax.jit(lambda x, s: m.data_preprocessor(x, s))(
        jnp.asarray(make_batch([g["input_bgr_uint8"]], [g.meta]).images), shapes)
    rows.append(compare_array("preprocessed", nchw(pre), g["preprocessed"]))
    feats = jax.jit(m.backbone)(nhwc(g["preprocessed"]))
    rows += [compare_array(f"backbone.{i}", nchw(f), g[f"backbone.{i}"]) for i, f in enumerate(feats)]
    neck = jax.jit(m.neck)(tuple(nhwc(g[f"backbone.{i}"]) for i in range(4)))
    rows += [compare_array(f"neck.{i}", nchw(f), g[f"neck.{i}"]) for i, f in enumerate(neck)]
    gneck = tuple(nhwc(g[f"neck.{i}"]) for i in range(5))
    cls, reg = jax.jit(m.rpn_head)(gneck)
    for lvl in range(5):
        rows.append(compare_array(f"rpn_head.cls_score.{lvl}", nchw(cls[lvl]), g[f"rpn_head.cls_score.{lvl}"]))
        rows.append(compare_array(f"rpn_head.bbox_pred.{lvl}", nchw(reg[lvl]), g[f"rpn_head.bbox_pred.{lvl}"]))
    gcls = [nhwc(g[f"rpn_head.cls_score.{lvl}"]) for lvl in range(5)]
    greg = [nhwc(g[f"rpn_head.bbox_pred.{lvl}"]) for lvl in range(5)]
    pb, ps, pv = jax.jit(m.rpn_head.predict_by_feat)(gcls, greg, shapes)
    pv = np.asarray(pv[0])
    tol = TOLERANCES["proposals"].rtol
    rows += compare_detections("proposals", {"bboxes": np.asarray(pb[0])[pv], "scores": np.asarray(ps[0])[pv]},
                               {"bboxes": g["proposals.bboxes"], "scores": g["proposals.scores"]},
                               box_atol=tol * max(g.meta["img_shape"]), score_atol=tol)
    # heads from the recorded FPN features and proposals
    props = jnp.asarray(g["proposals.bboxes"])[None]
    pvalid = jnp.ones(props.shape[:2], bool)
    batch = make_batch([g["input_bgr_uint8"]], [g.meta])
    fn = jax.jit(lambda n, p, v, s, f: m.predict_heads(n, s, f, batch.canvas_hw, proposals=(p, v)))
    dets, stages = jax.device_get(fn(gneck, props, pvalid, shapes, sfs))
    ours = flaxdet_stages(stages, unpad(dets, batch)[0])
    n = len(g["proposals.bboxes"])
    ours.update({"proposals.bboxes": g["proposals.bboxes"], "proposals.scores": g["proposals.scores"]})
    ours["bbox_roi_extractor"] = nchw(np.asarray(stages["bbox_roi_extractor"]))[:n]
    ours["bbox_head.cls_score"] = np.asarray(stages["bbox_head.cls_score"])[:n]
    ours["bbox_head.bbox_pred"] = np.asarray(stages["bbox_head.bbox_pred"])[:n]
    rows += [r for r in compare_stages(ours, {k: v for k, v in g.arrays.items() if not k.startswith(
        ("preprocessed", "backbone", "neck", "rpn_head"))}, teacher_forced=True) if not r.stage.startswith("proposals")]
    check(rows)
