import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxdet.config import AnchorGeneratorCfg, NMSCfg, RPNHeadCfg, RPNProposalCfg
from flaxdet.models.dense_heads.rpn_head import RPNHead
from flaxdet.parity import compare_detections, format_table, tolerance_for
from flaxdet_reference.models.dense_heads.rpn_head import RPNHead as RefRPNHead
from parity_tests.models.common import convert_into, nchw_to_nhwc, nhwc_to_nchw, rel_err


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(num_convs=st.integers(1, 2), ratios=st.sampled_from([(0.5, 1.0, 2.0), (1.0,)]),
       scales=st.sampled_from([(8,), (4, 8)]), nms_pre=st.sampled_from([50, 300]), max_per=st.sampled_from([40, 200]),
       iou=st.sampled_from([0.5, 0.7]), h=st.integers(40, 130), w=st.integers(40, 130), seed=st.integers(0, 99))
def test_rpn_head_and_proposals(num_convs, ratios, scales, nms_pre, max_per, iou, h, w, seed):
    test_cfg = RPNProposalCfg(nms_pre=nms_pre, max_per_img=max_per, nms=NMSCfg(iou_threshold=iou))
    cfg = RPNHeadCfg(in_channels=8, feat_channels=8, num_convs=num_convs, test_cfg=test_cfg,
                     anchor_generator=AnchorGeneratorCfg(ratios=ratios, scales=scales, strides=(4, 8, 16, 32, 64)))
    ref = RefRPNHead(cfg)
    flax = RPNHead(cfg, rngs=nnx.Rngs(0))
    convert_into("rpn_head", flax, ref, seed)
    rng = np.random.default_rng(seed)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    feats = [rng.normal(size=(1, 8, hp // s, wp // s)).astype(np.float32) for s in (4, 8, 16, 32, 64)]
    feats[-1] = feats[-2][:, :, ::2, ::2].copy()
    with torch.no_grad():
        cls, reg = ref([torch.from_numpy(f) for f in feats])
        props = ref.predict_by_feat(cls, reg, [dict(img_shape=(h, w))], test_cfg)[0]
    gcls, greg = jax.jit(flax)(tuple(nchw_to_nhwc(f) for f in feats))
    for a, b in zip(gcls + greg, cls + reg):
        assert rel_err(nhwc_to_nchw(a), b.numpy()) <= tolerance_for("rpn_head").rtol
    # proposals from the same (torch) head outputs: exact up to score ties
    tc = [nchw_to_nhwc(c.numpy()) for c in cls]
    tr = [nchw_to_nhwc(r.numpy()) for r in reg]
    boxes, scores, valid = flax.predict_by_feat(tc, tr, jnp.asarray([[h, w]], jnp.int32), test_cfg)
    v = np.asarray(valid[0])
    rows = compare_detections("proposals", {"bboxes": np.asarray(boxes[0])[v], "scores": np.asarray(scores[0])[v]},
                              {k: props[k].numpy() for k in ("bboxes", "scores")}, box_atol=1e-4, score_atol=1e-6)
    assert all(r.passed for r in rows), format_table(rows)
