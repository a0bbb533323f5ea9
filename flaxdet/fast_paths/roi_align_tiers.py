"""Fast path ``roi_align_tiers`` (see :mod:`flaxdet.fast_paths`): RoIAlign on small crop tiers.

Same values as the plain path (:func:`flaxdet.ops.roi_align.roi_align`, every RoI contracted over its
whole feature map; the tests compare the two), at a fraction of the cost on XLA:CPU. Each RoI is
contracted on the smallest square crop of ``SMALL_WINDOWS`` / ``window`` (8 .. 48) holding its support
(``dynamic_slice``), ``chunk`` RoIs at a time (``lax.map`` of ``vmap``; RoIs sorted by crop tier, one
``lax.switch`` per chunk): memory O(chunk * window^2 * C); 48 covers ~90% of FPN-assigned RoIs. Each RoI's
geometry and interpolation matrices are computed once, for all RoIs together, on the ``window`` crop; a
tier's branch slices them (``_tier_fwd``), so the branches (and their linearisation in training) hold only
the crop and the two contractions: measured on a 4-level FPN extractor's gradient (1024 RoIs, 800x1333, 2
images, 2-core EPYC), trace 4.9 -> 1.9 s, XLA compile 14.2 -> 7.4 s, run 1.8 -> 1.5 s. The rest (elongated,
or large for the map) are redone one at a time by a while loop over just those RoIs, on a ``big_window``
crop or the whole map (``lax.switch``): extra memory O(H * W * C). The op is linear in ``features``; that
loop has an explicit VJP, so reverse-mode gradients reach ``features`` (not forward-mode; RoI coordinates
are constants, as in torchvision). Rows marked False in ``valid`` give zeros and cost nothing: RoIs are
sorted valid-first and chunks without a valid RoI are skipped (pass the level mask in an FPN extractor).
Under an outer ``vmap`` conds/switches become selects: correct, but every branch runs. Geometry is
computed in ``promote_types(features.dtype, float32)``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet.ops.roi_align_plan import HI, contract, crop_origin, geometry, plan, support

SMALL_WINDOWS = (8, 16, 24, 32)  # crop tiers below ``window`` (see roi_align_tiers)


def _crop_fwd(feat, roi, win, args):
    """One RoI from the (win_h, win_w) crop of its image's map that holds its support."""
    start, wy, wx, count = plan(roi, win, feat.shape[1:3], args)
    return contract(jax.lax.dynamic_slice(feat, start, (1, *win, feat.shape[3]))[0], wy, wx, count)


def _crop_bwd(d, roi, g, win, args):
    """d + the transpose of ``_crop_fwd`` applied to the cotangent g (oh, ow, C)."""
    start, wy, wx, count = plan(roi, win, d.shape[1:3], args)
    dp = jnp.einsum("ph,pwc->hwc", wy, jnp.einsum("pqc,qw->pwc", g / count, wx, precision=HI), precision=HI)
    return jax.lax.dynamic_update_slice(d, jax.lax.dynamic_slice(d, start, (1, *win, d.shape[3])) + dp[None], start)


def _tier_fwd(feat, ints, wy, wx, count, win):
    """``_crop_fwd`` on crop ``win`` from the RoI's plan at the largest small tier: ``ints`` is
    (image, support row, support col, top-tier crop row, top-tier crop col), ``wy`` (oh, top_h) and
    ``wx`` (ow, top_w) its interpolation matrices. The crop at ``win`` starts at ``min(lo, size - win)``,
    inside the top-tier crop, and its weights are the matching columns of ``wy`` / ``wx`` (each row's
    weight depends on the row alone): one plan per RoI for every tier, no per-tier geometry."""
    b, ylo, xlo, r_top, c_top = ints
    r0 = jnp.minimum(ylo, feat.shape[1] - win[0])
    c0 = jnp.minimum(xlo, feat.shape[2] - win[1])
    z = jnp.zeros_like(r0)  # index dtypes must agree (int32, also under x64)
    wy = jax.lax.dynamic_slice(wy, (z, r0 - r_top), (wy.shape[0], win[0]))
    wx = jax.lax.dynamic_slice(wx, (z, c0 - c_top), (wx.shape[0], win[1]))
    return contract(jax.lax.dynamic_slice(feat, (b, r0, c0, z), (1, *win, feat.shape[3]))[0], wy, wx, count)


def _supports(roi, hw, args):
    """(ylo, yhi, xlo, xhi): the RoI's inclusive support rows and columns (``support``)."""
    out_hw, scale, sampling_ratio, aligned = args
    (ys, yb, _), (xs, xb, _) = geometry(roi, scale, out_hw, sampling_ratio, aligned)
    return (*support(ys, yb, out_hw[0], hw[0]), *support(xs, xb, out_hw[1], hw[1]))


def _misses(sup, windows, hw):
    """(K,) int32: how many of ``windows`` (nested, smallest first) each RoI's support ``sup``
    (``_supports``, vmapped) does not fit."""
    ylo, yhi, xlo, xhi = sup
    return sum((~((yhi < crop_origin(ylo, hw[0], t[0]) + t[0]) & (xhi < crop_origin(xlo, hw[1], t[1]) + t[1])))
               .astype(jnp.int32) for t in windows)


def _big_rows(tier):
    return jnp.argsort(tier == 0, stable=True), (tier > 0).sum()


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _redo_big(features, rois, tier, out, tiers, args):
    """Rows with tier t > 0 of ``out`` recomputed on crop ``tiers[t - 1]``, looping over those rows only
    (a while loop, hence the explicit VJP: the op is linear in ``features``)."""
    order, n = _big_rows(tier)
    branches = [partial(_crop_fwd, win=t, args=args) for t in tiers]

    def body(i, out):
        k = order[i]
        return out.at[k].set(jax.lax.switch(tier[k] - 1, branches, features, rois[k]))

    return jax.lax.fori_loop(0, n, body, out)


def _redo_big_fwd(features, rois, tier, out, tiers, args):
    spec = jnp.zeros((features.shape[0], 0, 0, 0), features.dtype)  # carries B and the dtype, no data
    return _redo_big(features, rois, tier, out, tiers, args), (rois, tier, spec)


def _redo_big_bwd(tiers, args, res, g):
    rois, tier, spec = res
    order, n = _big_rows(tier)
    branches = [partial(_crop_bwd, win=t, args=args) for t in tiers]

    def body(i, d):
        k = order[i]
        return jax.lax.switch(tier[k] - 1, branches, d, rois[k], g[k])

    d = jnp.zeros((spec.shape[0], *tiers[-1], g.shape[-1]), g.dtype)  # tiers[-1] is the full map
    d = jax.lax.fori_loop(0, n, body, d).astype(spec.dtype)
    return d, None, None, jnp.where((tier > 0)[:, None, None, None], 0, g)


_redo_big.defvjp(_redo_big_fwd, _redo_big_bwd)


@partial(jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned", "chunk",
                                   "window", "big_window"))
def roi_align_tiers(features, rois, valid, output_size, spatial_scale, sampling_ratio, aligned, chunk, window,
                    big_window):
    _, h, w, c = features.shape
    k = rois.shape[0]
    if k == 0:
        return jnp.zeros((0, *output_size, c), features.dtype)
    rois = jax.lax.stop_gradient(rois).astype(jnp.promote_types(features.dtype, jnp.float32))
    args = (output_size, spatial_scale, sampling_ratio, aligned)
    tiers = sorted({(min(window, h), min(window, w)), (min(big_window, h), min(big_window, w)), (h, w)})
    # Window tiers: each RoI is contracted on the smallest square crop (SMALL_WINDOWS up to ``window``)
    # that holds its support -- the crop copy dominates the cost, so a 20-pixel RoI must not pay for a
    # 48-pixel crop. RoIs are sorted (valid first, then by tier) and cut into whole chunks; each chunk
    # runs at the tier of its largest RoI (lax.switch inside lax.map: only that branch runs), chunks
    # without a valid RoI are skipped (e.g. the RoIs of other levels in an FPN extractor). RoIs that fit
    # no small tier are computed at the largest and redone below on a bigger crop.
    # One plan per RoI (geometry, supports, interpolation matrices on the largest small crop), computed
    # for all RoIs at once; each tier's branch only slices it (``_tier_fwd``).
    small = sorted({(min(t, h), min(t, w)) for t in SMALL_WINDOWS if t < window} | {tiers[0]})
    sup = jax.vmap(lambda q: _supports(q, (h, w), args))(rois)
    key = jnp.where(valid, jnp.minimum(_misses(sup, small, (h, w)), len(small) - 1), len(small))
    (img, r_top, c_top, _), wy, wx, count = jax.vmap(lambda q: plan(q, small[-1], (h, w), args))(rois)
    ints = jnp.stack([img, sup[0], sup[2], r_top, c_top], 1)
    m = min(chunk, k)
    n = -(-k // m)
    perm = jnp.argsort(key, stable=True)
    pad = n * m - k

    def chunked(a, fill=0):  # (K, ...) -> (n, m, ...) in sorted order, padded rows ``fill``
        return jnp.concatenate([a[perm], jnp.full((pad, *a.shape[1:]), fill, a.dtype)]).reshape(n, m, *a.shape[1:])

    ck = chunked(key, len(small))
    live = ck.min(1) < len(small)
    branch = jnp.where(live, jnp.max(jnp.where(ck < len(small), ck, 0), 1) + 1, 0)
    zeros = jnp.zeros((m, *output_size, c), rois.dtype)
    branches = [lambda _: zeros] + [jax.vmap(lambda p, t=t: _tier_fwd(features, *p, t)) for t in small]
    out = jax.lax.map(lambda x: jax.lax.switch(x[1], branches, x[0]),
                      ((chunked(ints), chunked(wy), chunked(wx), chunked(count, 1)), branch))
    out = out.reshape(n * m, *output_size, c)[jnp.argsort(perm)]
    if len(tiers) > 1:  # tier: how many crops (smallest first, full map excluded) the RoI does not fit
        tier = _misses(sup, tiers[:-1], (h, w))
        out = _redo_big(features, rois, jnp.where(valid, tier, 0), out, tuple(tiers[1:]), args)
    return jnp.where(valid[:, None, None, None], out, 0).astype(features.dtype)
