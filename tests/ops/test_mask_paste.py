"""flaxdet.ops.mask_paste against visdet's ``_do_paste_mask`` (skip_empty=True, one box at a time)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxdet.ops.mask_paste import paste_masks, paste_masks_float
from flaxdet_reference.models.roi_heads.mask_heads.fcn_mask_head import paste_masks as ref_paste

N = 12  # boxes per example


def _paste_one64(mask, box, img_h, img_w):
    """visdet ``_do_paste_mask`` for one box, in float64 (the reference module is float32 only)."""
    x0_int, y0_int = torch.clamp(box.floor()[:2] - 1, min=0).to(torch.int32)
    x1_int = torch.clamp(box[2].ceil() + 1, max=img_w).to(torch.int32)
    y1_int = torch.clamp(box[3].ceil() + 1, max=img_h).to(torch.int32)
    out = torch.zeros(img_h, img_w, dtype=torch.float64)
    if x1_int <= x0_int or y1_int <= y0_int:  # visdet's torch.arange would raise; nothing is written
        return out
    img_y = torch.arange(y0_int, y1_int, dtype=torch.float64) + 0.5
    img_x = torch.arange(x0_int, x1_int, dtype=torch.float64) + 0.5
    img_y = (img_y - box[1]) / (box[3] - box[1]) * 2 - 1
    img_x = (img_x - box[0]) / (box[2] - box[0]) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[None, :].expand(len(img_y), len(img_x))
    gy = img_y[:, None].expand(len(img_y), len(img_x))
    grid = torch.stack([gx, gy], dim=2)[None]
    out[y0_int:y1_int, x0_int:x1_int] = F.grid_sample(mask[None, None], grid, align_corners=False)[0, 0]
    return out


def _ref32(probs, boxes, img_h, img_w):
    """The lead's reference (visdet's CPU path), one box per call; empty regions write nothing."""
    out = np.zeros((len(probs), img_h, img_w), np.float32)
    for i in range(len(probs)):
        b = boxes[i]
        if min(np.ceil(b[2]) + 1, img_w) <= max(np.floor(b[0]) - 1, 0) or \
                min(np.ceil(b[3]) + 1, img_h) <= max(np.floor(b[1]) - 1, 0):
            continue
        chunk, (ys, xs) = ref_paste(torch.from_numpy(probs[i:i + 1, None]), torch.from_numpy(boxes[i:i + 1]),
                                    img_h, img_w)
        out[i, ys, xs] = chunk[0].numpy()
    return out


def _floats(lo, hi):
    # XLA on CPU flushes subnormals to zero: keep every coordinate (and half-width) normal or 0
    return st.floats(lo, hi).map(lambda v: 0.0 if abs(v) < 1e-300 else v)


@st.composite
def boxes_st(draw, img_h, img_w):
    """Boxes of every kind: ordinary, partly / fully outside, tiny, zero width or height, huge."""
    out = []
    for _ in range(N):
        kind = draw(st.integers(0, 5))
        cx = draw(_floats(-0.3 * img_w, 1.3 * img_w))
        cy = draw(_floats(-0.3 * img_h, 1.3 * img_h))
        if kind == 0:
            w, h = draw(_floats(2, img_w)), draw(_floats(2, img_h))
        elif kind == 1:  # tiny
            w, h = draw(_floats(0, 1.5)), draw(_floats(0, 1.5))
        elif kind == 2:  # zero width / height (maybe at a pixel centre: visdet then yields NaN -> False)
            w, h = 0.0, draw(_floats(0, img_h))
            cx = np.floor(cx) + draw(st.sampled_from([0.0, 0.5, 0.25]))
            if draw(st.booleans()):
                w, h, cx, cy = draw(_floats(0, img_w)), 0.0, cy, np.floor(cy) + 0.5
        elif kind == 3:  # huge
            w, h = draw(_floats(img_w, 4 * img_w)), draw(_floats(img_h, 4 * img_h))
        elif kind == 4:  # integer / half-integer coordinates
            w, h = float(draw(st.integers(1, img_w))), float(draw(st.integers(1, img_h)))
            cx, cy = np.round(cx * 2) / 2, np.round(cy * 2) / 2
        else:  # fully outside
            cx, cy = draw(st.sampled_from([-40.0, img_w + 40.0])), cy
            w, h = draw(_floats(0, 30)), draw(_floats(0, 30))
        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), canvas=st.sampled_from([(37, 53), (64, 48)]), msize=st.sampled_from([(28, 28), (7, 11)]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_probabilities_match_float64(data, canvas, msize, seed):
    img_h, img_w = canvas
    boxes = data.draw(boxes_st(img_h, img_w))
    probs = np.random.default_rng(seed).random((N, *msize))
    ref = np.stack([_paste_one64(torch.from_numpy(p), torch.from_numpy(b), img_h, img_w).numpy()
                    for p, b in zip(probs, boxes)])
    with jax.enable_x64(True):
        got = paste_masks_float(jnp.asarray(probs), jnp.asarray(boxes), img_h, img_w, chunk=5)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-10, equal_nan=True)
        binary = paste_masks(jnp.asarray(probs), jnp.asarray(boxes), img_h, img_w, 0.5, chunk=5)
        np.testing.assert_array_equal(np.asarray(binary), ref >= 0.5)


def _float32_case(seed, n, img_h, img_w):
    rng = np.random.default_rng(seed)
    probs = 1 / (1 + np.exp(-rng.normal(0, 4, (n, 28, 28)))).astype(np.float32)  # sharp, like real masks
    xy = rng.uniform(-0.1, 1.0, (n, 2)) * [img_w, img_h]
    wh = np.exp(rng.uniform(np.log(2), np.log(0.8 * min(img_h, img_w)), (n, 2)))
    return probs, np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_binary_float32_close_to_reference():
    img_h, img_w, n = 427, 640, 60
    probs, boxes = _float32_case(0, n, img_h, img_w)
    ref = _ref32(probs, boxes, img_h, img_w)
    fn = jax.jit(paste_masks, static_argnums=(2, 3, 4))
    got = np.asarray(fn(jnp.asarray(probs), jnp.asarray(boxes), img_h, img_w, 0.5))
    flips = int((got != (ref >= 0.5)).sum())
    prob = np.asarray(paste_masks_float(jnp.asarray(probs), jnp.asarray(boxes), img_h, img_w))
    print(f"float32: {flips} flipped pixels of {got.size}; max |p - ref| = {np.abs(prob - ref).max():.2e}")
    assert flips <= 1e-4 * got.size
    assert np.abs(prob - ref).max() < 1e-5


def test_large_canvas_bounded_memory():
    img_h, img_w, n = 800, 1333, 100
    probs, boxes = _float32_case(1, n, img_h, img_w)
    fn = jax.jit(paste_masks, static_argnums=(2, 3, 4))
    compiled = fn.lower(jnp.asarray(probs), jnp.asarray(boxes), img_h, img_w, 0.5).compile()
    mem = compiled.memory_analysis()
    if mem is not None:  # a few (chunk) float canvases of scratch, not N of them
        assert mem.temp_size_in_bytes < 16 * img_h * img_w * 4, mem.temp_size_in_bytes
    out = compiled(jnp.asarray(probs), jnp.asarray(boxes))
    assert out.shape == (n, img_h, img_w) and out.dtype == jnp.bool_
    ref = _ref32(probs[:5], boxes[:5], img_h, img_w) >= 0.5
    assert int((np.asarray(out[:5]) != ref).sum()) <= 1e-4 * ref.size
    assert paste_masks(jnp.zeros((0, 28, 28)), jnp.zeros((0, 4)), 10, 12, 0.5).shape == (0, 10, 12)
