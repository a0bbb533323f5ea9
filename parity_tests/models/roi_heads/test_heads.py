"""SingleRoIExtractor, ConvFCBBoxHead family and FCNMaskHead: flaxdet vs reference on random configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flaxdet.config import ConvFCBBoxHeadCfg, FCNMaskHeadCfg, RoIAlignCfg, SingleRoIExtractorCfg
from flaxdet.models.roi_heads.bbox_heads.convfc_bbox_head import ConvFCBBoxHead
from flaxdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor
from flaxdet.parity import tolerance_for
from flaxdet_reference.models.roi_heads.bbox_heads.convfc_bbox_head import ConvFCBBoxHead as RefBBox
from flaxdet_reference.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead as RefMask
from flaxdet_reference.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor as RefExt
from parity_tests.models.common import convert_into, nchw_to_nhwc, nhwc_to_nchw, rel_err

S = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))


@S
@given(size=st.sampled_from([7, 14]), finest=st.sampled_from([28, 56]), k=st.integers(1, 40), seed=st.integers(0, 99))
def test_single_roi_extractor(size, finest, k, seed):
    cfg = SingleRoIExtractorCfg(roi_layer=RoIAlignCfg(output_size=size), out_channels=4, finest_scale=finest)
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(2, 4, 128 // s, 96 // s)).astype(np.float32) for s in (4, 8, 16, 32)]
    xy = rng.uniform(-10, 90, (k, 2))
    wh = rng.uniform(1, 120, (k, 2))
    rois = np.concatenate([rng.integers(0, 2, (k, 1)), xy, xy + wh], 1).astype(np.float32)
    want = RefExt(cfg)([torch.from_numpy(f) for f in feats], torch.from_numpy(rois)).numpy()
    got = jax.jit(SingleRoIExtractor(cfg))(tuple(nchw_to_nhwc(f) for f in feats), jnp.asarray(rois))
    assert rel_err(nhwc_to_nchw(got), want) <= tolerance_for("bbox_roi_extractor").rtol


@S
@given(sc=st.integers(0, 2), sf=st.integers(0, 2), cc=st.integers(0, 1), cf=st.integers(0, 1),
       classes=st.integers(1, 5), agnostic=st.booleans(), avg=st.booleans(), seed=st.integers(0, 99))
def test_convfc_bbox_head(sc, sf, cc, cf, classes, agnostic, avg, seed):
    assume(sc + sf + cc + cf > 0 and not (cc > 0 and sf > 0))  # visdet's constructor checks
    cfg = ConvFCBBoxHeadCfg(num_shared_convs=sc, num_shared_fcs=sf, num_cls_convs=cc, num_cls_fcs=cf,
                            num_reg_convs=cc, num_reg_fcs=cf, conv_out_channels=8, fc_out_channels=16,
                            in_channels=4, num_classes=classes, reg_class_agnostic=agnostic, with_avg_pool=avg)
    ref, flax = RefBBox(cfg), ConvFCBBoxHead(cfg, rngs=nnx.Rngs(0))
    convert_into("bbox_head", flax, ref, seed)
    x = np.random.default_rng(seed).normal(size=(9, 4, 7, 7)).astype(np.float32)
    with torch.no_grad():
        c, r = ref.eval()(torch.from_numpy(x))
    gc, gr = jax.jit(flax)(nchw_to_nhwc(x))
    assert rel_err(gc, c.numpy()) <= tolerance_for("bbox_head").rtol
    assert rel_err(gr, r.numpy()) <= tolerance_for("bbox_head").rtol


@S
@given(num_convs=st.integers(0, 4), classes=st.integers(1, 5), agnostic=st.booleans(), seed=st.integers(0, 99))
def test_fcn_mask_head(num_convs, classes, agnostic, seed):
    cfg = FCNMaskHeadCfg(num_convs=num_convs, in_channels=4, conv_out_channels=6, num_classes=classes,
                         class_agnostic=agnostic)
    ref, flax = RefMask(cfg), FCNMaskHead(cfg, rngs=nnx.Rngs(0))
    convert_into("mask_head", flax, ref, seed)
    x = np.random.default_rng(seed).normal(size=(5, 4, 14, 14)).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x)).numpy()
    got = jax.jit(flax)(nchw_to_nhwc(x))
    assert rel_err(nhwc_to_nchw(got), want) <= tolerance_for("mask_head").rtol


@pytest.mark.goldens
def test_mask_branch_buckets_equal_full():
    """predict_mask runs the mask head on the smallest row bucket holding the valid detections
    (lax.switch); valid rows must equal running it on all D rows (up to conv rounding: another
    batch size may block the GEMMs differently), padded rows must be empty."""
    from flaxdet.config import load_config
    from flaxdet.fast_paths.mask_rows import mask_buckets
    from flaxdet.models import build_detector
    from parity_tests.goldens import GOLDENS, require_goldens

    require_goldens()
    rh = build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"), seed=3).roi_head
    d = 12
    assert mask_buckets(d) == (2, 3, 6, 12) and mask_buckets(100) == (13, 25, 50, 100)
    sf = jnp.ones((2, 4), jnp.float32)
    run = jax.jit(lambda f, dt: rh.predict_mask(f, dt, sf, (128, 128)))
    for seed, counts in enumerate([(0, 0), (0, 1), (2, 3), (5, 1), (12, 7)]):  # each bucket, and none
        rng = np.random.default_rng(seed)
        feats = tuple(jnp.asarray(rng.normal(size=(2, 96 // s, 128 // s, rh.mask_roi_extractor.cfg.out_channels)),
                                  jnp.float32) for s in (4, 8, 16, 32, 64))
        xy = rng.uniform(0, 80, (2, d, 2))
        boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 60, (2, d, 2))], -1), jnp.float32)
        v = np.arange(d)[None] < np.asarray(counts)[:, None]
        dets = dict(bboxes=boxes, scores=jnp.ones((2, d)), labels=jnp.asarray(rng.integers(0, 3, (2, d)), jnp.int32),
                    valid=jnp.asarray(v))
        out, st_ = run(feats, dets)
        full, st_full = run(feats, dict(dets, valid=jnp.ones((2, d), bool)))
        assert (np.asarray(out["masks"])[v] != np.asarray(full["masks"])[v]).sum() <= 2  # 0.5-threshold ties
        assert not np.asarray(out["masks"])[~v].any()
        rows = v.reshape(-1)
        for k in ("mask_roi_extractor", "mask_head.mask_preds") if rows.any() else ():
            assert rel_err(np.asarray(st_[k])[rows], np.asarray(st_full[k])[rows]) <= tolerance_for("mask_head").rtol, k


def test_sampling_flips():
    """Rows whose boxes straddle a RoIAlign discontinuity (level, adaptive grid) are flagged; others not."""
    from flaxdet.parity.harness import RoIGeometry, sampling_flips

    geo = RoIGeometry(strides=(4, 8, 16, 32), finest_scale=56, output_size=(7, 7), sampling_ratio=0)
    base = np.array([[10, 10, 38, 30.0],  # bin_w = 28 / 4 / 7 = 1.0 exactly
                     [0, 0, 50, 50.0],  # interior: nothing near a boundary
                     [0, 0, 112, 112.0]])  # sqrt(area) / 56 = 2: level boundary 0 | 1
    moved = base + np.array([[0, 0, 1e-3, 0], [0, 0, 1e-3, 0], [0, 0, 1e-3, 1e-3]])
    assert sampling_flips(moved, base, geo).tolist() == [True, False, True]
    assert not sampling_flips(base, base, geo).any()  # identical boxes never flip
    assert not sampling_flips(moved, base, None).any()
    fixed = RoIGeometry(strides=(4, 8, 16, 32), finest_scale=56, output_size=(7, 7), sampling_ratio=2)
    assert sampling_flips(moved, base, fixed).tolist() == [False, False, True]  # fixed grid: level only
