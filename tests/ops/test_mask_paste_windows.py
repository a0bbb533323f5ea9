"""Fast path ``mask_paste_windows`` against the plain paste (whole canvas): bit for bit, probabilities and masks.

Boxes of every kind -- ordinary, at and across the image borders, tiny, zero-size, huge, wholly outside,
NaN / inf -- on canvases whose width is a multiple of 64 (flaxdet's are multiples of 256: windowed in both
axes) and not (rows only), one flat list and batches under ``vmap`` (as the mask head pastes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths
from flaxdet.fast_paths.mask_paste_windows import paste_windows, window_sizes
from flaxdet.ops.mask_paste import _paste


def _plain(probs, boxes, h, w, thr):
    return np.asarray(_paste(jnp.asarray(probs), jnp.asarray(boxes), h, w, thr, 8))


def _windows(probs, boxes, h, w, thr):
    return np.asarray(jax.jit(paste_windows, static_argnums=(2, 3, 4))(jnp.asarray(probs), jnp.asarray(boxes),
                                                                         h, w, thr))


def _boxes(rng, n, h, w):
    """A mix: random sizes from sub-pixel to 1.5x the canvas, anywhere (also past every border), boxes on the
    borders, exact integer / half-integer corners, zero-size, wholly outside, NaN and inf."""
    xy = rng.uniform(-0.25, 1.05, (n, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(0.2), np.log(1.5 * max(h, w)), (n, 2)))
    b = np.concatenate([xy, xy + wh], 1)
    k = n // 8
    b[:k, :2] = rng.uniform(-3, 2, (k, 2))  # at the top-left corner
    b[k:2 * k, 2:] = [w, h] + rng.uniform(-2, 3, (k, 2))  # at the bottom-right corner
    b[2 * k:3 * k] = np.round(b[2 * k:3 * k] * 2) / 2
    b[3 * k, 2] = b[3 * k, 0]  # zero width
    b[3 * k + 1, 3] = b[3 * k + 1, 1] = np.floor(b[3 * k + 1, 1]) + 0.5  # zero height at a pixel centre: NaN
    b[3 * k + 2] = [w + 50, 10, w + 90, 40]  # wholly outside
    b[3 * k + 3] = [-90, -60, -20, -5]
    b[3 * k + 4] = [np.nan, 3, 40, 50]
    b[3 * k + 5] = [-np.inf, 2, np.inf, 30]
    b[3 * k + 6] = [-1e9, -1e9, 1e9, 1e9]  # huge
    b[3 * k + 7] = [0, 0, w, h]  # exactly the canvas
    return b.astype(np.float32)


def _probs(rng, n, m=28):
    return (1 / (1 + np.exp(-rng.normal(0, 4, (n, m, m))))).astype(np.float32)  # sharp, like real masks


def _assert_same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)  # NaN == NaN here


@pytest.mark.parametrize("hw", [(256, 512), (448, 640), (200, 333), (64, 64), (37, 900)])
def test_windows_equal_plain_bit_for_bit(hw):
    h, w = hw
    rng = np.random.default_rng(h * 7 + w)
    probs, boxes = _probs(rng, 96), _boxes(rng, 96, h, w)
    _assert_same(_windows(probs, boxes, h, w, None), _plain(probs, boxes, h, w, None))
    _assert_same(_windows(probs, boxes, h, w, 0.5), _plain(probs, boxes, h, w, 0.5))


def test_windows_equal_plain_on_a_production_canvas():
    """1024 x 1536: the canvas of an 800 x 1333 photo; 100 detections of random size, a mask size of 14."""
    h, w = 1024, 1536
    rng = np.random.default_rng(0)
    probs, boxes = _probs(rng, 100, 14), _boxes(rng, 100, h, w)
    _assert_same(_windows(probs, boxes, h, w, None), _plain(probs, boxes, h, w, None))
    _assert_same(_windows(probs, boxes, h, w, 0.5), _plain(probs, boxes, h, w, 0.5))


def test_batched_under_vmap_equals_one_image_at_a_time():
    """The mask head pastes per image under vmap: the custom batching rule pastes all images' boxes as one list."""
    h, w, n, k = 256, 384, 3, 24
    rng = np.random.default_rng(5)
    probs, boxes = _probs(rng, n * k).reshape(n, k, 28, 28), _boxes(rng, n * k, h, w).reshape(n, k, 4)
    got = np.asarray(jax.jit(jax.vmap(lambda p, b: paste_windows(p, b, h, w, 0.5)))(probs, boxes))
    want = np.stack([_plain(probs[i], boxes[i], h, w, 0.5) for i in range(n)])
    _assert_same(got, want)
    # a box list shared by every image (unbatched operand), nested vmaps
    got = np.asarray(jax.vmap(jax.vmap(lambda p, b: paste_windows(p, b, h, w, None), in_axes=(0, None)),
                              in_axes=(0, None))(probs[None], boxes[0]))
    _assert_same(got[0], np.stack([_plain(probs[i], boxes[0], h, w, None) for i in range(n)]))


def test_switch_selects_the_path():
    """paste_masks follows the fast-path switch; no boxes is an empty result on both paths."""
    from flaxdet.ops.mask_paste import paste_masks

    rng = np.random.default_rng(1)
    probs, boxes = _probs(rng, 16), _boxes(rng, 16, 64, 128)
    outs = {}
    for spec in (["mask_paste_windows"], "none"):
        with fast_paths.use(spec):
            jaxpr = str(jax.make_jaxpr(lambda p, b: paste_masks(p, b, 64, 128, 0.5))(probs, boxes))
            outs[str(spec)] = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), 64, 128, 0.5))
            assert ("custom_vmap" in jaxpr) == (spec != "none")
            assert paste_masks(jnp.zeros((0, 28, 28)), jnp.zeros((0, 4)), 10, 12, 0.5).shape == (0, 10, 12)
    _assert_same(*outs.values())


def test_window_sizes():
    assert window_sizes(1536, 64) == (64, 128, 256, 512, 1024, 1536)
    assert window_sizes(1024) == (64, 128, 256, 512, 1024)
    assert window_sizes(40) == (40,)
    assert window_sizes(200, 64) == (64, 128, 200)
    assert window_sizes(200, 3) == (200,)


@pytest.mark.goldens
def test_mask_rcnn_mask_branch_unchanged_at_batch_2():
    """The golden tiny Mask R-CNN's mask branch (RoIAlign, mask head, paste under vmap) on two recorded photos in
    one batch -- visdet's recorded FPN features and detections as its inputs, canvas 512 x 768 --: every mask the
    same with the fast path on and off (all other fast paths as the backend's defaults)."""
    from flaxdet.config import load_config
    from flaxdet.fast_paths.mask_rows import mask_rows_for_count
    from flaxdet.inference import make_batch, unpad
    from flaxdet.models import build_detector
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict
    from parity_tests.goldens import config_path, golden_image

    case = "mask_rcnn_tiny_r18"
    model = build_detector(load_config(str(config_path(case))))
    load_visdet_state_dict(model, load_checkpoint(config_path(case).parent / "checkpoint.pth").state_dict)
    gs = [golden_image(case, name) for name in ("coco_test_12510", "voc_000001")]
    batch = make_batch([g["input_bgr_uint8"] for g in gs], [g.meta for g in gs])
    neck = []
    for lvl in range(5):  # NCHW -> NHWC, zero padded to the batch's size
        fs = [g[f"neck.{lvl}"][0].transpose(1, 2, 0) for g in gs]
        hw = np.max([f.shape[:2] for f in fs], 0)
        neck.append(jnp.asarray(np.stack([np.pad(f, [(0, hw[0] - f.shape[0]), (0, hw[1] - f.shape[1]), (0, 0)])
                                          for f in fs])))
    sf = jnp.asarray(batch.scale_factors)
    dets = dict(bboxes=jnp.asarray(np.stack([g["det.bboxes"] for g in gs])) * sf[:, None],  # the network's frame
                labels=jnp.asarray(np.stack([g["det.labels"] for g in gs])),
                scores=jnp.asarray(np.stack([g["det.scores"] for g in gs])))
    dets["valid"] = jnp.ones(dets["scores"].shape, bool).at[1, 60:].set(False)
    rows = mask_rows_for_count(100, 100)
    mask_branch = jax.jit(lambda neck, dets, sf: model.roi_head.predict_mask(neck, dets, sf, batch.canvas_hw,
                                                                             rows=rows)[0])
    others = fast_paths.active() - {"mask_paste_windows"}
    runs = []
    for spec in (others | {"mask_paste_windows"}, others):
        with fast_paths.use(spec):
            runs.append(unpad(jax.device_get(mask_branch(neck, dets, sf)), batch))
    for fast, plain in zip(*runs):
        assert len(fast["scores"]) == len(plain["scores"]) > 0 and fast["masks"].any()
        for k in ("bboxes", "scores", "labels", "masks"):
            np.testing.assert_array_equal(fast[k], plain[k])
