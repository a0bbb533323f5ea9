"""The ``conv_vjp`` / ``conv1x1_matmul`` fast paths against the plain convolution (:mod:`flaxdet.ops.conv`).

The custom VJP's gradients (weight gradient by row blocks, strided input gradient by phases) equal XLA's
transposed convolutions: in float64, and against float64 in float32; under mixed precision (bf16 operands)
they keep their dtypes and stay close to float32. ``flaxdet.nn.conv2d`` with every fast path on equals it
with none on (forward and gradients), and off CPU it takes the plain path by default."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths, nn
from flaxdet.fast_paths import conv as fast_conv
from flaxdet.ops.conv import conv2d as plain_conv2d

HI = jax.lax.Precision.HIGHEST

CASES = [  # (N, H, W, Cin, Cout, k, stride, padding, dilation)
    (2, 11, 9, 256, 8, 3, 1, 1, 1),
    (2, 11, 9, 256, 8, 3, 2, 1, 1),
    (1, 12, 12, 256, 4, 3, 1, 2, 2),
    (1, 9, 11, 260, 5, 3, 2, 0, 1),
    (2, 8, 10, 16, 12, 1, 2, 0, 1),
    (2, 7, 7, 32, 6, 1, 1, 0, 1),
    # narrow: the blocked weight gradient in blocks of 8 rows (16 output rows), of 4 (with a partial block)
    (2, 16, 12, 8, 6, 3, 1, 1, 1),
    (1, 16, 10, 4, 4, 3, 1, 2, 2),
    (2, 10, 7, 5, 3, 5, 1, 0, 1),
    # strided, narrow: input gradient by phases, blocked weight gradient
    (2, 12, 10, 16, 8, 3, 2, 1, 1),
    (1, 11, 13, 8, 4, 3, 2, 1, 1),
    (1, 13, 9, 6, 4, 7, 2, 3, 1),
    (1, 10, 11, 8, 4, 2, 3, 0, 1),  # kernel narrower than the stride: empty phases
]
assert any(c[1] % 8 == 0 and c[5] > 1 for c in CASES) and any(c[1] % 4 and c[5] > 1 for c in CASES)


def _grads(fn, x, w, args):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.cos(fn(x, w, *args))), (0, 1)))(x, w)


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[5]}s{c[6]}p{c[7]}d{c[8]}c{c[3]}" for c in CASES])
def test_conv_custom_gradients_equal_xla(case):
    n, h, w_, cin, cout, k, s, p, d = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w_, cin))
    w = rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
    assert fast_conv.wants_custom_vjp(w, (s, s), (d, d), 1)  # the custom-VJP path is the one under test
    args = ((s, s), (p, p), (d, d), 1, HI, None)
    with jax.enable_x64():
        mine = _grads(fast_conv.conv_vjp, jnp.asarray(x), jnp.asarray(w), args)
        ref = _grads(plain_conv2d, jnp.asarray(x), jnp.asarray(w), args)
        for a, b in zip(mine, ref):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    f32 = _grads(fast_conv.conv_vjp, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), args)
    for a, b in zip(f32, ref):  # float32 summation error only
        assert a.dtype == jnp.float32
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2e-6 * np.abs(np.asarray(b)).max()


def test_conv_bf16_gradients_keep_dtypes():
    """Mixed precision: bf16 operands, float32 output; the weight gradient comes back in the weight's
    dtype (the layer's float32 -> bf16 cast turns it into float32), close to the float32 one."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 10, 10, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 256, 8)) / 48, jnp.float32)

    def loss(x, w, dt):
        y = fast_conv.conv_vjp(x.astype(dt), w.astype(dt), (1, 1), (1, 1), (1, 1), 1,
                      jax.lax.Precision.DEFAULT if dt == jnp.bfloat16 else HI, jnp.float32)
        assert y.dtype == jnp.float32
        return jnp.sum(y * y)

    gb = jax.grad(loss, (0, 1))(x, w, jnp.bfloat16)
    gf = jax.grad(loss, (0, 1))(x, w, jnp.float32)
    for a, b in zip(gb, gf):
        assert a.dtype == jnp.float32
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2e-2 * np.abs(np.asarray(b)).max()


@pytest.mark.parametrize("case", CASES + [(2, 9, 8, 12, 6, 1, 1, 0, 1)], ids=lambda c: f"k{c[5]}s{c[6]}c{c[3]}")
def test_conv2d_fast_paths_on_and_off_agree(case):
    """``nn.conv2d`` (the dispatcher every Conv2d calls): all fast paths vs none, float64."""
    n, h, w_, cin, cout, k, s, p, d = case
    rng = np.random.default_rng(2)
    args = ((s, s), (p, p), (d, d), 1, HI, None)
    out = {}
    with jax.enable_x64():
        x = jnp.asarray(rng.standard_normal((n, h, w_, cin)))
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin))
        for spec in ("all", "none"):
            with fast_paths.use(spec):
                f = jax.jit(lambda x, w: nn.conv2d(x, w, *args))
                out[spec] = (f(x, w), *_grads(nn.conv2d, x, w, args))
                jaxpr = str(jax.make_jaxpr(lambda x, w: nn.conv2d(x, w, *args))(x, w))
                fast = "custom_vjp" in jaxpr or "dot_general" in jaxpr
                assert fast == (spec == "all"), (spec, case)  # the switch picks the formulation
    for a, b in zip(out["all"], out["none"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_plain_paths_off_cpu(monkeypatch):
    """On GPU / TPU no fast path is on unless configured; the one table says so."""
    assert fast_paths.DEFAULTS["cpu"] == frozenset(fast_paths.NAMES)
    for backend in ("gpu", "cuda", "rocm", "tpu", "metal"):
        assert fast_paths.active(backend) == frozenset() or fast_paths._override is not None
    monkeypatch.setattr(fast_paths, "_override", None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not any(fast_paths.enabled(name) for name in fast_paths.NAMES)
    x, w = jnp.ones((1, 6, 6, 256)), jnp.ones((3, 3, 256, 4))
    jaxpr = str(jax.make_jaxpr(lambda x, w: nn.conv2d(x, w, (2, 2), (1, 1), (1, 1), 1, HI, None))(x, w))
    assert "custom_vjp" not in jaxpr and "conv_general_dilated" in jaxpr


def test_switch_parsing(monkeypatch):
    assert fast_paths._parse("all") == frozenset(fast_paths.NAMES)
    assert fast_paths._parse(" none ") == frozenset()
    assert fast_paths._parse("conv_vjp, roi_align_tiers") == {"conv_vjp", "roi_align_tiers"}
    with pytest.raises(ValueError, match="unknown fast path.*conv_fast"):
        fast_paths._parse("conv_fast")
    with pytest.raises(ValueError, match="unknown fast path"):
        fast_paths.enabled("nope")
    with fast_paths.use(["mask_row_buckets"]) as on:
        assert on == {"mask_row_buckets"} and fast_paths.enabled("mask_row_buckets")
        assert not fast_paths.enabled("conv_vjp")
    monkeypatch.setenv(fast_paths.ENV, "conv1x1_matmul")
    assert fast_paths._from_env() == {"conv1x1_matmul"}


@pytest.mark.parametrize("k,s,p,d", [(5, 1, 2, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 0, 1), (3, 1, 2, 2),
                                     (5, 1, 1, 1)])
def test_depthwise_taps_equal_plain(k, s, p, d):
    """The ``depthwise_taps`` fast path (RTMDet's depthwise 5x5) against XLA's grouped convolution, float64,
    values and gradients, through ``nn.conv2d``. Stride 1 takes the hand-written VJP (its blocked weight gradient
    over 13 output rows: blocks of 4 and a partial one; dilation; padding that shrinks the output)."""
    rng = np.random.default_rng(3)
    args = ((s, s), (p, p), (d, d), 12, HI, None)
    out = {}
    with jax.enable_x64():
        x = jnp.asarray(rng.standard_normal((2, 13, 11, 12)))
        w = jnp.asarray(rng.standard_normal((k, k, 1, 12)))
        for spec in ("all", "none"):
            with fast_paths.use(spec):
                out[spec] = (jax.jit(lambda x, w: nn.conv2d(x, w, *args))(x, w), *_grads(nn.conv2d, x, w, args))
                grouped = "feature_group_count=12" in str(jax.make_jaxpr(lambda x, w: nn.conv2d(x, w, *args))(x, w))
                assert grouped == (spec == "none")
    for a, b in zip(out["all"], out["none"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_depthwise_taps_bf16_keeps_dtypes():
    """Under mixed precision (bf16 operands, float32 accumulation) the hand-written VJP returns bf16 cotangents, close
    to the float32 gradients."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 5, 1, 8)), jnp.float32)

    def loss(x, w, dt, out):
        y = nn.conv2d(x.astype(dt), w.astype(dt), (1, 1), (2, 2), (1, 1), 8, jax.lax.Precision.DEFAULT, out)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    with fast_paths.use("all"):
        x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        gx, gw = jax.jit(jax.grad(lambda a, b: loss(a, b, jnp.bfloat16, jnp.float32), argnums=(0, 1)))(x16, w16)
        assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
        fx, fw = jax.jit(jax.grad(lambda a, b: loss(a, b, jnp.float32, None), argnums=(0, 1)))(x, w)
    for a, b in ((gx, fx), (gw, fw)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
