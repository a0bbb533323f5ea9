"""Cascade (Mask) R-CNN: reference/ and flaxdet on a small cascade config, end to end.

No visdet recording of a cascade model exists (../shared/goldens has none), so reference/ -- visdet's
CascadeRoIHead numerics, checked by reading visdet's source -- is the oracle here, as in
test_random_configs.py: a visdet-layout checkpoint is written from reference/ with seeded,
well-conditioned weights (every stage's classifier centred on these images' RoIs, so the three stages
all carry signal, labels vary and scores are not saturated), then

* the published presets build visdet's module tree (400 state_dict keys, 77,324,606 parameters for
  cascade_mask_rcnn_r50; 364 keys without masks);
* the checkpoint converts strictly into flaxdet and exports back bit-identically;
* flaxdet under ``jax.jit`` matches reference/ stage by stage (every cascade stage's refined RoIs,
  features and head outputs, averaged logits, every stage's mask logits and the merged probabilities)
  with the tolerance table, and the detections are the same (count, order, labels, boxes, masks);
* (slow) training: flaxdet ``loss_and_grads`` equals reference/'s loss + backward with reference/'s
  samples of every stage injected (loss terms ``train.loss``, every parameter gradient ``train.grad``);
* (slow) a few fine-tuning steps on the synthetic set lower the loss;
* (slow) the CLI (convert / infer / parity) runs on such a checkpoint.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from flaxdet.config import dump_yaml, load_config
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models.detectors.two_stage import build_detector as build_flax
from flaxdet.parity import MASK_PIXELS_PER_IMAGE, TOLERANCES, compare_detections, format_table
from flaxdet.parity.harness import compare_stages, flaxdet_stages, geometry_of, torch_stages
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict
from flaxdet_reference import build_detector as build_ref

SHAPES = ((150, 190), (128, 171))  # a batch of two sizes, neither a multiple of 32
CLASSES = 3


def small_cascade_cfg(mask=True, depth=18, base=8, classes=CLASSES, fc=32, mask_ch=8):
    """The cascade preset shrunk: ResNet-18 base 8, FPN 16 channels, 3 classes, fc 32."""
    cfg = load_config("cascade_mask_rcnn_r50" if mask else "cascade_rcnn_r50")
    exp = 1 if depth in (18, 34) else 4
    rh = cfg.roi_head
    rh = dataclasses.replace(
        rh, bbox_head=tuple(dataclasses.replace(h, in_channels=16, fc_out_channels=fc, num_classes=classes)
                            for h in rh.bbox_head),
        bbox_roi_extractor=tuple(dataclasses.replace(e, out_channels=16) for e in rh.bbox_roi_extractor))
    if mask:
        rh = dataclasses.replace(
            rh, mask_head=tuple(dataclasses.replace(h, in_channels=16, num_classes=classes, conv_out_channels=mask_ch)
                                for h in rh.mask_head),
            mask_roi_extractor=tuple(dataclasses.replace(e, out_channels=16) for e in rh.mask_roi_extractor))
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, depth=depth, base_channels=base, init_cfg=None),
        neck=dataclasses.replace(cfg.neck, in_channels=tuple(base * 2**i * exp for i in range(4)), out_channels=16),
        rpn_head=dataclasses.replace(cfg.rpn_head, in_channels=16, feat_channels=16), roi_head=rh)


def cascade_weights(ref, seed, images, metas, spread=0.5):
    """``conditioned_weights`` (test_random_configs) for a cascade: BN statistics near identity, He-normal
    weights; then every stage's fc_cls bias is shifted so that each class logit has zero mean over the
    RoIs of ``images`` (ReLU features have a large common mean, which otherwise hands every RoI the same
    class) and scaled by ``spread`` (logit std ~0.5-1.5 per stage: varied labels, scores 0.3-0.8).
    Returns the state_dict (numpy)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("num_batches_tracked"):
            sd[k] = v
        elif v.ndim > 1:
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    sd["rpn_head.rpn_cls.weight"] = sd["rpn_head.rpn_cls.weight"] * 2  # as conditioned_weights: no sigmoid ties
    ref.load_state_dict(sd)
    stages = {}
    ref.predict(_tensors(images), metas, stages=stages)
    for s in range(ref.roi_head.num_stages):
        cls = stages["bbox_head.cls_score" if s == 0 else f"cascade.bbox_head.{s}.cls_score"]
        p = f"roi_head.bbox_head.{s}.fc_cls."
        sd[p + "bias"] = (sd[p + "bias"] - cls.mean(0)) * spread
        sd[p + "weight"] = sd[p + "weight"] * spread
    ref.load_state_dict(sd)
    return {k: v.numpy() for k, v in sd.items()}


def _tensors(images):
    return [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in images]


def _images(shapes=SHAPES, seed=0):
    from parity_tests.test_train_reference import photo_crops

    from parity_tests.goldens import require_goldens

    require_goldens()
    return photo_crops(shapes, seed)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The small cascade Mask R-CNN, its seeded weights and a visdet-layout runner checkpoint of them."""
    d = tmp_path_factory.mktemp("cascade")
    cfg = small_cascade_cfg()
    images = _images()
    metas = [dict(ori_shape=s, img_shape=s, scale_factor=(1.0, 1.0, 1.0, 1.0)) for s in SHAPES]
    ref = build_ref(cfg)
    sd = cascade_weights(ref, 0, images, metas)
    ckpt = save_checkpoint(d / "cascade.pth", sd, classes=[f"c{i}" for i in range(CLASSES)])
    (d / "cascade.yaml").write_text(dump_yaml(cfg))
    return dict(cfg=cfg, ref=ref, sd=sd, ckpt=ckpt, config=d / "cascade.yaml", images=images, metas=metas, dir=d)


def test_presets_build_visdets_module_tree():
    for name, keys, params in (("cascade_mask_rcnn_r50", 400, 77_324_606), ("cascade_rcnn_r50", 364, None)):
        cfg = load_config(name)
        rh = cfg.roi_head
        assert cfg.TYPE == "CascadeRCNN" and rh.TYPE == "CascadeRoIHead" and rh.num_stages == 3
        assert [h.bbox_coder.target_stds for h in rh.bbox_head] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                                     (0.033, 0.033, 0.067, 0.067)]
        assert [t.assigner.pos_iou_thr for t in rh.train_cfg] == [0.5, 0.6, 0.7]
        assert rh.stage_loss_weights == (1.0, 0.5, 0.25) and cfg.train_cfg.rcnn == rh.train_cfg
        ref = build_ref(cfg)
        sd = ref.state_dict()
        assert len(sd) == keys, len(sd)
        if params is not None:  # visdet's built model (numerics spec section 2)
            assert sum(p.numel() for p in ref.parameters()) == params
        assert sd["roi_head.bbox_head.2.fc_reg.weight"].shape == (4, 1024)  # class-agnostic regression
        assert ("roi_head.mask_head.2.conv_logits.weight" in sd) == (rh.mask_head is not None)


def test_checkpoint_converts_strictly_and_round_trips(case):
    ck = load_checkpoint(case["ckpt"])
    flax = build_flax(case["cfg"])
    report = load_visdet_state_dict(flax, ck.state_dict)
    assert report.ok and len(report.converted) == len(case["sd"]), report.summary()
    assert any(k.startswith("roi_head.bbox_head.2.") for k in report.converted)
    back = export_visdet_state_dict(flax, list(ck.state_dict))
    assert list(back) == list(case["sd"])
    for k, v in case["sd"].items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def _first_image(theirs):
    """reference/'s batch stages restricted to image 0 (flaxdet_stages keeps image 0 too)."""
    n_prop, n_det = len(theirs["proposals.bboxes"]), len(theirs["det.bboxes"])
    out = {k: v[:1] for k, v in theirs.items() if k.startswith(("backbone", "neck", "rpn_head"))}
    for k, v in theirs.items():
        if k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred") or \
                k.startswith(("cascade.rois", "cascade.bbox_", "cascade.cls_score")):
            out[k] = v[:n_prop]
        elif k in ("mask_roi_extractor", "mask_head.mask_preds") or k.startswith(("cascade.mask_",)):
            out[k] = v[:n_det]
        elif k.startswith(("proposals", "det.")):
            out[k] = v
    return out


def test_flaxdet_jit_matches_reference_stage_by_stage(case):
    """~40-60 s: one XLA compile of the whole cascade Mask R-CNN."""
    cfg, ref = case["cfg"], case["ref"]
    stages = {}
    ref_res = ref.predict(_tensors(case["images"]), case["metas"], stages=stages)
    theirs = _first_image(torch_stages(stages))
    flax = build_flax(cfg)
    assert load_visdet_state_dict(flax, load_checkpoint(case["ckpt"]).state_dict).ok
    det = Detector(flax)
    batch = make_batch(case["images"], case["metas"])
    dets, fst = jax.device_get(det.predict_batch(batch, with_stages=True))
    ours_all = unpad(dets, batch)
    ours = flaxdet_stages(fst, ours_all[0])
    bgeo, mgeo = geometry_of(cfg)
    rows = compare_stages(ours, theirs, bbox_geometry=bgeo, mask_geometry=mgeo,
                          scale_factor=case["metas"][0]["scale_factor"])
    table = format_table(rows)
    print("\n" + table)
    assert all(r.passed for r in rows), "\n" + table
    names = {r.stage for r in rows}
    for s in (1, 2):  # every later stage was compared
        assert {f"cascade.rois.{s}", f"cascade.bbox_roi_extractor.{s}", f"cascade.bbox_head.{s}.cls_score",
                f"cascade.mask_head.{s}.mask_preds"} <= names
    assert {"cascade.cls_score", "cascade.mask_probs", "det.masks"} <= names
    # well-conditioned: the stages carry signal (refinement moves the RoIs, labels vary, no saturation)
    assert np.abs(theirs["cascade.rois.1"] - theirs["proposals.bboxes"]).mean() > 0.5
    assert np.abs(theirs["cascade.rois.2"] - theirs["cascade.rois.1"]).mean() > 0.5
    assert len(np.unique(theirs["det.labels"])) == CLASSES and theirs["det.scores"].max() < 0.95
    # detections identical on both images: same count, order (tie flips only between equal scores),
    # labels, boxes, scores and masks
    for i, (o, t) in enumerate(zip(ours_all, ref_res)):
        t = {k: v.numpy() for k, v in t.items()}
        assert len(t["scores"]) > 0
        rows = compare_detections(f"det[{i}]", o, t, box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                                  score_atol=TOLERANCES["e2e.det.scores"].rtol, mask_pixels=MASK_PIXELS_PER_IMAGE)
        print(format_table(rows))
        assert all(r.passed for r in rows), "\n" + format_table(rows)
