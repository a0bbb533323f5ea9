"""flaxdet.ops.roi_align against torchvision.ops.roi_align (CPU kernel), every RoI shape: on the plain path
(every RoI over its whole map) and on the ``roi_align_tiers`` fast path (crop tiers), each checked alone."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxdet import fast_paths
from flaxdet.ops.roi_align import roi_align

K = 40  # RoIs per example
PATHS = pytest.mark.parametrize("spec", ["roi_align_tiers", "none"], ids=["tiers", "plain"])


def _rois(rng, k, b, h, w, scale, allow_inverted):
    """Image-frame RoIs of every kind: tiny, ordinary, huge, elongated, negative/outside, inverted."""
    out = np.zeros((k, 5))
    for i in range(k):
        kind = rng.integers(0, 7)
        cy, cx = rng.uniform(-0.5, 1.5) * h, rng.uniform(-0.5, 1.5) * w  # feature frame, may be outside
        if kind == 0:  # tiny: below one feature pixel
            sh, sw = rng.uniform(0, 1, 2)
        elif kind == 1:  # ordinary
            sh, sw = rng.uniform(1, 1 + max(h, w) / 2, 2)
        elif kind == 2:  # huge: up to 20x the map
            sh, sw = rng.uniform(1, 20, 2) * max(h, w)
        elif kind == 3:  # elongated: adaptive grid far above 30
            sh, sw = rng.uniform(0.5, 3), rng.uniform(100, 600)
            if rng.random() < 0.5:
                sh, sw = sw, sh
        elif kind == 4:  # fully outside the map
            cy, cx = rng.choice([-1, 1]) * rng.uniform(h + 2, 3 * h + 5), rng.uniform(-3, 3) * w
            sh, sw = rng.uniform(0, 2 * h), rng.uniform(0, 2 * w)
        elif kind == 5:  # degenerate: zero width and/or height
            sh, sw = rng.choice([0.0, 2.5]), 0.0
            if rng.random() < 0.5:
                sh, sw = sw, sh
        else:  # inverted (x2 < x1): torchvision only handles these sanely with both axes inverted or a
            # fixed sampling ratio (a negative adaptive grid on one axis makes its kernel throw)
            sh, sw = rng.uniform(1, 10, 2)
            if allow_inverted:
                sh, sw = -sh, (-sw if rng.random() < 0.5 else sw)
            else:
                sh, sw = -sh, -sw
        y1, x1 = cy - sh / 2, cx - sw / 2
        out[i] = [rng.integers(0, b), x1 / scale, y1 / scale, (x1 + sw) / scale, (y1 + sh) / scale]
    return out


def _torch(feat, rois, out, scale, sr, aligned):
    t = torch.from_numpy(np.ascontiguousarray(feat.transpose(0, 3, 1, 2)))
    r = torchvision.ops.roi_align(t, torch.from_numpy(rois), out, scale, sr, aligned)
    return r.numpy().transpose(0, 2, 3, 1)


@PATHS
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 40), w=st.integers(1, 40), c=st.integers(1, 4),
       scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 16]), out=st.sampled_from([1, 2, 7, 14, (3, 5)]),
       sr=st.sampled_from([0, 1, 2]), aligned=st.booleans(),
       windows=st.sampled_from([(4, 8), (8, 16), (48, 96)]), p_valid=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_matches_torchvision_float64(spec, b, h, w, c, scale, out, sr, aligned, windows, p_valid, seed):
    rng = np.random.default_rng(seed)
    feat = rng.normal(size=(b, h, w, c))
    rois = _rois(rng, K, b, h, w, scale, sr > 0)
    valid = rng.random(K) < p_valid if p_valid < 1 else None  # False rows: zeros, chunks skipped
    ref = _torch(feat, rois, out, scale, sr, aligned)
    if valid is not None:
        ref = ref * valid[:, None, None, None]
    with jax.enable_x64(True), fast_paths.use(spec):
        got = roi_align(jnp.asarray(feat), jnp.asarray(rois), out, scale, sr, aligned, chunk=8,
                        window=windows[0], big_window=windows[1], valid=valid)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-10)


@PATHS
def test_realistic_float32_under_jit(spec):
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(1, 50, 68, 8)).astype(np.float32)
    xy = rng.uniform(-50, 1100, (300, 2))
    wh = np.exp(rng.uniform(np.log(4), np.log(900), (300, 2)))
    rois = np.concatenate([np.zeros((300, 1)), xy, xy + wh], 1).astype(np.float32)
    fn = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))
    for out, sr in ((7, 0), (14, 2)):
        with fast_paths.use(spec):
            got = np.asarray(fn(jnp.asarray(feat), jnp.asarray(rois), out, 1 / 16, sr, True))
        ref = _torch(feat, rois, out, 1 / 16, sr, True)
        err = np.abs(got - ref).max()
        assert err < 1e-5 * np.abs(feat).max(), err


@PATHS
def test_gradient_matches_torch(spec):
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(2, 12, 15, 3))
    rois = _rois(rng, 30, 2, 12, 15, 0.5, False)
    cot = rng.normal(size=(30, 7, 7, 3))
    valid = rng.random(30) < 0.7
    cot[~valid] = 0  # rows marked invalid give zeros (and no gradient)
    t = torch.from_numpy(np.ascontiguousarray(feat.transpose(0, 3, 1, 2))).requires_grad_()
    r = torchvision.ops.roi_align(t, torch.from_numpy(rois), 7, 0.5, 0, True)
    (r * torch.from_numpy(cot.transpose(0, 3, 1, 2))).sum().backward()
    ref = t.grad.numpy().transpose(0, 2, 3, 1)
    with jax.enable_x64(True), fast_paths.use(spec):
        def loss(f):
            out = roi_align(f, jnp.asarray(rois), 7, 0.5, 0, True, 8, window=4, big_window=8, valid=valid)
            return (out * cot).sum()

        got = jax.grad(loss)(jnp.asarray(feat))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-10)


@PATHS
def test_valid_mask_and_empty(spec):
    feat = jnp.ones((1, 10, 10, 2))
    rois = jnp.array([[0, 0, 0, 40, 40], [0, -100, -100, 500, 500.0]])
    with fast_paths.use(spec):
        got = roi_align(feat, rois, 2, 0.25, valid=jnp.array([True, False]))
        np.testing.assert_allclose(np.asarray(got[0]), 1.0, rtol=1e-6)
        assert not np.asarray(got[1]).any()
        assert roi_align(feat, jnp.zeros((0, 5)), (3, 4), 0.25).shape == (0, 3, 4, 2)
        tiered = "cond" in str(jax.make_jaxpr(lambda f: roi_align(f, rois, 2, 0.25))(feat))
        assert tiered == (spec == "roi_align_tiers")  # the switch picks the formulation


def test_tiers_equal_plain_float32():
    """The fast path against the plain one where they differ only by float32 rounding (crops vs whole
    maps): values and gradients, with invalid rows."""
    rng = np.random.default_rng(3)
    feat = jnp.asarray(rng.normal(size=(2, 60, 90, 8)).astype(np.float32))
    xy = rng.uniform(-10, 700, (200, 2))
    wh = rng.uniform(0.1, 500, (200, 2))
    rois = jnp.asarray(np.concatenate([rng.integers(0, 2, (200, 1)), xy, xy + wh], 1).astype(np.float32))
    valid = jnp.asarray(rng.random(200) > 0.2)
    cot = jnp.asarray(rng.normal(size=(200, 7, 7, 8)).astype(np.float32))
    out = {}
    for spec in ("roi_align_tiers", "none"):
        with fast_paths.use(spec):
            f = jax.jit(lambda x: roi_align(x, rois, 7, 1 / 8, 0, True, valid=valid))
            out[spec] = (f(feat), jax.grad(lambda x, f=f: (f(x) * cot).sum())(feat))
    for a, b in zip(out["roi_align_tiers"], out["none"]):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * np.abs(np.asarray(b)).max()


def test_many_rois_large_map_bounded_memory():
    rng = np.random.default_rng(2)
    feat = jnp.asarray(rng.normal(size=(1, 200, 336, 16)).astype(np.float32))
    xy = rng.uniform(0, 1300, (1000, 2))
    wh = np.exp(rng.uniform(np.log(8), np.log(1300), (1000, 2)))
    rois = jnp.asarray(np.concatenate([np.zeros((1000, 1)), xy, xy + wh], 1).astype(np.float32))
    fn = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))
    compiled = fn.lower(feat, rois, 7, 0.25, 0, True).compile()
    mem = compiled.memory_analysis()
    if mem is not None:  # scratch well below one (K, window, window, C) or (K, H, W) buffer
        assert mem.temp_size_in_bytes < 64 * 2 ** 20, mem.temp_size_in_bytes
    out = compiled(feat, rois)
    assert out.shape == (1000, 7, 7, 16) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("sr", [0, 3])
def test_integer_bins_float32_under_jit(sr):
    """RoIs on the feature grid, whose bin sizes are exact integers (42 / 7 = 6): XLA turns a divide by a
    broadcast scalar into a multiply by its reciprocal (6.0000005), and ceil() then picked 7 samples per
    bin where torchvision takes 6 -- errors of 0.03 on whole rows before flaxdet.ops.exact_div."""
    rng = np.random.default_rng(2)
    feat = rng.normal(size=(2, 40, 50, 4)).astype(np.float32)
    corners = rng.integers(0, 30, (64, 2)) * 4.0
    sizes = rng.integers(1, 30, (64, 2)) * 28.0  # multiples of 7 bins at scale 1/4
    rois = np.concatenate([rng.integers(0, 2, (64, 1)), corners, corners + sizes], 1).astype(np.float32)
    ref = _torch(feat, rois, 7, 0.25, sr, True)
    fn = jax.jit(lambda f, r: roi_align(f, r, 7, 0.25, sr, True))
    got = np.asarray(fn(jnp.asarray(feat), jnp.asarray(rois)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # the same RoIs one per vmapped call (as the FPN extractors and the mask branch call it)
    got = np.asarray(jax.jit(jax.vmap(lambda r: roi_align(jnp.asarray(feat), r[None], 7, 0.25, sr, True)[0]))(
        jnp.asarray(rois)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_exact_div_survives_jit_and_vmap():
    from flaxdet.ops import exact_div

    x = jnp.full((3, 4), 42.0, jnp.float32)
    want = np.float32(42) / np.float32(7)
    for f in (lambda x: exact_div(x, 7), jax.vmap(lambda x: exact_div(x, 7)),
              jax.vmap(jax.vmap(lambda x: exact_div(x, 7.0))), jax.vmap(lambda x: exact_div(x[0], 7))):
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), want)
    g = jax.grad(lambda x, y: exact_div(x, y).sum(), argnums=(0, 1))(x, jnp.float32(7))
    np.testing.assert_allclose(np.asarray(g[0]), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(g[1]), -12 * 42 / 49, rtol=1e-6)
