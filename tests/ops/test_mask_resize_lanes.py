"""The ``mask_resize_lanes`` fast path (RTMDet-Ins's mask resize, 16 detections at a time as the minor axis) gives
the plain per-detection loop's masks bit for bit: with and without rescale, scale factors that shrink and enlarge,
a detection count that is not a multiple of 16, invalid rows between and after valid ones."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths
from flaxdet.config import load_config, with_num_classes
from flaxdet.models import build_detector


@pytest.fixture(scope="module")
def head():
    cfg = with_num_classes(load_config("rtmdet_ins_tiny"), num_classes=3, log=lambda *_: None)
    return build_detector(cfg).bbox_head


@pytest.mark.parametrize("rescale,scale,canvas", [(False, (1.0, 1.0), None), (True, (1.0, 1.0), (96, 128)),
                                                  (True, (0.75, 0.6), (136, 216)), (True, (1.7, 1.9), (64, 64))])
def test_lanes_equal_the_per_detection_loop(head, rescale, scale, canvas):
    rng = np.random.default_rng(0)
    d, h, w = 37, 12, 16  # padded input 96 x 128 (stride 8)
    logits = jnp.asarray(rng.normal(0, 3, (d, h, w)).astype(np.float32))
    valid = np.ones(d, bool)
    valid[[3, 17, 20]] = False
    valid[30:] = False  # rows past the last valid one are not computed
    sf = jnp.asarray(np.array([scale[1], scale[0], scale[1], scale[0]], np.float32))
    out = {}
    for spec in ("all", "none"):
        with fast_paths.use(spec):
            f = jax.jit(lambda lg, s, v: head.masks_single(lg, s, canvas, rescale, v))
            out[spec] = np.asarray(f(logits, sf, jnp.asarray(valid)))
    assert out["all"].shape == out["none"].shape == (d, *(canvas or (96, 128)))
    assert out["none"][valid].any() and not out["none"][~valid].any()
    np.testing.assert_array_equal(out["all"], out["none"])
