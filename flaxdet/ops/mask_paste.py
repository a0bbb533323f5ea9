"""Mask pasting equal to visdet's ``_do_paste_mask`` (CPU path: one box per chunk, skip_empty=True).

For each box (x1, y1, x2, y2) in the canvas frame, only the region ``[max(floor(y1) - 1, 0),
min(ceil(y2) + 1, H))`` x (same for x) is written; there pixel centres ``i + 0.5`` are mapped to
``g = (i + 0.5 - b1) / (b2 - b1) * 2 - 1`` (inf -> 0 for zero-size boxes) and sampled with
``F.grid_sample(probs, grid, mode='bilinear', padding_mode='zeros', align_corners=False)``, i.e. source
coordinate ``((g + 1) * m - 1) / 2`` with zero contribution from neighbours outside the mask.
Bilinear sampling on a grid that is a product of a row and a column coordinate is separable:
``value = Ay @ P @ Ax^T`` with per-box interpolation matrices Ay (H, mh), Ax (W, mw). The result is
thresholded ``>= threshold`` (visdet's mask_thr_binary). Boxes are processed a few at a time
(``lax.map``), so peak memory is O(chunk * H * W).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _interp_matrix(b0, b1, size, m, lo, hi):
    dt = b0.dtype
    pix = jnp.arange(size, dtype=dt) + 0.5
    g = (pix - b0) / (b1 - b0) * 2 - 1
    g = jnp.where(jnp.isinf(g), 0.0, g)
    src = ((g + 1) * m - 1) / 2
    i0 = jnp.floor(src)
    w1 = src - i0
    w0 = (i0 + 1) - src
    i0 = i0.astype(jnp.int32)
    cols = jnp.arange(m)[None, :]
    a = jnp.where(cols == i0[:, None], w0[:, None], 0) + jnp.where(cols == i0[:, None] + 1, w1[:, None], 0)
    inside = (jnp.arange(size) >= lo) & (jnp.arange(size) < hi)
    return jnp.where(inside[:, None], a, 0)


def _region(box, img_h, img_w):
    x0 = jnp.maximum(jnp.floor(box[0]) - 1, 0)
    y0 = jnp.maximum(jnp.floor(box[1]) - 1, 0)
    x1 = jnp.minimum(jnp.ceil(box[2]) + 1, img_w)
    y1 = jnp.minimum(jnp.ceil(box[3]) + 1, img_h)
    return x0, y0, x1, y1


def paste_masks_float(probs, boxes, img_h: int, img_w: int, chunk: int = 8):
    """(N, mh, mw) probabilities -> (N, img_h, img_w) pasted probabilities (0 outside each region)."""
    n, mh, mw = probs.shape

    def one(args):
        p, b = args
        x0, y0, x1, y1 = _region(b, img_h, img_w)
        ay = _interp_matrix(b[1], b[3], img_h, mh, y0, y1)
        ax = _interp_matrix(b[0], b[2], img_w, mw, x0, x1)
        hp = jax.lax.Precision.HIGHEST
        return jnp.matmul(jnp.matmul(ay, p, precision=hp), ax.T, precision=hp)

    if n == 0:
        return jnp.zeros((0, img_h, img_w), probs.dtype)
    return jax.lax.map(one, (probs, boxes.astype(probs.dtype)), batch_size=min(chunk, n))


def paste_masks(probs, boxes, img_h: int, img_w: int, threshold: float, chunk: int = 8):
    """(N, mh, mw) probabilities -> (N, img_h, img_w) bool masks (``>= threshold``)."""
    n, mh, mw = probs.shape
    if n == 0:
        return jnp.zeros((0, img_h, img_w), bool)

    def one(args):
        p, b = args
        return paste_masks_float(p[None], b[None], img_h, img_w, 1)[0] >= threshold

    return jax.lax.map(one, (probs, boxes.astype(probs.dtype)), batch_size=min(chunk, n))
