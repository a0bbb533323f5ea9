"""SingleRoIExtractor, ConvFCBBoxHead family and FCNMaskHead: flaxdet vs reference on random configs."""
import jax
import jax.numpy as jnp
import numpy as np
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
@given(sc=st.integers(0, 2), sf=st.integers(0, 2), cc=st.integers(0, 1), cf=st.integers(0, 1), classes=st.integers(1, 5),
       agnostic=st.booleans(), avg=st.booleans(), seed=st.integers(0, 99))
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
