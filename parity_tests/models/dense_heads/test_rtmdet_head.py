"""RTMDetSepBNHead / RTMDetInsSepBNHead against visdet (visdet-rtmdet.md §1.5, §2.2, §3):

- weights from the golden state_dict's ``bbox_head.*`` keys by the production converter (strict: the shared
  convs' duplicate keys are checked equal), exported back unchanged;
- the head outputs under jax.jit from the recorded neck outputs (teacher-forced);
- post-processing (jitted) from the recorded head outputs: per-level top-k, candidates, the NMS keep list and the
  detections, Ins masks and mask logits; the rescale=False path on the photos without a resize;
- visdet's base RTMDetHead (one tower, a Scale per level, exp on the distances) against the same recordings;
- the full-size presets' head parameter counts (§1.1) and output shapes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxdet.config import load_config
from flaxdet.models.dense_heads.rtmdet_head import RTMDetHead, RTMDetSepBNHead
from flaxdet.models.dense_heads.rtmdet_ins_head import RTMDetInsSepBNHead
from flaxdet.ops.nms import batched_nms
from flaxdet.parity import MASK_PIXELS_TEACHER_FORCED, TOLERANCES, compare_array, format_table
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict, variable_aliases
from parity_tests.goldens import GOLDENS, IMAGES, golden_image
from parity_tests.models.common import Holder, nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.goldens

HEADS = {"rtmdet/rtmdet_tiny": RTMDetSepBNHead, "rtmdet/rtmdet_ins_tiny": RTMDetInsSepBNHead}
CASES = tuple(HEADS)
OUTPUTS = ("cls_scores", "bbox_preds", "kernel_preds")


def check(rows):
    assert all(r.passed for r in rows), "\n" + format_table(rows)


@functools.cache
def head_state_dict(case):
    sd = load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict
    return {k: v for k, v in sd.items() if k.startswith("bbox_head.")}


@functools.cache
def golden_head(case):
    """The golden head built from config.yaml and filled strictly from the ``bbox_head.*`` keys; (head, report)."""
    head = HEADS[case](load_config(GOLDENS / case / "config.yaml").bbox_head, rngs=nnx.Rngs(0))
    report = load_visdet_state_dict(Holder("bbox_head", head), head_state_dict(case))
    assert report.ok, report.summary()
    return head, report


@functools.cache
def jitted(case):
    head = golden_head(case)[0]
    ins = isinstance(head, RTMDetInsSepBNHead)

    def post(outs, img_shapes, scale_factors, canvas_hw, rescale):
        extras = {"kernels": outs[2]} if ins else None
        dets, stages = head.predict_by_feat(outs[0], outs[1], img_shapes, scale_factors, rescale, extras)
        if ins:
            dets, s = head.predict_masks(outs[3], dets, scale_factors, canvas_hw, rescale)
            stages.update(s)
        return dets, stages

    return jax.jit(head), jax.jit(post, static_argnums=(3, 4))


def head_outputs(g, ins):
    outs = tuple(tuple(nchw_to_nhwc(g[f"{name}.{lvl}"]) for lvl in range(3)) for name in OUTPUTS[:2 + ins])
    return outs + ((nchw_to_nhwc(g["mask_feats"]),) if ins else ())


def canvas_for(ori_shape):
    return tuple(-(-int(s) // 256) * 256 for s in ori_shape)


def post_process(case, g, rescale=True):
    ins = case.endswith("ins_tiny")
    canvas = canvas_for(g.meta["ori_shape"]) if rescale else None
    dets, stages = jitted(case)[1](head_outputs(g, ins), jnp.asarray([g.meta["img_shape"]], jnp.int32),
                                   jnp.asarray([g.meta["scale_factor"]], jnp.float32), canvas, rescale)
    return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get((dets, stages)))


@pytest.mark.parametrize("case", CASES)
def test_weights_shared_convs_and_round_trip(case):
    head, report = golden_head(case)
    sd = head_state_dict(case)
    for tower in (head.cls_convs, head.reg_convs):  # share_conv: one conv module per depth, a BN per level
        for lvl in (1, 2):
            for i in range(2):
                assert tower[lvl][i].conv is tower[0][i].conv
                assert tower[lvl][i].bn is not tower[0][i].bn
    groups = {frozenset([k, *v]) for k, v in variable_aliases(Holder("bbox_head", head)).items()}
    assert groups == {frozenset(f"bbox_head.{t}.{lvl}.{i}.conv.weight" for lvl in range(3))
                      for t in ("cls_convs", "reg_convs") for i in range(2)}
    assert len(report.converted) == len(sd) - 8  # 4 tie groups of 3 keys: one variable each
    out = export_visdet_state_dict(Holder("bbox_head", head))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", IMAGES)
def test_head_outputs(case, image):
    g = golden_image(case, image)
    ins = case.endswith("ins_tiny")
    outs = jitted(case)[0](tuple(nchw_to_nhwc(g[f"neck.{i}"]) for i in range(3)))
    tol = TOLERANCES["rtmdet_head"]
    rows = [compare_array(f"{name}.{lvl}", nhwc_to_nchw(outs[j][lvl]), g[f"{name}.{lvl}"], tol)
            for j, name in enumerate(OUTPUTS[:2 + ins]) for lvl in range(3)]
    if ins:
        rows.append(compare_array("mask_feats", nhwc_to_nchw(outs[3]), g["mask_feats"], tol))
    check(rows)


def _compact(valid):
    """Index of each valid row among the valid rows (visdet filters where we mask)."""
    return np.cumsum(valid) - 1


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", IMAGES)
def test_post_processing(case, image):
    g = golden_image(case, image)
    dets, st = post_process(case, g)
    cfg = golden_head(case)[0].cfg.test_cfg
    rows = []
    for lvl in range(3):  # per-level top-k: identical pairs, in order
        v = st[f"topk.{lvl}.valid"]
        assert v.sum() == len(g[f"topk.{lvl}.scores"]), lvl
        np.testing.assert_array_equal(st[f"topk.{lvl}.keep_idxs"][v], g[f"topk.{lvl}.keep_idxs"])
        np.testing.assert_array_equal(st[f"topk.{lvl}.labels"][v], g[f"topk.{lvl}.labels"])
        rows.append(compare_array(f"topk.{lvl}.scores", st[f"topk.{lvl}.scores"][v], g[f"topk.{lvl}.scores"],
                                  TOLERANCES["det.scores"]))
    cv = st["cand.valid"]
    np.testing.assert_array_equal(st["cand.labels"][cv], g["cand.labels"])
    np.testing.assert_array_equal(st["cand.level"][cv], g["cand.level"])
    if "cand.priors" in g.arrays:
        np.testing.assert_array_equal(st["cand.priors"][cv], g["cand.priors"])
    rows += [compare_array("cand.bboxes", st["cand.bboxes"][cv], g["cand.bboxes"], TOLERANCES["det.bboxes"]),
             compare_array("rescale.bboxes", st["rescale.bboxes"][cv], g["rescale.bboxes"], TOLERANCES["det.bboxes"])]
    np.testing.assert_array_equal(st["nms_in.valid"][cv], g["min_size.keep"])
    # NMS: the whole keep list (our NMS run to the end on our candidates) and the first max_per_img in predict
    nv = st["nms_in.valid"]
    keep, kv = jax.device_get(batched_nms(jnp.asarray(st["rescale.bboxes"]), jnp.asarray(st["cand.scores"]),
                                          jnp.asarray(st["cand.labels"]), jnp.asarray(nv), cfg.nms.iou_threshold,
                                          int(nv.sum())))
    np.testing.assert_array_equal(_compact(nv)[keep[kv]], g["nms.keep"])
    dv = dets["valid"]
    np.testing.assert_array_equal(_compact(nv)[dets["keep"][dv]], g["nms.keep"][:cfg.max_per_img])
    # detections: same count, order and labels
    assert dv.sum() == len(g["det.scores"])
    np.testing.assert_array_equal(dets["labels"][dv], g["det.labels"])
    rows += [compare_array("det.bboxes", dets["bboxes"][dv], g["det.bboxes"]),
             compare_array("det.scores", dets["scores"][dv], g["det.scores"])]
    if "det.masks" in g.arrays:
        np.testing.assert_array_equal(dets["priors"][dv], g["det.priors"])
        rows.append(compare_array("det.kernels", dets["kernels"][dv], g["det.kernels"], TOLERANCES["rtmdet_head"]))
        rows.append(compare_array("rtmdet.mask_logits", st["det.mask_logits"][:16], g["det.mask_logits_first16"]))
        h, w = g.meta["ori_shape"]
        px = int((dets["masks"][dv][:, :h, :w] != g["det.masks"]).sum())
        assert px <= MASK_PIXELS_TEACHER_FORCED, f"{px} mask pixels differ"
        assert not dets["masks"][~dv].any()
    check(rows)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", ("voc_000001", "color"))  # no resize: scale factor (1, 1)
def test_post_processing_without_rescale(case, image):
    """rescale=False keeps the input frame and gives masks at the padded size: with a unit scale factor the
    recorded detections, and the masks cropped to the image."""
    g = golden_image(case, image)
    assert tuple(g.meta["scale_factor"]) == (1.0, 1.0)
    dets, _ = post_process(case, g, rescale=False)
    dv = dets["valid"]
    np.testing.assert_array_equal(dets["labels"][dv], g["det.labels"])
    check([compare_array("det.bboxes", dets["bboxes"][dv], g["det.bboxes"])])
    if "det.masks" in g.arrays:
        h, w = g.meta["ori_shape"]
        assert dets["masks"].shape[1:] == tuple(8 * s for s in g["mask_feats"].shape[2:])
        assert int((dets["masks"][dv][:, :h, :w] != g["det.masks"]).sum()) <= MASK_PIXELS_TEACHER_FORCED


@pytest.mark.parametrize("image", IMAGES)
def test_base_rtmdet_head(image):
    """visdet's base RTMDetHead (one tower for all levels, ``scale(exp(reg)) * stride``) holding level l's
    golden weights reproduces level l's recorded logits, and ``Scale * exp(distance / stride) * stride``."""
    case = "rtmdet/rtmdet_tiny"
    cfg = dataclasses.replace(golden_head(case)[0].cfg, with_objectness=False)
    g = golden_image(case, image)
    sd = head_state_dict(case)
    for lvl, stride in enumerate((8, 16, 32)):
        head = RTMDetHead(cfg, rngs=nnx.Rngs(0))
        level = {}
        for k, v in sd.items():
            parts = k.split(".")
            if parts[1] in ("cls_convs", "reg_convs", "rtm_cls", "rtm_reg") and parts[2] == str(lvl):
                level[".".join(parts[:2] + parts[3:])] = v
        level.update({f"bbox_head.scales.{i}.scale": np.float32(1.5) for i in range(3)})
        report = load_visdet_state_dict(Holder("bbox_head", head), level)
        assert report.ok, report.summary()
        cls, reg = nnx.jit(lambda m, x, lv=lvl: m.forward_single(x, lv))(head, nchw_to_nhwc(g[f"neck.{lvl}"]))
        want = 1.5 * np.exp(g[f"bbox_preds.{lvl}"].astype(np.float64) / stride) * stride
        check([compare_array(f"cls_scores.{lvl}", nhwc_to_nchw(cls), g[f"cls_scores.{lvl}"], TOLERANCES["rtmdet_head"]),
               compare_array(f"bbox_preds.{lvl}", nhwc_to_nchw(reg), want, TOLERANCES["rtmdet_head"])])


# preset: (det head params, ins head params, ins head params with upstream's tie_reg_to_cls) from
# visdet-rtmdet.md §1.1 (num_classes 80; "Ins w/o reg tower" minus backbone and neck)
FULL = {"tiny": (358_524, 1_267_583, 1_100_543), "s": (625_404, 2_218_239, 1_921_791),
        "l": (2_430_204, 8_662_783, 57_365_663 - 26_138_912 - 23_746_688)}


def n_params(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("size", sorted(FULL))
def test_full_size_heads(size):
    det_cfg = dataclasses.replace(load_config(f"rtmdet_{size}").bbox_head, num_classes=80)
    ins_cfg = dataclasses.replace(load_config(f"rtmdet_ins_{size}").bbox_head, num_classes=80)
    det, ins = RTMDetSepBNHead(det_cfg, rngs=nnx.Rngs(0)), RTMDetInsSepBNHead(ins_cfg, rngs=nnx.Rngs(0))
    tied = RTMDetInsSepBNHead(dataclasses.replace(ins_cfg, tie_reg_to_cls=True), rngs=nnx.Rngs(0))
    assert (n_params(det), n_params(ins), n_params(tied)) == FULL[size]
    # upstream's tie keeps visdet's key set: reg_convs.* name the cls tower's variables
    keys = lambda m: set(export_visdet_state_dict(Holder("bbox_head", m)))  # noqa: E731
    assert keys(tied) == keys(ins)
    f = ins_cfg.in_channels
    feats = tuple(jax.ShapeDtypeStruct((1, 640 // s, 640 // s, f), np.float32) for s in (8, 16, 32))
    cls, reg, ker, mask_feat = jax.eval_shape(ins, feats)
    assert sum(c.shape[1] * c.shape[2] for c in cls) == 8400
    assert [k.shape[-1] for k in ker] == [169] * 3 and mask_feat.shape == (1, 80, 80, 8)
