"""torchvision's RoIAlign sampling as per-RoI interpolation matrices (shared by the plain path,
:func:`flaxdet.ops.roi_align.roi_align`, and the ``roi_align_tiers`` fast path).

torchvision (CPU kernel ``roi_align_kernel.cpp``), per axis (y shown): ``offset = 0.5 if aligned else 0``;
``start = y1 * scale - offset``; ``roi_h = y2 * scale - offset - start`` (``max(roi_h, 1)`` only when not
aligned); ``bin = roi_h / oh``; ``grid = sampling_ratio if > 0 else ceil(bin)``; samples
``y = start + p * bin + (iy + .5) * bin / grid``; a sample with ``y < -1 or y > H or x < -1 or x > W``
contributes 0 (but is counted); otherwise ``y = max(y, 0)``, ``y_low = int(y)``, at ``y_low >= H - 1`` both
neighbours are row H - 1, and the value is bilinear; a bin is its sample sum divided by
``max(grid_h * grid_w, 1)`` (0 when a grid is <= 0).

A sample's weight is separable, ``w(y, x) = wy(y) * wx(x)`` (the out-of-range rule is a product of per-axis
indicators), so bin (p, q) equals ``Wy[p] . F[b] . Wx[q]^T / count`` with per-RoI interpolation matrices Wy
(oh, rows), Wx (ow, cols) over a crop of rows/cols (the whole map, or a window holding the RoI's support).
Row r of Wy only takes weight from samples whose clamped position lies in [r - 1, r + 1) (row 0 also from
[-1, 0], the last row up to H); the adaptive grid spaces samples by ``bin / ceil(bin) > 0.5``, so that is at
most 4 samples, located arithmetically: Wy costs O(oh * rows * 8) whatever the grid, so huge RoIs and
elongated ones (grids far above 30) are exact. A fixed ``sampling_ratio`` enumerates its samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxdet.ops import exact_div

HI = jax.lax.Precision.HIGHEST


def geometry(roi, scale, out_hw, sampling_ratio, aligned):
    """Per axis (y, x): (start, bin size, grid count) in the feature dtype, as torchvision computes them."""
    off = 0.5 if aligned else 0.0
    geo = []
    for lo_i, hi_i, n in ((2, 4, out_hw[0]), (1, 3, out_hw[1])):
        start = roi[lo_i] * scale - off
        size = roi[hi_i] * scale - off - start
        if not aligned:
            size = jnp.maximum(size, 1.0)
        bin_size = exact_div(size, n)  # not size * (1/n): ceil(bin_size) below must see torch's quotient
        grid = jnp.asarray(sampling_ratio, roi.dtype) if sampling_ratio > 0 else jnp.ceil(bin_size)
        geo.append((start, bin_size, grid))
    return geo


def support(start, bin_size, n_out, size):
    """Inclusive row range [lo, hi] that can receive weight (1 row of slack for float rounding)."""
    end = start + bin_size * n_out
    a = jnp.floor(jnp.clip(jnp.minimum(start, end), 0, size - 1)) - 1
    b = jnp.floor(jnp.clip(jnp.maximum(start, end), 0, size - 1)) + 2
    return jnp.clip(a, 0, size - 1).astype(jnp.int32), jnp.clip(b, 0, size - 1).astype(jnp.int32)


def crop_origin(lo, size, win):
    return jnp.clip(lo, 0, size - win)


def axis_weights(start, bin_size, grid, n_out, size, r0, win, sampling_ratio):
    """(n_out, win) summed bilinear weights of rows r0 .. r0 + win - 1 for each output bin.

    Row r takes weight only from samples with clamped position in [r - 1, r + 1) (row 0 also from
    [-1, 0], row size - 1 up to size). With a fixed ``sampling_ratio`` all its samples are
    enumerated; with the adaptive grid (spacing > 0.5 when grid > 1) at most 5 samples fall in
    such an interval, so 8 candidates starting 2 before the first one (found arithmetically) suffice.
    """
    dt = start.dtype
    bin_start = start + jnp.arange(n_out, dtype=dt)[:, None, None] * bin_size  # (n_out, 1, 1)
    rows = r0 + jnp.arange(win)[None, :, None]  # (1, win, 1)
    if sampling_ratio > 0:
        t = jnp.arange(sampling_ratio, dtype=dt)[None, None, :]
    else:
        f = jnp.ceil((rows.astype(dt) - 1.0 - bin_start) / exact_div(bin_size, grid) - 0.5) - 2
        t = jnp.where(jnp.isnan(f), 2 ** 24, jnp.clip(f, -2, 2 ** 24)) + jnp.arange(8, dtype=dt)
    y = bin_start + exact_div((t + 0.5) * bin_size, grid)  # torchvision's sample positions, same rounding
    ok = (t >= 0) & (t < grid) & (y >= -1.0) & (y <= size)
    y = jnp.maximum(jnp.where(ok, y, 0), 0)
    low = jnp.floor(y).astype(jnp.int32)
    top = low >= size - 1
    low = jnp.where(top, size - 1, low)
    ly = jnp.where(top, 0, y - low.astype(dt))
    w = jnp.where(ok & (low == rows), 1.0 - ly, 0) + jnp.where(ok & (low + 1 == rows), ly, 0)
    return w.sum(-1)


def plan(roi, win, hw, args):
    """Crop start (b, r0, c0, 0), interpolation matrices Wy (oh, win_h), Wx (ow, win_w) and the count."""
    out_hw, scale, sampling_ratio, aligned = args
    (ys, yb, yg), (xs, xb, xg) = geometry(roi, scale, out_hw, sampling_ratio, aligned)
    r0 = crop_origin(support(ys, yb, out_hw[0], hw[0])[0], hw[0], win[0])
    c0 = crop_origin(support(xs, xb, out_hw[1], hw[1])[0], hw[1], win[1])
    wy = axis_weights(ys, yb, yg, out_hw[0], hw[0], r0, win[0], sampling_ratio)
    wx = axis_weights(xs, xb, xg, out_hw[1], hw[1], c0, win[1], sampling_ratio)
    return (roi[0].astype(jnp.int32), r0, c0, jnp.int32(0)), wy, wx, jnp.maximum(yg * xg, 1.0)


def contract(patch, wy, wx, count):
    """(oh, ow, C) bins of a (win_h, win_w, C) crop: ``wy @ patch @ wx^T / count``. Rows first as one
    matmul (oh, win_h) @ (win_h, win_w * C); the column contraction is a fused multiply-sum (a second
    dot would transpose the crop: measured 1.5x slower on XLA:CPU)."""
    t = jnp.matmul(wy, patch.reshape(patch.shape[0], -1), precision=HI).reshape(wy.shape[0], patch.shape[1], -1)
    return (t[:, None] * wx[None, :, :, None]).sum(2) / count
