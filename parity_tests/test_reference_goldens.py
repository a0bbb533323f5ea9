"""reference/ reproduces the visdet goldens: every stage, both cases, all three images.

Two regimes:
* teacher-forced -- each stage is fed the *recorded* output of the stage before it, so each
  comparison measures that stage alone (tight tolerances; proposals/detections exact up to ties);
* end to end -- the image goes in, the detections come out (the user-visible contract).
Tolerances come from flaxdet.parity.TOLERANCES (one table, each value with its reason).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flaxdet.parity import (
    MASK_PIXELS_PER_IMAGE,
    MASK_PIXELS_TEACHER_FORCED,
    TOLERANCES,
    compare_array,
    compare_detections,
    format_table,
)
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_reference import build_detector
from flaxdet_reference.models import load_state_dict_strict
from parity_tests.goldens import CASES, IMAGES, config_path, golden_image

pytestmark = pytest.mark.goldens

_MODELS = {}


def model_for(case):
    if case not in _MODELS:
        m = build_detector(config_path(case))
        load_state_dict_strict(m, load_checkpoint(config_path(case).parent / "state_dict.pth").state_dict)
        _MODELS[case] = m
    return _MODELS[case]


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def image_tensor(g):
    return t(g["input_bgr_uint8"]).permute(2, 0, 1).contiguous()


def check(rows):
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + format_table(rows)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_stages(case, image):
    g = golden_image(case, image)
    m = model_for(case)
    rows = []
    with torch.no_grad():
        batch, shape = m.data_preprocessor([image_tensor(g)])
        rows.append(compare_array("preprocessed", batch.numpy(), g["preprocessed"]))
        feats = m.backbone(t(g["preprocessed"]))
        rows += [compare_array(f"backbone.{i}", f.numpy(), g[f"backbone.{i}"]) for i, f in enumerate(feats)]
        neck = m.neck([t(g[f"backbone.{i}"]) for i in range(4)])
        rows += [compare_array(f"neck.{i}", f.numpy(), g[f"neck.{i}"]) for i, f in enumerate(neck)]
        golden_neck = [t(g[f"neck.{i}"]) for i in range(5)]
        cls, reg = m.rpn_head(golden_neck)
        for lvl in range(5):
            rows.append(compare_array(f"rpn_head.cls_score.{lvl}", cls[lvl].numpy(), g[f"rpn_head.cls_score.{lvl}"]))
            rows.append(compare_array(f"rpn_head.bbox_pred.{lvl}", reg[lvl].numpy(), g[f"rpn_head.bbox_pred.{lvl}"]))
        meta = dict(g.meta, batch_input_shape=shape)
        props = m.rpn_head.predict_by_feat([t(g[f"rpn_head.cls_score.{lvl}"]) for lvl in range(5)],
                                           [t(g[f"rpn_head.bbox_pred.{lvl}"]) for lvl in range(5)],
                                           [meta], m.rpn_head.cfg.test_cfg)[0]
        tol = TOLERANCES["proposals"].rtol
        rows += compare_detections("proposals", {k: v.numpy() for k, v in props.items() if k != "labels"},
                                   {"bboxes": g["proposals.bboxes"], "scores": g["proposals.scores"]},
                                   box_atol=tol * max(g.meta["img_shape"]), score_atol=tol)
        stages = {}
        golden_props = [dict(bboxes=t(g["proposals.bboxes"]), scores=t(g["proposals.scores"]))]
        res = m.predict_heads(golden_neck, [meta], proposals=golden_props, stages=stages)[0]
    rows.append(compare_array("bbox_roi_extractor.first128", stages["bbox_roi_extractor"][:128].numpy(),
                              g["bbox_roi_extractor.first128"]))
    rows.append(compare_array("bbox_head.cls_score", stages["bbox_head.cls_score"].numpy(), g["bbox_head.cls_score"]))
    rows.append(compare_array("bbox_head.bbox_pred", stages["bbox_head.bbox_pred"].numpy(), g["bbox_head.bbox_pred"]))
    rows += compare_detections("det", {k: v.numpy() for k, v in res.items()}, g.det,
                               box_atol=TOLERANCES["det.bboxes"].rtol * max(g.meta["ori_shape"]),
                               score_atol=TOLERANCES["det.scores"].rtol,
                               mask_pixels=MASK_PIXELS_TEACHER_FORCED)
    # mask stages: rows of detections that tie-flipped have other boxes, so compare matched rows only
    n = min(32, len(res["bboxes"]))
    same = np.abs(res["bboxes"].numpy() - g["det.bboxes"]).max(1) <= 1e-3 * max(g.meta["ori_shape"])
    rows.append(compare_array("mask_roi_extractor.first32", stages["mask_roi_extractor"][:n].numpy()[same[:n]],
                              g["mask_roi_extractor.first32"][same[:n]]))
    rows.append(compare_array("mask_head.mask_preds", stages["mask_head.mask_preds"].numpy()[same],
                              g["mask_head.mask_preds"][same]))
    check(rows)
    assert same.mean() >= 0.98, f"only {same.sum()}/{same.size} detections match exactly"


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("case", CASES)
def test_end_to_end(case, image):
    g = golden_image(case, image)
    m = model_for(case)
    stages = {}
    res = m.predict([image_tensor(g)], [g.meta], stages=stages)[0]
    e2e = TOLERANCES["e2e.features"]
    rows = [compare_array(k, stages[k].numpy(), g[k]) for k in g.arrays
            if k.split(".")[0] in ("preprocessed", "backbone", "neck", "rpn_head")]
    rows += compare_detections("proposals", {k: stages[f"proposals.{k}"].numpy() for k in ("bboxes", "scores")},
                               {"bboxes": g["proposals.bboxes"], "scores": g["proposals.scores"]},
                               box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                               score_atol=TOLERANCES["e2e.det.scores"].rtol)
    same = np.abs(stages["proposals.bboxes"].numpy() - g["proposals.bboxes"]).max(1) <= 1e-2
    rows.append(compare_array("bbox_head.cls_score", stages["bbox_head.cls_score"].numpy()[same],
                              g["bbox_head.cls_score"][same], e2e))
    rows.append(compare_array("bbox_head.bbox_pred", stages["bbox_head.bbox_pred"].numpy()[same],
                              g["bbox_head.bbox_pred"][same], e2e))
    rows += compare_detections("det", {k: v.numpy() for k, v in res.items()}, g.det,
                               box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                               score_atol=TOLERANCES["e2e.det.scores"].rtol, mask_pixels=MASK_PIXELS_PER_IMAGE)
    check(rows)
    assert same.mean() >= 0.98
