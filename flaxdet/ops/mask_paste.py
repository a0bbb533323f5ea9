"""Mask pasting equal to visdet's ``_do_paste_mask`` (CPU path: one box per call, skip_empty=True).

For a box (x1, y1, x2, y2) in the canvas frame only the region rows ``[max(floor(y1) - 1, 0),
min(ceil(y2) + 1, H))`` x columns (same for x) are written, everything else is 0 / False. There pixel
centres ``i + 0.5`` map to ``g = (i + 0.5 - x1) / (x2 - x1) * 2 - 1`` (``inf -> 0`` for zero-size boxes;
``0/0`` stays NaN, as in visdet) and are sampled by ``F.grid_sample(probs, grid, mode='bilinear',
padding_mode='zeros', align_corners=False)``: source coordinate ``s = ((g + 1) * m - 1) / 2`` (computed as
``(g + 1) * (m / 2) - 0.5``, like the vectorised CPU kernel),
``w = s - floor(s)``, weights ``1 - w`` and ``w`` on ``floor(s)`` and ``floor(s) + 1``, neighbours outside
the mask contribute 0. A product grid makes bilinear sampling separable: ``value = Ay @ P @ Ax^T`` with
per-box interpolation matrices Ay (H, mh) and Ax (W, mw) (float32 results may differ from torch's
2-D weight products by rounding, which can flip pixels lying exactly at the threshold).
``paste_masks`` thresholds ``>= threshold`` (visdet's ``mask_thr_binary``). A box wholly outside the
canvas has an empty region (visdet's ``torch.arange`` would raise there). Boxes go ``chunk`` at a time
through a ``fori_loop`` writing into the result: peak memory O(chunk * H * W) besides the (N, H, W)
result. Computed in ``promote_types(probs.dtype, float32)``.

That is the plain path. On the fast path ``mask_paste_windows`` (:mod:`flaxdet.fast_paths.mask_paste_windows`)
each box is computed only on a static window around its region, with the same values bit for bit.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet import fast_paths


def _interp(b0, b1, size, m, start=None, win=None):
    """(size, m) grid_sample weights for pixel centres 0.5 .. size - 0.5, and the region mask (size,).
    With ``start`` (traced int) and ``win`` (static): only pixels ``start .. start + win - 1`` of the
    ``size`` (the same values those rows have in the whole)."""
    dt = b0.dtype
    pix = jnp.arange(size) if start is None else start + jnp.arange(win)
    xs = jnp.arange(size, dtype=dt) if start is None else pix.astype(dt)
    g = (xs + 0.5 - b0) / (b1 - b0) * 2 - 1
    g = jnp.where(jnp.isinf(g), 0, g)
    s = (g + 1) * (m / 2) - 0.5
    i0 = jnp.floor(s)
    w = s - i0
    i0 = jnp.where(jnp.isnan(s), -2, i0).astype(jnp.int32)
    cols = jnp.arange(m)
    a = jnp.where(cols == i0[:, None], (1 - w)[:, None], 0) + jnp.where(cols == i0[:, None] + 1, w[:, None], 0)
    a = jnp.where(jnp.isnan(s)[:, None], jnp.nan, a)  # visdet: a NaN coordinate gives NaN
    region = (pix >= jnp.maximum(jnp.floor(b0) - 1, 0)) & (pix < jnp.minimum(jnp.ceil(b1) + 1, size))
    return a, region


def _paste_one(p, box, img_h, img_w):
    ay, ry = _interp(box[1], box[3], img_h, p.shape[0])
    ax, rx = _interp(box[0], box[2], img_w, p.shape[1])
    hp = jax.lax.Precision.HIGHEST
    out = jnp.matmul(jnp.matmul(ay, p, precision=hp), ax.T, precision=hp)
    return jnp.where(ry[:, None] & rx[None, :], out, 0)


@partial(jax.jit, static_argnames=("img_h", "img_w", "threshold", "chunk"))
def _paste(probs, boxes, img_h, img_w, threshold, chunk):
    n = probs.shape[0]
    if n == 0:
        return jnp.zeros((0, img_h, img_w), jnp.float32 if threshold is None else bool)

    m = min(chunk, n)
    dt = jnp.promote_types(probs.dtype, jnp.float32)
    probs, boxes = probs.astype(dt), boxes.astype(dt)

    def one(p, b):
        out = _paste_one(p, b, img_h, img_w)
        return out if threshold is None else out >= threshold

    def body(i, out):  # the last chunk starts at n - m (recomputing a few masks): no padded copy
        s = jnp.minimum(i * m, n - m)
        p = jax.lax.dynamic_slice_in_dim(probs, s, m)
        b = jax.lax.dynamic_slice_in_dim(boxes, s, m)
        return jax.lax.dynamic_update_slice_in_dim(out, jax.vmap(one)(p, b), s, 0)

    out = jnp.zeros((n, img_h, img_w), probs.dtype if threshold is None else bool)
    return jax.lax.fori_loop(0, -(-n // m), body, out)


def _dispatch(probs, boxes, img_h, img_w, threshold, chunk):
    if fast_paths.enabled("mask_paste_windows"):
        from flaxdet.fast_paths.mask_paste_windows import paste_windows

        return paste_windows(probs, boxes, img_h, img_w, threshold)
    return _paste(probs, boxes, img_h, img_w, threshold, chunk)


def paste_masks_float(probs, boxes, img_h: int, img_w: int, chunk: int = 8):
    """probs (N, mh, mw), boxes (N, 4) x1y1x2y2 in the canvas -> (N, img_h, img_w) pasted
    probabilities (0 outside each box's region). ``chunk``: boxes per step of the plain path."""
    return _dispatch(probs, boxes, int(img_h), int(img_w), None, int(chunk))


def paste_masks(probs, boxes, img_h: int, img_w: int, threshold: float, chunk: int = 8):
    """probs (N, mh, mw), boxes (N, 4) -> (N, img_h, img_w) bool masks ``pasted >= threshold``."""
    return _dispatch(probs, boxes, int(img_h), int(img_w), float(threshold), int(chunk))
