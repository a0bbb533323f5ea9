"""RoIAlign equal to ``torchvision.ops.roi_align`` (CPU kernel) for every RoI, NHWC, static shapes.

torchvision: ``offset = 0.5 if aligned``; ``start = x1 * scale - offset``; ``roi_w = x2 * scale - offset -
start`` (clamped to >= 1 only when not aligned); ``bin = roi_w / out_w``; samples per bin
``grid = sampling_ratio`` or, adaptively, ``ceil(roi_w / out_w)``; sample ``x = start + pw * bin +
(ix + .5) * bin / grid``; bilinear value with the border rules (a sample with y < -1 or y > H or
x < -1 or x > W contributes 0; coordinates <= 0 clamp to 0; at >= size-1 the last row/column is
used); the bin is the sum over samples divided by ``grid_h * grid_w``.

Design (exact, bounded memory). A sample's bilinear weight is separable, w(y, x) = wy(y) * wx(x)
(the out-of-range rule is a product of per-axis indicators too), so a bin's average is
``Wy[p] . F . Wx[q]^T / count`` with per-RoI interpolation matrices ``Wy`` (out_h, H) and ``Wx``
(out_w, W) built by scatter-adding the per-sample weights. Only samples inside [-1, H] contribute and
their spacing ``bin / grid`` exceeds 0.5 whenever grid > 1, so each bin needs at most ``2 * H + 6``
consecutive samples starting at the first in-range one: the sample loop is bounded by the map size,
never by the RoI size (huge or elongated RoIs with grids over 30 are exact).

The contraction runs on a ``window`` x ``window`` crop around the RoI (``dynamic_slice``), for chunks
of RoIs at a time (``lax.map``); memory O(chunk * window^2 * C). RoIs whose support does not fit
the window (rare: very elongated, or huge relative to the level) are recomputed against the whole
map by a sequential scan that only evaluates that branch for them (``lax.cond``, not vmapped).
Gradients flow to ``features`` (RoI coordinates are treated as constants, as in torchvision).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(start, bin_size, grid, n_out, size, lo, length, n_samples):
    """(n_out, length) weights of rows lo..lo+length-1 for the samples of each output bin."""
    dt = start.dtype
    p = jnp.arange(n_out, dtype=dt)[:, None]
    bin_start = start + p * bin_size
    step = bin_size / grid
    # first sample index with y >= -1 (earlier samples contribute nothing)
    first = jnp.clip(jnp.ceil((-1.0 - bin_start) / step - 0.5), 0, None)
    first = jnp.where(jnp.isfinite(first), first, 0)
    t = first + jnp.arange(n_samples, dtype=dt)[None, :]
    y = bin_start + (t + 0.5) * bin_size / grid
    ok = (t < grid) & (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0)
    y_low = jnp.floor(y).astype(jnp.int32)
    top = y_low >= size - 1
    y_low = jnp.where(top, size - 1, y_low)
    y_high = jnp.where(top, size - 1, y_low + 1)
    y = jnp.where(top, y_low.astype(dt), y)
    ly = y - y_low
    hy = 1.0 - ly
    rows = jnp.broadcast_to(jnp.arange(n_out)[:, None], y_low.shape)
    w = jnp.zeros((n_out, length), dt)
    w = w.at[rows, y_low - lo].add(jnp.where(ok, hy, 0), mode="drop")
    return w.at[rows, y_high - lo].add(jnp.where(ok, ly, 0), mode="drop")


def _geometry(roi, spatial_scale, out_hw, sampling_ratio, aligned):
    offset = 0.5 if aligned else 0.0
    x1 = roi[1] * spatial_scale - offset
    y1 = roi[2] * spatial_scale - offset
    rw = roi[3] * spatial_scale - offset - x1
    rh = roi[4] * spatial_scale - offset - y1
    if not aligned:
        rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
    bh, bw = rh / out_hw[0], rw / out_hw[1]
    if sampling_ratio > 0:
        gh = gw = jnp.asarray(sampling_ratio, roi.dtype)
    else:
        gh, gw = jnp.ceil(rh / out_hw[0]), jnp.ceil(rw / out_hw[1])
    return y1, x1, bh, bw, gh, gw


def _extent(start, bin_size, n_out, size):
    """Rows that can receive weight: [floor(max(start, 0)), ceil(end) + 1] clipped to the map."""
    lo = jnp.floor(jnp.clip(start, 0, size - 1))
    hi = jnp.floor(jnp.clip(start + bin_size * n_out, 0, size - 1)) + 1
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _one(feat, roi, out_hw, spatial_scale, sampling_ratio, aligned, win_h, win_w):
    """One RoI against a (win_h, win_w) window of its image's map (the full map if win == size)."""
    _, h, w, c = feat.shape
    y1, x1, bh, bw, gh, gw = _geometry(roi, spatial_scale, out_hw, sampling_ratio, aligned)
    ylo, _ = _extent(y1, bh, out_hw[0], h)
    xlo, _ = _extent(x1, bw, out_hw[1], w)
    r0 = jnp.clip(ylo, 0, h - win_h)
    c0 = jnp.clip(xlo, 0, w - win_w)
    ns_h = sampling_ratio if sampling_ratio > 0 else 2 * win_h + 6
    ns_w = sampling_ratio if sampling_ratio > 0 else 2 * win_w + 6
    wy = _axis_weights(y1, bh, gh, out_hw[0], h, r0, win_h, ns_h)
    wx = _axis_weights(x1, bw, gw, out_hw[1], w, c0, win_w, ns_w)
    b = roi[0].astype(jnp.int32)
    patch = jax.lax.dynamic_slice(feat, (b, r0, c0, 0), (1, win_h, win_w, c))[0]
    t = jnp.einsum("ph,hwc->pwc", wy, patch, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("pwc,qw->pqc", t, wx, precision=jax.lax.Precision.HIGHEST)
    count = jnp.maximum(gh * gw, 1.0)
    return out / count


def _fits(roi, out_hw, spatial_scale, sampling_ratio, aligned, h, w, win_h, win_w):
    y1, x1, bh, bw, _, _ = _geometry(roi, spatial_scale, out_hw, sampling_ratio, aligned)
    ylo, yhi = _extent(y1, bh, out_hw[0], h)
    xlo, xhi = _extent(x1, bw, out_hw[1], w)
    return ((yhi - jnp.clip(ylo, 0, h - win_h)) < win_h) & ((xhi - jnp.clip(xlo, 0, w - win_w)) < win_w)


def roi_align(features, rois, output_size, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True, chunk: int = 64, window: int = 32):
    """features (B, H, W, C); rois (K, 5) [batch_idx, x1, y1, x2, y2] -> (K, out_h, out_w, C)."""
    out_hw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    _, h, w, c = features.shape
    k = rois.shape[0]
    rois = jax.lax.stop_gradient(rois).astype(features.dtype)
    win_h, win_w = min(window, h), min(window, w)
    args = (out_hw, spatial_scale, sampling_ratio, aligned)
    fast = jax.lax.map(lambda r: _one(features, r, *args, win_h, win_w), rois, batch_size=min(chunk, max(k, 1)))
    if win_h == h and win_w == w:
        return fast
    fits = jax.vmap(lambda r: _fits(r, *args, h, w, win_h, win_w))(rois)

    def slow(carry, x):
        r, ok, o = x
        o = jax.lax.cond(ok, lambda: o, lambda: _one(features, r, *args, h, w))
        return carry, o

    _, out = jax.lax.scan(slow, None, (rois, fits, fast))
    return out
